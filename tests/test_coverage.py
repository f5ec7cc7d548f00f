"""Coverage of the installed transformers' MoE families, tracked automatically (moe_compile.testing.coverage)."""

import re
import warnings
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole sweep (about 5 min on 2 idle cores); each family has its own 300 s limit
def test_every_moe_family_is_exact_or_a_known_gap():
    torch.set_num_threads(1)
    rows = coverage.run_coverage(workers=2, timeout=300)
    print()
    print(coverage.format_table(rows))
    print(coverage.summary(rows))
    problems = check_rows(rows)
    assert not problems, "\n".join(problems)
    # README states the count from this table (moe-compile coverage --update-docs writes it)
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"<!-- coverage -->\n(.*?)\n<!-- /coverage -->", readme, re.DOTALL)
    assert stated, "README.md has no <!-- coverage --> sentence"
    import transformers

    if f"transformers {transformers.__version__}:" in stated.group(1):
        assert stated.group(1) == coverage.summary(rows), "README's coverage sentence is stale: run --update-docs"
    else:  # another transformers than the docs were made with (the lowest-versions lane, or a new release)
        message = (
            f"README's coverage sentence was not checked: it was made with another transformers than the installed "
            f"{transformers.__version__} ({stated.group(1)!r}); this run's sentence is {coverage.summary(rows)!r}. "
            "If this is the newest admitted release, run `moe-compile coverage --update-docs` and commit."
        )
        print(message)
        warnings.warn(message, stacklevel=1)
