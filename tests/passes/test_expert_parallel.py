"""expert_parallel: canonical calls retargeted to moe_compile::moe_ep on this rank's shards (one gloo rank)."""

import pytest
import torch
from custom_moe import TinyLM

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.expert_parallel import ExpertParallel
from moe_compile.passes.moe_call import MoECall
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def _harness():
    return PassHarness(DetectMoE(), CanonicalizeMoE(), ExpertParallel())


def test_calls_become_moe_ep_on_shards(one_rank):
    torch.manual_seed(0)
    model = TinyLM(layers=2).eval()
    harness = run(_harness(), model, torch.randint(0, 64, (2, 5)), options={"parallel": "ep"})
    harness.check_after_ops({"moe_compile::moe": 0, "moe_compile::moe_ep": 2})
    for node in harness.record.after.nodes:
        if node.target is torch.ops.moe_compile.moe_ep.default:
            call = MoECall.from_node(node)
            assert (call.world_size, call.impl) == (1, "torch") and call.w_up.op != "placeholder"
    assert all(b.w_up.untyped_storage().nbytes() == 0 for b in model.blocks)  # the full experts were released


def test_near_miss_non_canonical_block_stays_local(one_rank):
    torch.manual_seed(0)
    harness = run(_harness(), TinyLM(post_norm=True).eval(), torch.randint(0, 64, (2, 5)), options={"parallel": "ep"})
    assert harness.record.changed["expert_parallel"] is False
    harness.check_after_ops({"moe_compile::moe_ep": 0, "aten::bmm": 4})
    assert all("not canonical" in s.reason for s in harness.report.skipped)
