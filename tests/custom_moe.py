"""MoE modules written by hand, as a user of moe_compile might have them."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class CustomMoE(nn.Module):
    """Sigmoid router, top-k, renormalised; each (token, expert) pair gathers its expert's weights.

    ``post_norm=True`` normalises each expert's output before weighting it (not a
    canonical MoE: the backend must leave it alone). ``weight_input=True`` scales
    the experts' *input* by the routing weight, as Llama 4 does (also not canonical).
    ``sentinel="zero"`` zeroes the rows of ids ``>= experts`` (expert-parallel sentinels, never
    present here) with ``torch.where(mask, 0.0, x)``, the form Inductor gives ``masked_fill``;
    ``sentinel="rows"`` replaces them with other rows instead (not a masked fill).
    ``pre_norm=True`` routes on the block's input but feeds the experts its LayerNorm, computed
    after the router (Gemma 4's order: the ids come before the experts' input in the graph).
    """

    def __init__(
        self, hidden=32, inter=16, experts=4, k=2, post_norm=False, weight_input=False, sentinel=None, pre_norm=False
    ):
        super().__init__()
        self.k = k
        self.experts = experts
        self.sentinel = sentinel
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.2)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)
        self.norm = nn.LayerNorm(hidden) if post_norm else None
        self.pre_norm = nn.LayerNorm(hidden) if pre_norm else None
        self.weight_input = weight_input

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        scores_TE = torch.sigmoid(self.router(x_TH))
        w_TK, ids_TK = scores_TE.topk(self.k, dim=-1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        ids_P = ids_TK.reshape(-1)  # P = T*k pairs
        if self.pre_norm is not None:
            x_TH = self.pre_norm(x_TH)
        x_PH = x_TH.repeat_interleave(self.k, dim=0)
        if self.weight_input:
            x_PH = x_PH * w_TK.reshape(-1, 1)
        if self.sentinel is not None:
            outside_P1 = (ids_P >= self.experts).unsqueeze(-1)
            x_PH = torch.where(outside_P1, 0.0 if self.sentinel == "zero" else x_PH.flip(0), x_PH)
            ids_P = ids_P.clamp(max=self.experts - 1)
        up_PN = torch.bmm(self.w_up[ids_P], x_PH.unsqueeze(-1)).squeeze(-1)
        gate_PI, lin_PI = up_PN.chunk(2, dim=-1)
        y_PH = torch.bmm(self.w_down[ids_P], (F.silu(gate_PI) * lin_PI).unsqueeze(-1)).squeeze(-1)
        if self.norm is not None:
            y_PH = self.norm(y_PH)
        if not self.weight_input:
            y_PH = y_PH * w_TK.reshape(-1, 1)
        return y_PH.view(-1, self.k, H).sum(dim=1).view(B, S, H)


class TinyLM(nn.Module):
    """Embedding, ``layers`` residual MoE blocks (dense MLP in ``dense_layers``), a head."""

    def __init__(self, vocab=64, hidden=32, layers=2, dense_layers=(), block=None, **moe_kwargs):
        super().__init__()
        block = block or CustomMoE
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            if i in dense_layers
            else block(hidden=hidden, **moe_kwargs)
            for i in range(layers)
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return self.head(x)


class DenseScoredMoE(nn.Module):
    """Llama 4's form: every expert runs on every token, its input scaled by a dense ``[T, E]`` score.

    The score is ``sigmoid(scatter(full(fill), top-k ids, top-k logits))``: with ``fill=-inf`` it is exactly
    zero off the top k (a top-k MoE in dense form); with ``fill=0.0`` it is 0.5 there, so every expert
    contributes (dense compute, no MoE). ``bias=True`` gives the experts an up bias, so an expert with a zero
    input still adds ``down(act(b))`` (not a top-k MoE either).
    """

    def __init__(self, hidden=32, inter=16, experts=4, k=2, fill=float("-inf"), bias=False):
        super().__init__()
        self.k, self.experts, self.fill = k, experts, fill
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * inter) * 0.2)  # [E, H, 2I] as Llama 4
        self.down = nn.Parameter(torch.randn(experts, inter, hidden) * 0.2)
        self.b_up = nn.Parameter(torch.randn(experts, 2 * inter) * 0.2) if bias else None

    def forward(self, x_BSH):
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        logits_TE = self.router(x_TH)
        top_TK, ids_TK = torch.topk(logits_TE, self.k, dim=1)
        scores_TE = torch.sigmoid(torch.full_like(logits_TE, self.fill).scatter_(1, ids_TK, top_TK))
        routed_in = x_TH.repeat(self.experts, 1) * scores_TE.transpose(0, 1).reshape(-1, 1)
        gate_up = torch.bmm(routed_in.view(self.experts, -1, H), self.gate_up)
        if self.b_up is not None:
            gate_up = gate_up + self.b_up.unsqueeze(1)
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.bmm(up * F.silu(gate), self.down)
        return out.view(self.experts, -1, H).sum(dim=0).view(B, S, H)


class SwiGLUExpert(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """One module per expert, run by a data-dependent loop (breaks Dynamo's graph)."""

    def forward(self, x_TH, ids_TK, weights_TK):
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self):
            token, slot = torch.where(ids_TK == e)
            if token.numel():
                out_TH.index_add_(0, token, expert(x_TH[token]) * weights_TK[token, slot, None])
        return out_TH


class PerExpertMoE(nn.Module):
    """Softmax router, top-k, renormalised; experts are separate ``nn.Linear`` modules."""

    def __init__(self, hidden=32, inter=16, experts=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = ExpertList(SwiGLUExpert(hidden, inter) for _ in range(experts))

    def forward(self, x_BSH):
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH), dim=-1)
        w_TK, ids_TK = probs_TE.topk(self.k, dim=-1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return self.experts(x_TH, ids_TK, w_TK).view(x_BSH.shape)


class PerExpertLM(TinyLM):
    def __init__(self, layers=2, **kwargs):
        super().__init__(layers=layers)
        self.blocks = nn.ModuleList(PerExpertMoE(**kwargs) for _ in range(layers))
