"""recognize_expert_parallel: an AllToAll expert-parallel block rewritten to one canonical call (one gloo rank)."""

import pytest
import torch

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.recognize_expert_parallel import RecognizeExpertParallel
from moe_compile.reference import ExpertParallelLM
from moe_compile.reference.expert_parallel import traceable
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run

A2A = "_c10d_functional::all_to_all_single"


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def _ep_model(near_miss: bool = False) -> ExpertParallelLM:
    torch.manual_seed(0)
    model = ExpertParallelLM(layers=2).eval().to_expert_parallel()
    if near_miss:  # combine without the weighted sum: another function, not an EP MoE block
        for block in model.blocks:
            block.experts.weighted_sum = lambda y_TKH, weights_TK: y_TKH.sum(dim=1)
    return model


def _harness():
    return PassHarness(DetectMoE(), CanonicalizeMoE(), RecognizeExpertParallel())


def test_ep_block_becomes_one_call_on_global_ids(one_rank):
    harness = _harness()
    with traceable():
        run(harness, _ep_model(), torch.randint(0, 64, (2, 5)), options={"parallel": "aep"})
    harness.check_after_ops({A2A: 4 * 2}, stage="canonicalize_moe")  # counts, ids, rows, combine per block
    harness.check_after_ops({A2A: 0, "moe_compile::moe": 2})
    ctx = harness.record.ctx
    assert sorted(ctx.presharded.values()) == [1, 1] and set(ctx.presharded) == {b.node for b in ctx.moe_blocks}
    assert all("recognised expert-parallel block" in b.report.rewrites[0] for b in ctx.moe_blocks)


def test_near_miss_unweighted_combine_is_left_as_written(one_rank):
    harness = _harness()
    with traceable():
        run(harness, _ep_model(near_miss=True), torch.randint(0, 64, (2, 5)), options={"parallel": "aep"})
    harness.check_after_ops({A2A: 8})
    assert harness.record.ctx.presharded == {} and harness.record.ctx.moe_blocks == []
    reasons = [s.reason for s in harness.report.skipped]
    assert len(reasons) == 2 and all("expert-parallel block not recognised, left as written" in r for r in reasons)
    assert all("not weighted by the routing weights" in r for r in reasons), reasons
