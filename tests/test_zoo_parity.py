"""Every zoo family: one block per MoE layer, and compiled logits equal eager's."""

import re

import pytest
import torch
from conftest import rel_err

import moe_compile
from moe_compile.testing import zoo

INTERFACE = [n for n in zoo.names() if zoo.get(n).interface]


def _layer_of(path: str) -> int:
    found = re.findall(r"\.(\d+)\.", path + ".")
    assert found, f"no layer index in block path {path!r}"
    return int(found[0])


@pytest.mark.parametrize("name", INTERFACE)
def test_family_detected_and_exact(name):
    model = zoo.build(name)
    report = moe_compile.explain(model, zoo.make_inputs(model, seq=6))
    expected_layers = zoo.moe_layer_indices(name, model.config)
    assert report.skipped == [], report
    assert sorted(_layer_of(b.path) for b in report.blocks) == sorted(expected_layers), report
    entry = zoo.get(name)
    for block in report.blocks:
        assert block.top_k == getattr(model.config, "num_experts_per_tok", block.top_k)
        assert block.shared_experts == entry.shared_experts, report
        assert block.verified.startswith("probe rel err"), block

    compiled = torch.compile(model, backend="moe_prefill")
    with torch.no_grad():
        for seq in (5, 11):  # two lengths: the second compiles a dynamic-shape graph
            input_ids = zoo.make_inputs(model, seq=seq, seed=seq)
            expected = model(input_ids).logits
            got = compiled(input_ids).logits
            assert rel_err(got, expected) < 1e-5
    assert len(moe_compile.last_report().blocks) == len(expected_layers)
