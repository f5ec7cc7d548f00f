"""``moe_compile::moe_ep``: the canonical op with experts spread over the ranks, tokens sent by AllToAll.

Schema: the canonical op's arguments (:mod:`.moe`, this rank's expert shards ``[E/W, ...]`` as the
weights) plus the process group's name, its size and the local experts' implementation
(``"torch"`` or ``"triton"``); returns ``[T, H]``. Put in graphs by
:mod:`moe_compile.passes.expert_parallel`; implemented by
:func:`moe_compile.runtime.ep.expert_parallel_moe` (collective: every rank calls it in the same order).
"""

from __future__ import annotations

import torch

from ..moe_math import check_inputs
from ..runtime.ep import expert_parallel_moe
from ..spec import ExpertSpec

__all__ = ["moe_ep"]


@torch.library.custom_op("moe_compile::moe_ep", mutates_args=())
def moe_ep(
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
    check_inputs(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, ExpertSpec.decode(spec))
    return expert_parallel_moe(
        hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec, group_name, world_size, impl
    )


@moe_ep.register_fake
def _moe_ep_fake(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec, group_name, world_size, impl):
    check_inputs(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, ExpertSpec.decode(spec))
    return hidden.new_empty(hidden.shape)
