"""The torch references of the kernels' stages (fp32, host-side loops): what each Triton stage must compute."""

from __future__ import annotations

import torch

from moe_compile.kernels.align import Alignment, padded_bound
from moe_compile.moe_math import activate
from moe_compile.spec import ExpertSpec


def align_reference(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The obvious loop (host side, tests only); same layout as :func:`align`."""
    ids = topk_ids_TK.reshape(-1).tolist()
    S = len(ids)
    P = padded_bound(S, num_experts, block_m)
    pair_ids: list[int] = []
    block_expert: list[int] = []
    for e in range(num_experts):
        mine = [s for s, i in enumerate(ids) if i == e]
        if not mine:
            continue
        n_blocks = -(-len(mine) // block_m)
        pair_ids += mine + [S] * (n_blocks * block_m - len(mine))
        block_expert += [e] * n_blocks
    num_blocks = len(block_expert)
    pair_ids += [S] * (P - len(pair_ids))
    block_expert += [num_experts - 1] * (P // block_m - num_blocks)
    device = topk_ids_TK.device
    return Alignment(
        torch.tensor(pair_ids, dtype=torch.int32, device=device),
        torch.tensor(block_expert, dtype=torch.int32, device=device),
        torch.tensor([num_blocks], dtype=torch.int32, device=device),
    )


def up_reference(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """``act_SI [S, I]`` in fp32, one gathered weight matrix per pair."""
    K = topk_ids_TK.shape[1]
    ids_S = topk_ids_TK.reshape(-1).long()
    x_SH = hidden_TH.float().repeat_interleave(K, dim=0)
    w_SHN = w_up.float()[ids_S] if spec.transposed else w_up.float()[ids_S].transpose(1, 2)
    up_SN = torch.einsum("sh,shn->sn", x_SH, w_SHN)
    if b_up_EN is not None:
        up_SN = up_SN + b_up_EN.float()[ids_S]
    return activate(up_SN, spec)


def down_reference(
    act_SI: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """Weighted per-pair rows ``y_SH [S, H]`` in fp32."""
    ids_S = topk_ids_TK.reshape(-1).long()
    w_SIH = w_down.float()[ids_S] if spec.transposed else w_down.float()[ids_S].transpose(1, 2)
    y_SH = torch.einsum("si,sih->sh", act_SI.float(), w_SIH)
    if b_down_EH is not None:
        y_SH = y_SH + b_down_EH.float()[ids_S]
    return y_SH * topk_weights_TK.reshape(-1, 1).float()
