"""Token alignment: sort the (token, expert) pairs by expert, pad each expert to ``BLOCK_M``.

The grouped GEMMs (:mod:`moe_compile.kernels.grouped_gemm`) give every program one
block of ``BLOCK_M`` rows that all belong to one expert. This module builds that
block layout on the device, without a host sync (no ``.item()``/``.tolist()``),
so the whole MoE launch can be captured in a CUDA graph.

Shape legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``S = T*K``
pairs (pair ``s`` is token ``s // K``, slot ``s % K``), ``P`` the static upper
bound on padded rows, ``B = P / BLOCK_M`` blocks.

What it computes::

    pair_ids_P[p]     pair id at padded sorted position p (S marks a padding row)
    block_expert_B[b] expert of block b (E - 1 for blocks past the valid ones)
    num_blocks_1[0]   number of valid blocks; programs on blocks >= it return early

Each expert's pairs keep their original (stable) order and its segment starts at a
multiple of ``BLOCK_M``. Because only experts that receive a pair need padding, at
most ``min(E, S)`` segments are padded, so ``P = S + min(E, S) * (BLOCK_M - 1)``
rounded up to a multiple of ``BLOCK_M`` bounds the padded length statically.

The implementation is a handful of sort/scan/scatter torch ops (none of which
syncs with the host on CUDA: no ``bincount``, whose CUDA kernel reads the max on
the host); the obvious Python loop, the tests' reference, is in
``tests/kernel_tests/references.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Alignment", "align", "padded_bound"]


class Alignment(NamedTuple):
    pair_ids_P: torch.Tensor  # int32 [P], padded sorted pair ids; S marks padding
    block_expert_B: torch.Tensor  # int32 [B], expert of each block
    num_blocks_1: torch.Tensor  # int32 [1], number of valid blocks


def padded_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound ``P`` on the padded row count, a multiple of ``block_m``."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def _check(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"align: topk_ids must be [T, K], got shape {tuple(topk_ids_TK.shape)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"align: topk_ids must be int32 or int64, got {topk_ids_TK.dtype}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"align: need num_experts >= 1 and block_m >= 1, got {num_experts}, {block_m}")


def align(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Device-side alignment (no host sync). Expert ids must lie in ``[0, E)`` (not checked: that would sync)."""
    _check(topk_ids_TK, num_experts, block_m)
    device = topk_ids_TK.device
    E = num_experts
    ids_S = topk_ids_TK.reshape(-1).long()  # [S]
    S = ids_S.numel()
    P = padded_bound(S, E, block_m)

    counts_E = torch.zeros(E, dtype=torch.long, device=device).scatter_add_(0, ids_S, torch.ones_like(ids_S))
    padded_E = (counts_E + block_m - 1) // block_m * block_m  # [E] segment lengths
    padded_end_E = torch.cumsum(padded_E, 0)  # [E] inclusive ends
    padded_start_E = padded_end_E - padded_E  # [E]
    start_E = torch.cumsum(counts_E, 0) - counts_E  # [E] unpadded starts

    order_S = torch.argsort(ids_S, stable=True)  # [S] pair ids sorted by expert
    sorted_ids_S = ids_S[order_S]  # [S]
    rank_S = torch.arange(S, device=device) - start_E[sorted_ids_S]  # [S] position inside the expert
    dest_S = padded_start_E[sorted_ids_S] + rank_S  # [S] padded position

    pair_ids_P = torch.full((P,), S, dtype=torch.int32, device=device)
    pair_ids_P.scatter_(0, dest_S, order_S.to(torch.int32))

    block_starts_B = torch.arange(0, P, block_m, device=device)  # [B]
    block_expert_B = torch.searchsorted(padded_end_E, block_starts_B, right=True).clamp_(max=E - 1)
    num_blocks_1 = (padded_end_E[-1:] // block_m).to(torch.int32)  # [1]
    return Alignment(pair_ids_P, block_expert_B.to(torch.int32), num_blocks_1)
