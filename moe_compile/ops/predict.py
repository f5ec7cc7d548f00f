"""``moe_compile::predict_experts``: the expert predictor :mod:`moe_compile.passes.insert_predictors` puts in graphs.

Schema: ``predict_experts(hidden [T, H], w1 [D, H], b1 [D], w2 [E, D], b2 [E], top_k, eps)`` -> the
predicted expert ids ``int64 [T, K]``, best first: :func:`moe_compile.predictor.net.predict_topk` as
one opaque node, so the report and the debug graphs show one readable predictor call per layer.
"""

from __future__ import annotations

import torch

from ..predictor.net import predict_topk

__all__ = ["predict_experts"]


@torch.library.custom_op("moe_compile::predict_experts", mutates_args=())
def predict_experts(
    hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, top_k: int, eps: float
) -> torch.Tensor:
    """Predicted expert ids ``int64 [T, K]`` for the pre-attention activation ``hidden [T, H]``."""
    return predict_topk(hidden, w1, b1, w2, b2, top_k, eps)  # [T, K]


@predict_experts.register_fake
def _predict_experts_fake(hidden, w1, b1, w2, b2, top_k, eps):
    torch._check(hidden.dim() == 2, lambda: f"predict_experts: hidden must be [T, H], got {tuple(hidden.shape)}")
    torch._check(hidden.shape[1] == w1.shape[1], lambda: "predict_experts: w1 does not match the hidden size")
    return hidden.new_empty((hidden.shape[0], top_k), dtype=torch.int64)
