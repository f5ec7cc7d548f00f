"""A reference expert-parallel (EP) MoE, written the way torchtitan-style code runs experts over ranks.

Shape legend: ``T`` tokens on this rank, ``K`` experts per token, ``H`` hidden size,
``W`` ranks, ``E`` experts in all, ``E_r = E/W`` experts on this rank, ``S = T*K``
(token, expert) pairs this rank sends, ``R`` pairs it receives.

Rank ``r`` holds experts ``[r*E_r, (r+1)*E_r)`` as parameters ``[E_r, ...]`` (the same
split as :mod:`moe_compile.runtime.shards`) and its own tokens. One forward of
:class:`ExpertParallelExperts` is::

    order_S  = argsort(ids_TK.flatten())                 # pairs grouped by expert, hence by owner rank
    send_W   = counts of pairs per owner rank
    recv_W   = all_to_all_single(send_W)                 # count exchange (functional collective)
    send, recv = .tolist()                               # NOTE: host sync (split sizes)
    x_RH     = all_to_all_single(x_TH[order_S // K], recv, send)     # dispatch
    ids_R    = all_to_all_single(ids - owner * E_r, recv, send)      # local expert ids
    y_RH     = batched_experts(x_RH, ids_R[:, None], ones)          # local experts, one per row, weight 1
    y_SH     = all_to_all_single(y_RH, send, recv)                   # combine
    out_TH   = sum_k weights_TK * unsort(y_SH)                       # weighted sum on the sender

It uses only functional collectives (``torch.distributed._functional_collectives``) and
traces into one Dynamo graph when ``torch._dynamo.config.capture_scalar_outputs`` is on
(:func:`traceable`): the split sizes become unbacked SymInts. The backend's pass
:mod:`moe_compile.passes.recognize_expert_parallel` recognises exactly this pattern.

:class:`ExpertParallelMoE` adds a softmax top-k router (renormalised, as Qwen3-MoE),
:class:`ExpertParallelLM` stacks blocks into a tiny language model, and
:meth:`ExpertParallelLM.from_full` builds rank ``r``'s model from a full-expert one, so
tests compare it with the single-process model on the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from ..moe_math import activate
from ..runtime.shards import shard
from ..spec import ExpertSpec


@contextlib.contextmanager
def traceable() -> Iterator[None]:
    """Dynamo settings under which the module traces into one graph (split sizes as unbacked SymInts)."""
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        yield


def _all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group: object) -> torch.Tensor:
    # NOTE: collective (AllToAll, uneven splits); waited at once
    return funcol.wait_tensor(funcol.all_to_all_single(x, out_splits, in_splits, group))


def batched_experts(
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])``, each pair gathering its expert's weights: ``[T, H]``.

    ``w_up [E, N, H]``, ``w_down [E, H, I]`` (``[E, H, N]``/``[E, I, H]`` when ``spec.transposed``).
    """
    T, K = ids_TK.shape
    ids_P = ids_TK.reshape(-1)  # P = T*K pairs
    x_P1H = x_TH.repeat_interleave(K, dim=0).unsqueeze(1)
    up_PNH = w_up[ids_P]
    up_PN = torch.bmm(x_P1H, up_PNH if spec.transposed else up_PNH.transpose(1, 2)).squeeze(1)
    if b_up is not None:
        up_PN = up_PN + b_up[ids_P]
    act_P1I = activate(up_PN, spec).unsqueeze(1)
    down_PIH = w_down[ids_P]
    y_PH = torch.bmm(act_P1I, down_PIH if spec.transposed else down_PIH.transpose(1, 2)).squeeze(1)
    if b_down is not None:
        y_PH = y_PH + b_down[ids_P]
    y_PH = y_PH * weights_TK.reshape(-1, 1)
    return y_PH.view(T, K, -1).sum(dim=1)


class ExpertParallelExperts(nn.Module):
    """This rank's ``E_r`` experts; ``forward(x_TH, ids_TK, weights_TK)`` with global expert ids -> ``[T, H]``."""

    def __init__(
        self,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        b_up: torch.Tensor | None = None,
        b_down: torch.Tensor | None = None,
        spec: ExpertSpec = ExpertSpec(),
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self.w_up = nn.Parameter(w_up, requires_grad=False)  # [E_r, N, H]
        self.w_down = nn.Parameter(w_down, requires_grad=False)  # [E_r, H, I]
        self.b_up = nn.Parameter(b_up, requires_grad=False) if b_up is not None else None  # [E_r, N]
        self.b_down = nn.Parameter(b_down, requires_grad=False) if b_down is not None else None  # [E_r, H]
        self.spec = spec
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)

    def forward(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        T, K = ids_TK.shape
        W, E_r, H = self.world_size, self.w_up.shape[0], x_TH.shape[-1]
        ids_S = ids_TK.reshape(-1)
        order_S = torch.argsort(ids_S, stable=True)  # pairs sorted by expert, hence by owner rank
        sorted_ids_S = ids_S[order_S]
        owner_S = torch.div(sorted_ids_S, E_r, rounding_mode="floor")
        send_W = torch.zeros(W, dtype=torch.long, device=x_TH.device).index_add(0, owner_S, torch.ones_like(owner_S))
        recv_W = _all_to_all(send_W, [1] * W, [1] * W, self.group)  # count exchange
        # NOTE: host sync: the split sizes of the dispatch and combine AllToAlls
        sizes = torch.cat([send_W, recv_W]).tolist()
        send, recv = sizes[:W], sizes[W:]
        for size in sizes:
            torch._check(size >= 0)
        torch._check(sum(send) == T * K)
        x_SH = x_TH[torch.div(order_S, K, rounding_mode="floor")]
        x_RH = _all_to_all(x_SH, recv, send, self.group)  # dispatch
        ids_R = _all_to_all(sorted_ids_S - owner_S * E_r, recv, send, self.group)  # local expert ids
        # the local experts run one expert per row, with weight 1: the routing weights never travel
        ids_R1, ones_R1 = ids_R.unsqueeze(1), torch.ones(ids_R.shape[0], 1, dtype=x_RH.dtype, device=x_RH.device)
        y_RH = batched_experts(x_RH, ids_R1, ones_R1, self.w_up, self.w_down, self.b_up, self.b_down, self.spec)
        y_SH = _all_to_all(y_RH, send, recv, self.group)  # combine
        unsorted_SH = torch.empty_like(y_SH).index_copy(0, order_S, y_SH)
        return self.weighted_sum(unsorted_SH.view(T, K, H), weights_TK)

    def weighted_sum(self, y_TKH: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] * y[t, k]``: ``[T, K, H] -> [T, H]``."""
        return (y_TKH * weights_TK.unsqueeze(-1)).sum(dim=1)


def route(router: nn.Linear, x_TH: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax, top-k, renormalised (Qwen3-MoE with ``norm_topk_prob``): ids and weights ``[T, K]``."""
    probs_TE = torch.softmax(router(x_TH), dim=-1)
    weights_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
    return ids_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


class ExpertParallelMoE(nn.Module):
    """Softmax router, top-k, renormalised; the experts are :class:`ExpertParallelExperts`."""

    def __init__(self, router: nn.Linear, experts: ExpertParallelExperts, top_k: int):
        super().__init__()
        self.router = router
        self.experts = experts
        self.top_k = top_k

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        ids_TK, weights_TK = route(self.router, x_TH, self.top_k)
        return self.experts(x_TH, ids_TK, weights_TK).view(x_BSH.shape)


class FullMoE(nn.Module):
    """The same block with all ``E`` experts on one process (the single-process reference)."""

    def __init__(self, hidden: int = 32, inter: int = 16, experts: int = 8, top_k: int = 2):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.2)  # [E, 2I, H]
        self.w_down = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)  # [E, H, I]
        self.top_k = top_k

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        ids_TK, weights_TK = route(self.router, x_TH, self.top_k)
        out_TH = batched_experts(x_TH, ids_TK, weights_TK, self.w_up, self.w_down, None, None, ExpertSpec())
        return out_TH.view(x_BSH.shape)


class ExpertParallelLM(nn.Module):
    """Embedding, ``layers`` residual MoE blocks, a head: :class:`FullMoE` blocks or their EP form."""

    def __init__(self, vocab: int = 64, hidden: int = 32, layers: int = 2, **moe_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(FullMoE(hidden=hidden, **moe_kwargs) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return self.head(x)

    def to_expert_parallel(self, group: dist.ProcessGroup | None = None) -> ExpertParallelLM:
        """This rank's EP model (in place): each block keeps experts ``[r*E/W, (r+1)*E/W)`` and AllToAlls tokens."""
        group = group if group is not None else dist.group.WORLD
        W, r = dist.get_world_size(group), dist.get_rank(group)
        for i, block in enumerate(self.blocks):
            if not isinstance(block, FullMoE):
                continue
            experts = ExpertParallelExperts(
                shard(block.w_up.detach(), W, r), shard(block.w_down.detach(), W, r), group=group
            )
            self.blocks[i] = ExpertParallelMoE(block.router, experts, block.top_k)
        return self
