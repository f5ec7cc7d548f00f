"""The expert predictor: two linear maps with a GELU between them, on the RMS-normalised activation.

::

    x      = hidden / sqrt(mean(hidden^2) + eps)     [T, H]   parameter-free RMS norm
    scores = W2 @ gelu(W1 @ x + b1) + b2              [T, E]   W1 [D, H], W2 [E, D]
    ids    = topk(scores, K).indices                   [T, K]   predicted experts, best first

The norm has no parameters: it makes the predictor blind to the residual stream's scale, which grows
with depth, and costs one reduction. :func:`predictor_scores` and :func:`predict_topk` are pure
functions of ``(hidden, weights)`` built from ATen ops only (``pow, mean, rsqrt, mul, addmm, gelu,
topk``), so a graph pass can trace them into nodes; :class:`ExpertPredictor` is the trainable module
around the same function. Legend: ``T`` tokens, ``H`` hidden, ``D`` predictor width, ``E`` experts,
``K`` experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTH = 256
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PredictorWeights:
    """One layer's predictor as plain tensors (what a graph pass lifts into the graph)."""

    w1: torch.Tensor  # [D, H]
    b1: torch.Tensor  # [D]
    w2: torch.Tensor  # [E, D]
    b2: torch.Tensor  # [E]
    top_k: int
    eps: float = NORM_EPS


def predictor_scores(
    hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float = NORM_EPS
) -> torch.Tensor:
    """Expert scores ``[..., E]`` for pre-attention activations ``hidden`` ``[..., H]`` (float32 math)."""
    x = hidden.float()  # [..., H]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., H]
    return F.linear(F.gelu(F.linear(x, w1.float(), b1.float())), w2.float(), b2.float())  # [..., E]


def predict_topk(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    top_k: int,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """Predicted expert ids ``[..., K]`` (int64, best first) for ``hidden`` ``[..., H]``."""
    return torch.topk(predictor_scores(hidden, w1, b1, w2, b2, eps), top_k, dim=-1).indices


class ExpertPredictor(nn.Module):
    """A trainable predictor of one MoE layer's top-k experts (see the module docstring)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, width: int = DEFAULT_WIDTH):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.up = nn.Linear(hidden_size, width)  # W1 [D, H], b1 [D]
        self.down = nn.Linear(width, num_experts)  # W2 [E, D], b2 [E]
        self.top_k = top_k

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Expert scores ``[..., E]`` for ``hidden`` ``[..., H]``."""
        return predictor_scores(hidden, self.up.weight, self.up.bias, self.down.weight, self.down.bias)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted expert ids ``[..., K]`` (best first) for ``hidden`` ``[..., H]``."""
        return torch.topk(self(hidden), self.top_k, dim=-1).indices

    def weights(self) -> PredictorWeights:
        """The weights as plain (detached) tensors, for :func:`predict_topk` or a graph pass."""
        return PredictorWeights(
            self.up.weight.detach(), self.up.bias.detach(), self.down.weight.detach(), self.down.bias.detach(),
            top_k=self.top_k,
        )  # fmt: skip


class ExpertPredictors(nn.Module):
    """One :class:`ExpertPredictor` per MoE layer, addressed by decoder layer index."""

    def __init__(self, predictors: dict[int, ExpertPredictor]):
        super().__init__()
        self.by_layer = nn.ModuleDict({str(index): predictors[index] for index in sorted(predictors)})

    @property
    def layers(self) -> list[int]:
        """The decoder layer indices that have a predictor, ascending."""
        return [int(key) for key in self.by_layer]

    def __getitem__(self, layer_idx: int) -> ExpertPredictor:
        if str(layer_idx) not in self.by_layer:
            raise KeyError(f"no predictor for layer {layer_idx}; predictors exist for layers {self.layers}")
        return self.by_layer[str(layer_idx)]

    def predict(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``layer_idx``'s predicted expert ids ``[..., K]`` from its pre-attention ``hidden`` ``[..., H]``."""
        return self[layer_idx].predict(hidden)
