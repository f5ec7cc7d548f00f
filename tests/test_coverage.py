"""Coverage of the installed transformers' MoE families, tracked automatically (moe_compile.testing.coverage)."""

import re
import warnings
from pathlib import Path

import pytest
import transformers
from test_zoo_parity import ON_COVERAGE, assert_detected_and_exact

from moe_compile.testing import coverage
from moe_compile.testing.coverage import KNOWN_GAPS, Gap, Row, check_rows

ROOT = Path(__file__).resolve().parents[1]


def test_families_come_from_the_registry():
    families = coverage.moe_families()
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "switch_transformers"} <= set(families)
    assert "llama" not in families and "bert" not in families  # dense: no expert count in the config
    assert all(isinstance(v, str) for v in families.values())


def test_expert_count_keys_are_found_generically():
    from transformers import DeepseekV3Config, Ernie4_5_MoeConfig, MixtralConfig, Qwen3VLMoeConfig

    assert coverage.expert_count_keys(MixtralConfig()) == ["num_local_experts"]  # not num_experts_per_tok
    assert coverage.expert_count_keys(DeepseekV3Config()) == ["n_routed_experts"]  # not n_shared_experts
    assert coverage.expert_count_keys(Ernie4_5_MoeConfig()) == ["moe_num_experts"]
    assert coverage.expert_count_keys(Qwen3VLMoeConfig()) == ["text_config.num_local_experts"]  # nested


def test_tiny_config_shrinks_a_family_the_zoo_lacks():
    config = coverage.tiny_config("jetmoe")
    assert config.hidden_size <= 32 and config.num_hidden_layers == 2
    assert config.num_local_experts == coverage.TINY_EXPERTS


def test_one_family_row(one_torch_thread):
    row = coverage.check_family("qwen3_moe")
    assert row.status == "exact", row
    assert row.blocks == row.expert_modules == 2 and row.rel_err < coverage.TOLERANCE


def test_check_rows_names_what_is_wrong():
    some_gap = next(iter(KNOWN_GAPS))
    rows = [
        Row("brand_new_moe", "missed", reason="2 expert module(s) not found"),  # a family a new release added
        Row("other_moe", "inexact", reason="compiled differs"),
        Row("fine_moe", "exact"),
        Row(some_gap, "exact"),  # fixed: must leave the known gaps
    ]
    problems = check_rows(rows)
    assert any(p.startswith("brand_new_moe: missed and not a known gap") for p in problems), problems
    assert any(p.startswith("other_moe: INEXACT") for p in problems), problems
    assert any(p.startswith(f"{some_gap}: now detected and exact") for p in problems), problems
    assert not any(p.startswith("fine_moe") for p in problems)
    gap = KNOWN_GAPS[some_gap]
    assert check_rows([Row(some_gap, gap.status, reason="x " + gap.reason + " y")]) == []
    assert check_rows([Row(some_gap, gap.status, reason="something else")]) != []


def test_every_known_gap_is_documented():
    doc = (ROOT / "docs" / "coverage.md").read_text()
    for family, gap in KNOWN_GAPS.items():
        assert isinstance(gap, Gap) and gap.status in coverage.STATUSES and gap.cause, family
        assert f"`{family}`" in doc, f"{family} is a known gap but docs/coverage.md does not list it"


# The sweep, one test per family (pytest-xdist spreads them over its workers), each checked against the
# known gaps and, when docs/coverage.md was made with the installed transformers, against its row there.
DOCS_VERSION, DOCUMENTED = coverage.documented_rows(str(ROOT / "docs" / "coverage.md"))
#: the cells of a row that do not depend on the machine (rel err may move in the last digit; the reason of a
#: not-built row quotes an exception)
STABLE_CELLS = ("status", "blocks/expert modules", "model", "prepare")


def _docs_current() -> bool:
    return transformers.__version__ == DOCS_VERSION


def _stale(what: str) -> str:
    return f"{what}: docs/coverage.md and README.md are stale; run `moe-compile coverage --update-docs` and commit"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(DOCUMENTED))
def test_family_is_exact_or_a_known_gap(family, one_torch_thread):
    if coverage.family_entry(family) is None and not _docs_current():
        pytest.skip(f"{family} is not a MoE family of the installed transformers (docs/coverage.md: {DOCS_VERSION})")
    kept = {}
    row = coverage.check_one(family, kept)
    problems = check_rows([row])
    assert not problems, "\n".join(problems)
    zoo_name = ON_COVERAGE.get(family)
    if zoo_name is not None:  # the zoo's model: test_zoo_parity's checks, on this compile
        assert row.prepared == "", row  # prepare left it as built: the compile is of the zoo's model itself
        assert_detected_and_exact(zoo_name, kept["model"], kept["errors"], kept["report"])
    if _docs_current():
        got = dict(zip(coverage.HEADER, row.cells(), strict=True))
        for cell in STABLE_CELLS:
            assert got[cell] == DOCUMENTED[family][cell], _stale(
                f"{family}'s {cell} is {got[cell]!r}, the table says {DOCUMENTED[family][cell]!r}"
            )


@pytest.mark.slow
def test_the_table_lists_every_family_and_readme_sums_it_up():
    families = coverage.moe_families()
    new = sorted(set(families) - set(DOCUMENTED))
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"<!-- coverage -->\n(.*?)\n<!-- /coverage -->", readme, re.DOTALL)
    assert stated, "README.md has no <!-- coverage --> sentence"
    if _docs_current():
        assert not new, _stale(f"families missing from the table: {new}")
        assert set(families) == set(DOCUMENTED), _stale(
            f"families no longer registered: {sorted(set(DOCUMENTED) - set(families))}"
        )
        rows = [Row(f, cells["status"]) for f, cells in DOCUMENTED.items()]
        assert stated.group(1) == coverage.summary(rows), _stale("README's coverage sentence does not sum up the table")
        return
    # another transformers than the docs were made with (the lowest-versions lane, or a new release): the
    # families it adds are checked here (the per-family tests check the documented ones)
    rows = [coverage.check_one(f) for f in new]
    problems = check_rows(rows)
    assert not problems, "\n".join(problems)
    message = (
        f"docs/coverage.md and README's coverage sentence were made with transformers {DOCS_VERSION}, not the "
        f"installed {transformers.__version__}: their rows were not compared (new families, checked: "
        f"{new or 'none'}). If this is the newest admitted release, run `moe-compile coverage --update-docs` "
        "and commit."
    )
    print(message)
    warnings.warn(message, stacklevel=1)
