"""insert_predictors: each layer's predictor on its pre-attention activation, driving an offload_prefetch."""

import pytest
from predictor_helpers import constant_predictors, routed_experts

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.insert_predictors import InsertPredictors
from moe_compile.passes.offload_experts import OffloadExperts
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import run

PREDICT, PREFETCH, OFFLOAD = "moe_compile::predict_experts", "moe_compile::offload_prefetch", "moe_compile::moe_offload"


@pytest.fixture
def model_and_file(tmp_path):
    model = zoo.build("qwen3_moe", num_layers=2)
    ids = zoo.make_inputs(model, batch=1, seq=1)
    path = tmp_path / "p.safetensors"
    constant_predictors(model, path, {layer: sorted(r) for layer, r in routed_experts(model, ids).items()})
    return model, ids, str(path)


def test_each_offloaded_layer_gets_a_predictor_and_a_prefetch(model_and_file):
    model, ids, path = model_and_file
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), OffloadExperts(), InsertPredictors())
    run(harness, model, ids, options={"offload": "cpu", "predictor": path})
    harness.check_after_ops({PREDICT: 0, PREFETCH: 0, OFFLOAD: 2}, stage="offload_experts")
    harness.check_after_ops({PREDICT: 2, PREFETCH: 2, OFFLOAD: 2})
    blocks = harness.record.ctx.moe_blocks
    assert all(b.report.predictor.startswith("pre-attention of model.layers.") for b in blocks), blocks
    (store,) = harness.record.ctx.stores
    assert all(s.bytes_on_demand == 0 and s.bytes_ahead_used > 0 for s in store.stats())  # right predictions


def test_near_miss_no_block_in_a_store_nothing_consumes_predictions(model_and_file):
    """No expert store serves a block (offload_experts did not run): the file is still checked against
    the routers, no node is inserted, and the report says why."""
    model, ids, path = model_and_file
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), InsertPredictors())
    run(harness, model, ids, options={"offload": "cpu", "predictor": path})
    assert harness.record.changed["insert_predictors"] is False
    harness.check_after_ops({PREDICT: 0, PREFETCH: 0, "moe_compile::moe": 2})
    assert any("no block is served by an expert store" in n for n in harness.report.notes), harness.report.notes
