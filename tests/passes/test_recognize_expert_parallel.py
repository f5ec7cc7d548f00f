"""recognize_expert_parallel: an AllToAll expert-parallel block rewritten to one canonical call on global ids.

The match needs two ranks (with one, Dynamo specialises the AllToAll split sizes to constants):
a spawned gloo pair (tests/dist_ep_workers.py). The near miss runs in one process.
"""

import pytest
import torch
from dist_ep_workers import recognize_pass_worker
from dist_workers import spawn

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.recognize_expert_parallel import RecognizeExpertParallel
from moe_compile.reference import ExpertParallelLM
from moe_compile.reference.expert_parallel import traceable
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run

A2A = "_c10d_functional::all_to_all_single"


@pytest.mark.slow  # two processes
def test_ep_block_becomes_one_call_on_global_ids():
    for rank, r in enumerate(spawn(recognize_pass_worker, 2)):
        where = f"rank {rank}"
        assert r["error"] < 1e-5, (where, r["error"])
        assert r["before"][A2A] == 4 * r["layers"], (where, r["before"])  # counts, rows, ids, combine per block
        assert r["after"].get(A2A, 0) == 0 and r["after"]["moe_compile::moe"] == r["layers"], (where, r["after"])
        assert r["presharded"] == [2] * r["layers"] and all(r["blocks"]), (where, r)
        assert r["gathers"] == r["layers"], (where, r["gathers"])  # AEP then gathers the recognised shards


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def test_near_miss_split_sizes_it_cannot_trace_back_are_left_as_written(one_rank):
    """On one rank the split sizes are constants, not counts read back from the exchange: not provably EP."""
    torch.manual_seed(0)
    model = ExpertParallelLM(layers=2).eval().to_expert_parallel()
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), RecognizeExpertParallel())
    with traceable():
        run(harness, model, torch.randint(0, 64, (2, 5)), options={"parallel": "aep"})
    harness.check_after_ops({A2A: 8})  # four per block, as written
    assert harness.record.changed["recognize_expert_parallel"] is False
    assert harness.record.ctx.presharded == {} and harness.record.ctx.moe_blocks == []  # never sharded again
    reasons = [s.reason for s in harness.report.skipped]
    assert len(reasons) == 2 and all("expert-parallel block not recognised, left as written" in r for r in reasons)
    assert all("a split size is not read back from a count tensor" in r for r in reasons), reasons
