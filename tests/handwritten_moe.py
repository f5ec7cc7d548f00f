"""MoE modules as users write them by hand: each routes its own tokens over a list of expert MLPs.

- ``loop``: the Mixtral-era reference code, a loop over experts gathering the tokens routed to
  each (``torch.where`` on a one-hot mask, ``index_add_``): data-dependent, Dynamo breaks on it;
- ``dense``: every expert on every token, weighted by a routing weight that is zero where the
  expert was not chosen (traceable, and E/k times the FLOPs);
- ``einsum``: GShard/Switch style, one-hot dispatch and combine tensors through ``einsum``, with
  an optional capacity per expert (tokens over it are dropped: then it is not a top-k MoE).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.act, self.gated = ACTIVATIONS[act], gated
        self.w1 = nn.Linear(hidden, inter, bias=bias)
        self.w3 = nn.Linear(hidden, inter, bias=bias) if gated else None
        self.w2 = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        h = self.act(self.w1(x)) * self.w3(x) if self.gated else self.act(self.w1(x))
        return self.w2(h)


class HandwrittenMoE(nn.Module):
    def __init__(self, form, hidden=32, inter=16, experts=4, k=2, act="silu", gated=True, bias=False,
                 renormalise=True, capacity=None):  # fmt: skip
        super().__init__()
        self.form, self.k, self.renormalise, self.capacity = form, k, renormalise, capacity
        self.num_experts = experts
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inter, act, gated, bias) for _ in range(experts))

    def route(self, x_TH):
        logits = self.gate(x_TH)
        weights = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x_TH.dtype), selected

    def forward(self, hidden):
        B, S, H = hidden.shape
        x = hidden.view(-1, H)
        logits, weights, selected = self.route(x)
        out = getattr(self, f"_{self.form}")(x, weights, selected)
        return out.view(B, S, H), logits

    def _loop(self, x, weights, selected):
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [E, K, T]
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out

    def _dense(self, x, weights, selected):
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        dense = dense.scatter(1, selected, weights)  # [T, E]: zero where an expert was not chosen
        return sum(dense[:, e : e + 1] * expert(x) for e, expert in enumerate(self.experts))

    def _einsum(self, x, weights, selected):
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, selected, weights)  # [T, E]
        dispatch = (combine != 0).to(x.dtype)
        if self.capacity is not None:  # the first `capacity` tokens of each expert, the rest dropped
            keep = (torch.cumsum(dispatch, dim=0) <= self.capacity).to(x.dtype)
            dispatch, combine = dispatch * keep, combine * keep
        expert_in = torch.einsum("te,th->eth", dispatch, x)
        expert_out = torch.stack([expert(expert_in[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("te,eth->th", combine, expert_out)


class HandwrittenLM(nn.Module):
    """Embedding, ``layers`` residual MoE layers (each behind an RMS norm), LM head."""

    def __init__(self, form, vocab=64, hidden=32, layers=2, **moe_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(HandwrittenMoE(form, hidden=hidden, **moe_kwargs) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            h = h + moe(norm(h))[0]
        return self.head(h)
