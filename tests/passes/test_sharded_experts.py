"""sharded_experts (the base of the parallel passes): this rank's shards and resident experts as graph constants.

Run through async_expert_parallel on one gloo rank, with ``hot_experts`` (the R most used experts of each
block resident, from routing statistics the test collects).
"""

import pytest
import torch

from moe_compile import RoutingStats, collect_routing_stats
from moe_compile.passes.async_expert_parallel import AsyncExpertParallel
from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def _stats(model, path):
    samples = [zoo.make_inputs(model, batch=2, seq=8, seed=s) for s in (11, 12)]
    collect_routing_stats(model, samples).save(path)
    return str(path)


def test_shards_and_resident_experts_become_constants_and_the_full_weights_are_released(one_rank, tmp_path):
    model = zoo.build("qwen3_moe", num_layers=2, seed=0)
    options = {"parallel": "aep", "hot_experts": 2, "routing_stats": _stats(model, tmp_path / "s.safetensors")}
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), AsyncExpertParallel())
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    run(harness, model, zoo.make_inputs(model, seq=5), options=options)
    buffers = dict(harness.record.module.named_buffers())
    for i in range(2):  # E = 8 experts: 2 resident, 6 sharded over one rank
        assert buffers[f"moe_resident{i}_w_up"].shape[0] == 2
        assert buffers[f"moe_shard{i}_w_up"].shape[0] == 6 and buffers[f"moe_position{i}"].shape == (8,)
    assert all(p.untyped_storage().nbytes() == 0 for p in experts.values())
    stats = RoutingStats.load(options["routing_stats"])
    for block in harness.record.ctx.moe_blocks:  # the two most used experts of each block, by the statistics
        assert block.report.schedule["resident_experts"] == list(stats.hot(block.report.path, 2))


def test_near_miss_statistics_of_another_model_are_refused(one_rank, tmp_path):
    other = zoo.build("qwen3_moe", num_layers=2, seed=1)  # same architecture, other router weights
    model = zoo.build("qwen3_moe", num_layers=2, seed=0)
    options = {"parallel": "aep", "hot_experts": 2, "routing_stats": _stats(other, tmp_path / "o.safetensors")}
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), AsyncExpertParallel())
    with pytest.raises(Exception, match="routing statistics made for another model"), torch.no_grad():
        torch.compile(model, backend=harness, options={"inductor": False, **options})(zoo.make_inputs(model))
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())  # nothing sharded, nothing released
