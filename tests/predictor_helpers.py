"""Hand-made predictor files for the tests (right or wrong by construction: constant scores), NaN-filled rings.

Used by tests/test_offload.py (one process) and tests/dist_predict_workers.py (spawned ranks).
"""

from __future__ import annotations

import torch

from moe_compile.predictor import ExpertPredictor, ExpertPredictors, collect_routing, model_identity, save_bundle
from moe_compile.predictor.train import PredictorBundle


def constant_predictors(model, path, experts: dict[int, list[int]]) -> None:
    """A predictor file whose layer ``i`` always predicts ``experts[i]`` (hand-made weights: scores = b2)."""
    identity = model_identity(model)
    E, K = identity["num_experts"], identity["top_k"]
    predictors = {}
    for layer, chosen in experts.items():
        p = ExpertPredictor(identity["hidden_size"], E, K, width=8)
        with torch.no_grad():
            for t in (p.up.weight, p.up.bias, p.down.weight):
                t.zero_()
            p.down.bias.copy_(torch.arange(E, 0, -1).float() * 0.01)  # ties broken, below the chosen ones
            p.down.bias[chosen] = torch.tensor([10.0 - j for j in range(K)])
        predictors[layer] = p
    bundle = PredictorBundle(ExpertPredictors(predictors), ExpertPredictors({}), {}, identity, {})
    save_bundle(bundle, path)


def routed_experts(model, input_ids) -> dict[int, set[int]]:
    """The experts each MoE layer's router picks for ``input_ids``, from the eager model."""
    data = collect_routing(model, input_ids, progress=False)
    return {layer: set(data.topk[layer].flatten().tolist()) for layer in data.layers}


def nan_filling(claim):
    """``ExpertStore._claim`` that fills the claimed ring buffer with NaN: reading a row not brought in shows."""

    def claim_nan(self, layer, seq):
        buffer = claim(self, layer, seq)
        for t in buffer.tensors.values():
            t.fill_(float("nan"))
        return buffer

    return claim_nan


def random_predictors(model, path, seed: int = 0, width: int = 8) -> None:
    """A predictor file with randomly initialised predictors: per-token guesses that vary, so their union over
    a long prompt covers most experts (prefetches that move most bytes ahead, right or wrong)."""
    identity = model_identity(model)
    torch.manual_seed(seed)
    predictors = {
        layer: ExpertPredictor(identity["hidden_size"], identity["num_experts"], identity["top_k"], width=width)
        for layer in identity["moe_layers"]
    }
    bundle = PredictorBundle(ExpertPredictors(predictors), ExpertPredictors({}), {}, identity, {})
    save_bundle(bundle, path)
