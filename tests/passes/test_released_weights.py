"""released_weights: on a recompile, the expert weights a parallel compile released are hidden from the passes."""

import pytest
import torch
from custom_moe import TinyLM

from moe_compile.passes.async_expert_parallel import AsyncExpertParallel
from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.released_weights import HideReleasedWeights
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def test_recompile_sees_the_released_experts_as_unknown(one_rank):
    torch.manual_seed(0)
    harness = PassHarness(HideReleasedWeights(), DetectMoE(), CanonicalizeMoE(), AsyncExpertParallel())
    inputs = [torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (1, 9))]  # the second shape recompiles
    run(harness, TinyLM(layers=2).eval(), *inputs, options={"parallel": "aep"})
    first, second = harness.records
    assert first.ctx.released_inputs == {}  # near miss: nothing was released before the first compile
    assert len(second.ctx.released_inputs) == 4  # w_up, w_down of two blocks
    assert all(second.ctx.real_inputs[i] is None for i in second.ctx.released_inputs)
    assert any("released by an earlier parallel compile" in n for n in second.ctx.report.notes)
    assert all(b.report.verified.startswith("probe rel err") for b in second.ctx.moe_blocks)  # random weights
    assert second.changed["released_weights"] is False  # analysis only
