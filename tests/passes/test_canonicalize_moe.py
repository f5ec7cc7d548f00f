"""canonicalize_moe: each detected block verified on probe inputs and replaced by one moe_compile::moe call."""

import pytest
import torch
from custom_moe import TinyLM

from moe_compile.passes import PipelineOrderError
from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import run


def test_each_block_becomes_one_canonical_call():
    torch.manual_seed(0)
    harness = run(PassHarness(DetectMoE(), CanonicalizeMoE()), TinyLM(layers=2).eval(), torch.randint(0, 64, (2, 5)))
    harness.check_before_ops({"aten::bmm": 4, "moe_compile::moe": 0})
    harness.check_after_ops({"aten::bmm": 0, "moe_compile::moe": 2})
    blocks = harness.record.ctx.moe_blocks
    assert [b.report.path for b in blocks] == ["blocks.0", "blocks.1"]
    assert all(b.report.verified.startswith("probe rel err") for b in blocks)


def test_near_miss_post_expert_norm_is_left_as_written():
    """A norm on each expert's output reads another parameter: no canonical form computes it."""
    torch.manual_seed(0)
    harness = PassHarness(DetectMoE(), CanonicalizeMoE())
    run(harness, TinyLM(post_norm=True).eval(), torch.randint(0, 64, (2, 5)))
    assert len(harness.record.ctx.detected.matches) == 2  # detected, then refused
    harness.check_after_ops({"moe_compile::moe": 0, "aten::bmm": 4})
    assert harness.record.ctx.moe_blocks == []
    assert all("also reads" in s.reason and "not canonical" in s.reason for s in harness.report.skipped)


def test_runs_only_after_detect():
    with pytest.raises(PipelineOrderError, match="'canonicalize_moe' reads PassContext.detected, which detect_moe"):
        PassHarness(CanonicalizeMoE())
