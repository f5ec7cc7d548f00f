"""Expert parallelism with AllToAll, the baseline AEP is measured against: what ``moe_compile::moe_ep`` runs.

Shape legend: ``T`` tokens on this rank, ``K`` experts per token, ``H`` hidden
size, ``W`` ranks, ``E`` experts in all, ``E_r = E/W`` experts on this rank,
``S = T*K`` (token, expert) pairs sent by this rank, ``R`` pairs received.

Each rank holds experts ``[r*E_r, (r+1)*E_r)`` (see :mod:`.shards`) and its own
tokens. One call computes the canonical op (:mod:`moe_compile.ops`) for this
rank's tokens, in four steps, one function each:

1. :func:`exchange_counts` — how many pairs go to each rank; AllToAll of ``[W]``
   counts, then a host sync (the split sizes of the next two AllToAlls);
2. :func:`dispatch` — the pairs' hidden rows and local expert ids to their owners;
3. the owner runs its local experts on what it received (the canonical op with
   one expert per row and weight 1);
4. :func:`combine` — the outputs back to the ranks the pairs came from, where
   they are weighted by the routing weights and summed over ``K`` exactly as the
   canonical op does.

The routing weights never travel. All ranks must call the op the same number of
times in the same order (it is collective). Arguments are the canonical op's,
with this rank's shards for the weights, plus the group's name, its size, and
the implementation of the local experts (``"torch"`` or ``"triton"``). The op, its schema and
its fake are in :mod:`moe_compile.ops.ep`; :func:`expert_parallel_moe` is its implementation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..spec import ExpertSpec

_c10d = torch.ops._c10d_functional


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_to_all_single(x, out_splits, in_splits, group_name))


def exchange_counts(dest_S: torch.Tensor, world_size: int, group_name: str) -> tuple[list[int], list[int]]:
    """Pairs this rank sends to each rank, and receives from each: two lists of ``W`` ints."""
    send_W = torch.bincount(dest_S, minlength=world_size)  # [W]
    recv_W = _all_to_all(send_W, [1] * world_size, [1] * world_size, group_name)  # [W]
    # NOTE: host sync: the split sizes of the dispatch and combine AllToAlls must be known on the host.
    return send_W.tolist(), recv_W.tolist()


def dispatch(
    x_SH: torch.Tensor, local_ids_S: torch.Tensor, send: list[int], recv: list[int], group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by destination rank go to their owners: ``[S, H], [S] -> [R, H], [R]``."""
    x_RH = _all_to_all(x_SH, recv, send, group_name)  # NOTE: collective (AllToAll, uneven splits)
    ids_R = _all_to_all(local_ids_S, recv, send, group_name)  # NOTE: collective
    return x_RH, ids_R


def combine(y_RH: torch.Tensor, send: list[int], recv: list[int], group_name: str) -> torch.Tensor:
    """Expert outputs back to the ranks their rows came from: ``[R, H] -> [S, H]``."""
    return _all_to_all(y_RH, send, recv, group_name)  # NOTE: collective (AllToAll, uneven splits)


def _local_experts(
    x_RH: torch.Tensor,
    ids_R: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
    impl: str,
) -> torch.Tensor:
    """Each received row through its (local) expert, unweighted: ``[R, H] -> [R, H]``."""
    if x_RH.shape[0] == 0:
        return x_RH.new_empty(x_RH.shape)
    ones_R1 = torch.ones(x_RH.shape[0], 1, dtype=x_RH.dtype, device=x_RH.device)
    op = torch.ops.moe_compile.moe_triton if impl == "triton" else torch.ops.moe_compile.moe
    return op(x_RH, ids_R.unsqueeze(1), ones_R1, w_up, w_down, b_up, b_down, spec)


def expert_parallel_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
    group_name: str,
    world_size: int,
    impl: str,
) -> torch.Tensor:
    """The canonical op for this rank's tokens, with experts spread over ``world_size`` ranks."""
    group_size = dist.get_world_size(dist.distributed_c10d._resolve_process_group(group_name))
    torch._check(
        group_size == world_size,
        lambda: f"moe_ep: compiled for world size {world_size}, but group {group_name!r} has {group_size} ranks",
    )
    T, K = topk_ids.shape
    E_r = w_up.shape[0]  # experts on this rank
    ids_S = topk_ids.reshape(-1).long()
    order_S = torch.argsort(ids_S, stable=True)  # pairs sorted by expert, hence by owning rank
    sorted_ids_S = ids_S[order_S]
    dest_S = sorted_ids_S // E_r  # owning rank of each pair
    send, recv = exchange_counts(dest_S, world_size, group_name)

    weights_S1 = topk_weights.reshape(-1)[order_S].unsqueeze(-1)
    x_SH = hidden[order_S // K]
    if ExpertSpec.decode(spec).scale_input:  # the weight scales the input, on the sender; the output is not weighted
        x_SH, weights_S1 = x_SH * weights_S1.to(x_SH.dtype), torch.ones_like(weights_S1)
    x_RH, ids_R = dispatch(x_SH, sorted_ids_S - dest_S * E_r, send, recv, group_name)
    y_RH = _local_experts(x_RH, ids_R, w_up, w_down, b_up, b_down, spec, impl)
    y_SH = combine(y_RH, send, recv, group_name)

    # weight and sum over K as moe_compile.ops.moe_torch does, so the results match it
    weighted_SH = y_SH.to(w_up.dtype) * weights_S1
    unsorted_SH = torch.empty_like(weighted_SH).index_copy_(0, order_S, weighted_SH)
    return unsorted_SH.view(T, K, hidden.shape[1]).sum(dim=1).to(hidden.dtype)
