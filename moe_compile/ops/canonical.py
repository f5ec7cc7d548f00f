"""The canonical MoE op ``moe_compile::moe`` and ``moe_compile::moe_triton``: names, schema, fake, dispatch.

What the op computes is :mod:`moe_compile.moe_math` (its semantics, :func:`~moe_compile.moe_math.moe_torch`
the default implementation, :func:`~moe_compile.moe_math.moe_reference` the per-pair loop for tests).

``moe_compile::moe_triton`` has exactly this op's schema and fake; its implementation is
:func:`moe_compile.kernels.fused_moe.fused_moe` (imported on first call: registering the op
does not import Triton).

The module is ``canonical``, not ``moe``: ``moe_compile.ops.moe`` is the op object.
"""

from __future__ import annotations

import torch

from ..moe_math import check_inputs, moe_torch
from ..spec import ExpertSpec

__all__ = ["moe", "moe_fake", "moe_impl", "moe_triton"]


def moe_impl(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """What ``moe_compile::moe`` computes, callable without the dispatcher.

    The backend's eagerly run graphs call it directly (``backend._direct_calls``): the custom
    op's dispatch costs about 40 us a call on CPU, a few percent of a small model's forward.
    """
    s = ExpertSpec.decode(spec)
    check_inputs(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, s)
    if hidden.is_meta or w_up.is_meta:  # what the op's Meta kernel (its fake) answers: shapes only
        return hidden.new_empty(hidden.shape)
    return moe_torch(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, s)


#: ``hidden [T, H]``, ``topk_ids [T, K]``, ``topk_weights [T, K]`` and the expert weights -> ``[T, H]``
moe = torch.library.custom_op("moe_compile::moe", mutates_args=())(moe_impl)


@moe.register_fake
def moe_fake(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec):
    """Shapes of the canonical op; every op with its schema (``moe_triton``…) registers this one."""
    check_inputs(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, ExpertSpec.decode(spec))
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moe_compile::moe_triton", mutates_args=())
def moe_triton(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """``moe_compile::moe`` on the Triton kernels (same schema, same semantics)."""
    from ..kernels.fused_moe import fused_moe

    return fused_moe(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, ExpertSpec.decode(spec))


moe_triton.register_fake(moe_fake)
