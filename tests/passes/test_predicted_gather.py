"""predicted_gather: AEP with a predictor; calls retargeted to moe_offload on a store of gathered shards (one rank)."""

import pytest
import torch
from custom_moe import TinyLM
from predictor_helpers import constant_predictors, routed_experts

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.insert_predictors import InsertPredictors
from moe_compile.passes.predicted_gather import PredictedGather
from moe_compile.runtime.expert_store import RanksSource
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness

from . import pass_testing
from .pass_testing import run

OFFLOAD = "moe_compile::moe_offload"
GATHER = "_c10d_functional::all_gather_into_tensor_coalesced"


@pytest.fixture
def one_rank():
    with pass_testing.one_rank():
        yield


def test_calls_read_a_store_of_shards_gathered_by_prediction(one_rank, tmp_path):
    model = zoo.build("qwen3_moe", num_layers=2)
    ids = zoo.make_inputs(model, batch=1, seq=1)
    right = {layer: sorted(r) for layer, r in routed_experts(model, ids).items()}
    constant_predictors(model, tmp_path / "p.safetensors", right)
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), PredictedGather(), InsertPredictors())
    run(harness, model, ids, options={"parallel": "aep", "predictor": str(tmp_path / "p.safetensors")})
    harness.check_after_ops({"moe_compile::moe": 0, OFFLOAD: 2}, stage="predicted_gather")
    harness.check_after_ops({"moe_compile::offload_prefetch": 2, GATHER: 0})
    (store,) = harness.record.ctx.stores
    assert isinstance(store.source, RanksSource) and harness.record.ctx.wrap_compiled is not None
    assert all(s.bytes_on_demand_used == 0 for s in store.stats())  # right predictions: everything ahead


def test_near_miss_non_canonical_blocks_are_not_sharded(one_rank, tmp_path):
    torch.manual_seed(0)
    model = TinyLM(post_norm=True).eval()
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), PredictedGather())
    options = {"parallel": "aep", "predictor": str(tmp_path / "unused.safetensors")}
    run(harness, model, torch.randint(0, 64, (2, 5)), options=options)
    assert harness.record.changed["predicted_gather"] is False and harness.record.ctx.stores == []
    harness.check_after_ops({OFFLOAD: 0, "aten::bmm": 4})
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())  # nothing released
    assert all("not canonical" in s.reason for s in harness.report.skipped)
