"""async_expert_parallel: each layer's experts all-gathered ahead of use (a gloo group of one rank)."""

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

GATHER = "_c10d_functional::all_gather_into_tensor_coalesced"
WAIT = "_c10d_functional::wait_tensor"


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def _harness():
    return PassHarness(HideReleasedWeights(), DetectMoE(), CanonicalizeMoE(), AsyncExpertParallel())


def test_each_layer_gathers_its_shards_and_waits_before_use(one_rank):
    torch.manual_seed(0)
    options = {"parallel": "aep", "prefetch_depth": 1}
    harness = run(_harness(), TinyLM(layers=3).eval(), torch.randint(0, 64, (2, 5)), options=options)
    harness.check_after_ops({GATHER: 3, WAIT: 6, "moe_compile::moe": 3})
    nodes = list(harness.record.after.nodes)
    moe = [n for n in nodes if n.target is torch.ops.moe_compile.moe.default]
    gathers = [n for n in nodes if n.target is torch.ops._c10d_functional.all_gather_into_tensor_coalesced.default]
    assert nodes.index(gathers[2]) > nodes.index(moe[0])  # depth 1: layer 2's gather after layer 0's MoE
    assert all(n.op != "placeholder" for call in moe for n in call.args[3:5])  # the full experts are no longer read
    assert [b.report.schedule["prefetch_depth"] for b in harness.record.ctx.moe_blocks] == [1, 1, 1]
    assert harness.record.ctx.wrap_compiled is not None  # the world-size check


def test_near_miss_non_canonical_block_gets_no_gather(one_rank):
    """A block canonicalize left alone is not sharded: no collective, the experts stay whole."""
    torch.manual_seed(0)
    model = TinyLM(post_norm=True).eval()
    harness = run(_harness(), model, torch.randint(0, 64, (2, 5)), options={"parallel": "aep"})
    assert harness.record.changed["async_expert_parallel"] is False
    harness.check_after_ops({GATHER: 0, WAIT: 0, "moe_compile::moe": 0})
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    assert all("not canonical" in s.reason for s in harness.report.skipped)
