"""lower_triton: canonical calls retargeted to moe_compile::moe_triton when the Triton kernels are asked for."""

import torch
from custom_moe import TinyLM

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.lower_triton import LowerToTriton
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import run


def _harness():
    return PassHarness(DetectMoE(), CanonicalizeMoE(), LowerToTriton())


def test_kernels_triton_retargets_every_call():
    torch.manual_seed(0)
    harness = run(_harness(), TinyLM(layers=1).eval(), torch.randint(0, 64, (1, 3)), options={"kernels": "triton"})
    harness.check_after_ops({"moe_compile::moe": 1}, stage="canonicalize_moe")
    harness.check_after_ops({"moe_compile::moe": 0, "moe_compile::moe_triton": 1})
    assert [b.report.implementation for b in harness.record.ctx.moe_blocks] == ["triton"]


def test_near_miss_torch_kernels_leave_the_calls():
    """kernels="auto" off a GPU means the torch implementation: nothing to lower."""
    torch.manual_seed(0)
    harness = run(_harness(), TinyLM(layers=1).eval(), torch.randint(0, 64, (1, 3)), options={"kernels": "auto"})
    assert harness.record.changed["lower_triton"] is False
    harness.check_after_ops({"moe_compile::moe": 1, "moe_compile::moe_triton": 0})
    assert [b.report.implementation for b in harness.record.ctx.moe_blocks] == ["torch"]
