"""The modules ``prepare`` puts in place of the forms it recognises; each computes its original's function.

- :class:`StackedExperts`: ``E`` experts as stacked weights, one ``moe_compile::moe`` call.
- :class:`PostNormExperts`: experts whose outputs each pass through one norm before their weight.
- :class:`RoutedExperts`: a self-routed MoE module as its router, a :class:`Routing` rule and stacked experts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..spec import ExpertSpec

__all__ = ["PostNormExperts", "RoutedExperts", "Routing", "StackedExperts", "routings"]


class StackedExperts(nn.Module):
    """``E`` experts as stacked weights, computed by one ``moe_compile::moe`` call.

    ``identity_experts``: ids ``E .. E + Z - 1`` name identity ("zero-computation") experts, whose
    output is the token itself times its weight (LongCat-Flash); they go to the op as expert 0 with
    weight 0 (the op has no "no expert" id, so expert 0 computes those rows for nothing) and their
    weighted input is added outside it. ``output_scale``: a constant factor on the output (NLLB-MoE's
    eval-time ``1 - moe_token_dropout``).
    """

    def __init__(
        self,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        b_up,
        b_down,
        spec: ExpertSpec,
        source: str,
        identity_experts: int = 0,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.num_experts = w_up.shape[0]
        self.w_up = nn.Parameter(w_up, requires_grad=False)  # [E, N, H]
        self.w_down = nn.Parameter(w_down, requires_grad=False)  # [E, H, I]
        self.b_up = nn.Parameter(b_up, requires_grad=False) if b_up is not None else None  # [E, N]
        self.b_down = nn.Parameter(b_down, requires_grad=False) if b_down is not None else None  # [E, H]
        self.spec = spec.encode()
        self.source = source
        self.identity_experts = identity_experts
        self.output_scale = output_scale

    def forward(self, hidden_states: torch.Tensor, selection: torch.Tensor, routing_weights: torch.Tensor):
        H = hidden_states.shape[-1]
        x_TH = hidden_states.reshape(-1, H)
        T = x_TH.shape[0]
        if selection.dim() == 3:  # one-hot mask [T, K, E]; an empty row (capacity overflow) drops the token
            mask_TKE = selection.reshape(T, -1, self.num_experts)
            ids_TK = mask_TKE.argmax(dim=-1)
            weights_TK = routing_weights.reshape(T, -1) * (mask_TKE.sum(dim=-1) > 0).to(routing_weights.dtype)
        else:
            ids_TK = selection.reshape(T, -1)
            weights_TK = routing_weights.reshape(T, -1)
        identity_T1 = None
        if self.identity_experts:
            is_identity_TK = ids_TK >= self.num_experts
            identity_T1 = (weights_TK * is_identity_TK).sum(dim=-1, keepdim=True)
            weights_TK = weights_TK * ~is_identity_TK
            ids_TK = ids_TK.masked_fill(is_identity_TK, 0)
        out_TH = torch.ops.moe_compile.moe(
            x_TH, ids_TK, weights_TK, self.w_up, self.w_down, self.b_up, self.b_down, self.spec
        )
        if identity_T1 is not None:
            out_TH = out_TH + (x_TH * identity_T1).to(out_TH.dtype)
        if self.output_scale != 1.0:
            out_TH = out_TH * self.output_scale
        return out_TH.view(hidden_states.shape)

    def extra_repr(self) -> str:
        extra = f", identity_experts={self.identity_experts}" if self.identity_experts else ""
        extra += f", output_scale={self.output_scale:g}" if self.output_scale != 1.0 else ""
        return f"num_experts={self.num_experts}, spec={self.spec}, source={self.source!r}{extra}"


class PostNormExperts(nn.Module):
    """Experts whose outputs each pass through one norm before their routing weight (MuseSpark's
    ``post_expert_norm``): ``sum_k w_k * norm(expert_k(x))``.

    The canonical op sums its pairs' outputs, so the norm cannot go after it; here each (token, expert)
    pair is its own row of one op call (``K = 1``, unit weight), the module's own norm runs on those
    rows, and the routing weights and the sum over ``k`` follow, outside the op.
    """

    def __init__(self, stacked: StackedExperts, norm: nn.Module, source: str):
        super().__init__()
        self.stacked = stacked
        self.norm = norm
        self.source = source

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        H = hidden_states.shape[-1]
        x_TH = hidden_states.reshape(-1, H)
        T, K = top_k_index.reshape(x_TH.shape[0], -1).shape
        x_PH = x_TH.repeat_interleave(K, dim=0)  # pair p = t * K + k
        ones_P1 = torch.ones(T * K, 1, dtype=top_k_weights.dtype, device=x_TH.device)
        y_PH = self.norm(self.stacked(x_PH, top_k_index.reshape(-1, 1), ones_P1))
        out_TH = (y_PH.view(T, K, H) * top_k_weights.reshape(T, K, 1)).sum(dim=1)
        return out_TH.to(hidden_states.dtype).view(hidden_states.shape)


@dataclasses.dataclass(frozen=True)
class Routing:
    """A top-k routing rule: ``logits [T, E]`` -> ``(weights [T, K] fp32, ids [T, K])``.

    ``score``: "softmax" or "sigmoid" of the logits, in fp32; ``order``: "score-topk" (score, then
    the k best) or "topk-softmax" (the k best logits, then a softmax over them);
    ``renormalise``: the k weights divided by their sum.
    """

    k: int
    score: str = "softmax"
    order: str = "score-topk"
    renormalise: bool = False

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order == "topk-softmax":
            top, ids = torch.topk(logits, self.k, dim=-1)
            return torch.softmax(top.float(), dim=-1), ids
        scores = torch.softmax(logits.float(), dim=-1) if self.score == "softmax" else torch.sigmoid(logits.float())
        weights, ids = torch.topk(scores, self.k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def describe(self) -> str:
        if self.order == "topk-softmax":
            return f"top-{self.k} of the logits -> softmax"
        return f"{self.score} -> top-{self.k}" + (" -> renormalise" if self.renormalise else "")


def routings(num_experts: int):
    for k in range(1, min(num_experts, 8) + 1):
        yield Routing(k, "softmax", "score-topk", False)
        yield Routing(k, "softmax", "score-topk", True)
        yield Routing(k, "softmax", "topk-softmax", False)
        yield Routing(k, "sigmoid", "score-topk", False)
        yield Routing(k, "sigmoid", "score-topk", True)


class RoutedExperts(nn.Module):
    """A MoE module that routed its tokens itself, as its router, a :class:`Routing` and stacked experts."""

    def __init__(
        self,
        router: nn.Linear,
        experts: StackedExperts,
        routing: Routing,
        returns_logits: bool,
        source: str,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.routing = routing
        self.returns_logits = returns_logits
        self.source = source
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # [H], after the experts

    def forward(self, hidden_states: torch.Tensor):
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE = self.router(x_TH)
        weights_TK, ids_TK = self.routing(logits_TE)
        out = self.experts(x_TH, ids_TK, weights_TK.to(x_TH.dtype)).view(hidden_states.shape)
        if self.bias is not None:
            out = out + self.bias
        return (out, logits_TE) if self.returns_logits else out

    def extra_repr(self) -> str:
        return f"routing={self.routing.describe()}, returns_logits={self.returns_logits}"
