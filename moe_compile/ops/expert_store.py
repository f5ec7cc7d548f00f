"""The expert store's two ops: ``moe_compile::offload_prefetch`` and ``moe_compile::moe_offload``.

Schemas::

    offload_prefetch(predicted_ids [T, K], store, layer) -> int64 [1]        # a token, on the host
    moe_offload(hidden [T, H], topk_ids [T, K], topk_weights [T, K], token?, store, layer, spec) -> [T, H]

Put in graphs by :mod:`moe_compile.passes.offload_experts`, :mod:`moe_compile.passes.predicted_gather`
and :mod:`moe_compile.passes.insert_predictors`; ``store`` is the handle of an
:class:`~moe_compile.runtime.expert_store.ExpertStore`, whose docstring gives the protocol.
"""

from __future__ import annotations

import torch

from ..moe_math import moe_torch
from ..runtime.expert_store import get_store
from ..spec import ExpertSpec

__all__ = ["moe_offload", "offload_prefetch"]


@torch.library.custom_op("moe_compile::offload_prefetch", mutates_args=())
def offload_prefetch(predicted_ids: torch.Tensor, store: int, layer: int) -> torch.Tensor:
    """Start bringing the predicted experts (``[T, K]``, union over tokens) into ``layer``'s buffer.

    Returns a token ``int64 [1]`` (the prefetch's sequence number) for ``moe_offload``.
    """
    # NOTE: host sync: the predicted ids are read on the host to choose what to bring.
    # NOTE: collective (RanksSource): the union over ranks, then an async all-gather waited on in moe_offload.
    experts = torch.unique(predicted_ids).tolist()
    seq = get_store(store).prefetch(layer, experts)
    return torch.tensor([seq], dtype=torch.int64)  # [1] on the host: reading it later needs no sync


@offload_prefetch.register_fake
def _offload_prefetch_fake(predicted_ids, store, layer):
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("moe_compile::moe_offload", mutates_args=())
def moe_offload(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    token: torch.Tensor | None,
    store: int,
    layer: int,
    spec: str,
) -> torch.Tensor:
    """The canonical MoE op (``[T, H] -> [T, H]``) on ``layer``'s experts, fetched ahead or on demand."""
    seq = int(token[0]) if token is not None else None  # a host tensor: no sync
    # NOTE: host sync: the routed expert ids are read on the host to bring those not prefetched.
    # NOTE: collective (RanksSource): every rank takes part in the on-demand union and gather, even needing nothing.
    routed = torch.unique(topk_ids).tolist()
    w = get_store(store).experts(layer, seq, routed)  # role -> [E, ...] device buffer
    return moe_torch(
        hidden, topk_ids, topk_weights, w["w_up"], w["w_down"], w.get("b_up"), w.get("b_down"), ExpertSpec.decode(spec)
    )  # [T, H]


@moe_offload.register_fake
def _moe_offload_fake(hidden, topk_ids, topk_weights, token, store, layer, spec):
    torch._check(hidden.dim() == 2, lambda: f"moe_offload: hidden must be [T, H], got {tuple(hidden.shape)}")
    torch._check(topk_weights.shape == topk_ids.shape, lambda: "moe_offload: topk_weights and topk_ids differ in shape")
    return hidden.new_empty(hidden.shape)
