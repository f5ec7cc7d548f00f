"""Every zoo family: one block per MoE layer, and compiled logits equal eager's.

Each zoo family with the experts interface is also a row of the coverage table, whose sweep builds
the zoo's model for it: its checks (:func:`assert_detected_and_exact`) run in
``test_coverage.py::test_family_is_exact_or_a_known_gap`` on the compile that test makes anyway (one
compile per family, not two). Here: the edge cases of top-k.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from moe_compile.backend import collect_reports, register_root
from moe_compile.testing import zoo

pytestmark = (
    pytest.mark.slow
)  # a compile per zoo family (a family sweep, like the coverage tests): the quick lane keeps test_backend's

INTERFACE = [n for n in zoo.names() if zoo.get(n).interface]


def coverage_rows() -> dict[str, str]:
    """Coverage row (model type) -> the zoo family whose model that row's per-family test builds."""
    from moe_compile.testing.coverage import documented_rows
    from moe_compile.testing.coverage.configs import _zoo_entry

    _, documented = documented_rows(str(Path(__file__).resolve().parents[1] / "docs" / "coverage.md"))
    return {family: entry.name for family in documented if (entry := _zoo_entry(family)) and entry.interface}


ON_COVERAGE = coverage_rows()


def _layer_of(path: str) -> int:
    found = re.findall(r"\.(\d+)\.", path + ".")
    assert found, f"no layer index in block path {path!r}"
    return int(found[0])


def _compiled_at_two_lengths(model, options=None):
    """The compiled logits' relative errors at 5 and 11 tokens and the report of the first compile (what explain()
    reports): the first input's length is marked dynamic, so one graph serves both lengths where the model allows
    it (Jamba's and MiniMax's recompile for the second)."""
    register_root(model)  # block paths read as the model's module paths, as explain() gives them
    compiled = torch.compile(model, backend="moe_prefill", options=options)
    errors, reports = [], []
    with torch.no_grad():
        for seq in (5, 11):
            input_ids = zoo.make_inputs(model, seq=seq, seed=seq)
            torch._dynamo.maybe_mark_dynamic(input_ids, 1)
            with collect_reports() as report:
                got = compiled(input_ids).logits
            errors.append(rel_err(got, model(input_ids).logits))
            reports.append(report)
    return errors, reports[0]


def assert_detected_and_exact(name, model, errors, report):
    """One block per MoE layer of zoo family ``name`` (its top-k, shared experts, verified on probes), and
    compiled logits within 1e-5 of eager's at each length."""
    expected_layers = zoo.moe_layer_indices(name, model.config)
    assert report.skipped == [], report
    assert sorted(_layer_of(b.path) for b in report.blocks) == sorted(expected_layers), report
    entry = zoo.get(name)
    for block in report.blocks:
        assert block.top_k == getattr(model.config, "num_experts_per_tok", block.top_k)
        assert block.shared_experts == entry.shared_experts, report
        assert block.verified.startswith("probe rel err"), block
    assert max(errors) < 1e-5, errors


def test_every_zoo_family_is_checked_on_its_coverage_row():
    """Each zoo family's checks run in the coverage test of its row; a family without a row would be unchecked."""
    missing = sorted(set(INTERFACE) - set(ON_COVERAGE.values()))
    assert not missing, (
        f"zoo families with no coverage row to check them: {missing}; give them one, or check them here with "
        "_compiled_at_two_lengths and assert_detected_and_exact"
    )


#: (family, config overrides, experts implementation): top-1 routing with and without renormalisation,
#: softmax and sigmoid routers, group-limited top-1, k = E, and the per-pair gathered (batched_mm) form
EDGE_K = [
    ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True}, None),
    ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": False}, None),
    ("qwen3_moe", {"num_experts_per_tok": 1}, "batched_mm"),
    ("mixtral", {"num_experts_per_tok": 1}, None),
    ("olmoe", {"num_experts_per_tok": 1}, None),
    ("deepseek_v3", {"num_experts_per_tok": 1}, None),
    ("minimax_m2", {"num_experts_per_tok": 1}, None),  # sigmoid + bias, top-1
    ("cohere2_moe", {"num_experts_per_tok": 1}, None),  # top-1 then sigmoid
    ("mixtral", {"num_experts_per_tok": 8}, None),  # k = E
    ("deepseek_v3", {"num_experts_per_tok": 8, "n_group": 1, "topk_group": 1}, None),  # k = E, sigmoid
]


def _edge_id(case) -> str:
    name, overrides, impl = case
    return "-".join([name, *(f"{k}={v}" for k, v in overrides.items()), impl or "grouped"])


@pytest.mark.parametrize(("name", "overrides", "impl"), EDGE_K, ids=[_edge_id(c) for c in EDGE_K])
def test_edge_top_k_detected_and_exact(name, overrides, impl):
    model = zoo.build(name, overrides=overrides, experts_implementation=impl)
    k = overrides["num_experts_per_tok"]
    errors, report = _compiled_at_two_lengths(model, {"inductor": False})
    assert report.skipped == [], report
    assert len(report.blocks) == len(zoo.moe_layer_indices(name, model.config)), report
    assert all(b.top_k == k and b.verified.startswith("probe rel err") for b in report.blocks), report
    assert max(errors) < 1e-5, errors
