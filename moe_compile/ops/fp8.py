"""FP8 block-scaled experts and dense layers: ``moe_compile::moe_fp8``, ``moe_fp8_triton`` and ``fp8_linear``.

``moe_compile::moe_fp8(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, spec)``
is the canonical op (:mod:`.moe`) for experts whose weights are ``float8_e4m3fn`` with one fp32 scale per
``spec.block_n x spec.block_k`` block (``spec.quant == "fp8_block"``)::

    w_up [E, N, H] e4m3    w_up_scale   [E, NB_up, ceil(H / block_k)] fp32
    w_down [E, H, I] e4m3  w_down_scale [E, ceil(H / block_n), ceil(I / block_k)] fp32

It computes W8A8 with dynamic per-token activation quantization, the arithmetic stated in
:mod:`moe_compile.quant.fp8` (its torch implementation, :func:`~moe_compile.quant.fp8.moe_fp8_torch`, is this
op's). ``moe_compile::moe_fp8_triton`` has the same schema and runs :mod:`moe_compile.kernels.fp8_moe`.
``moe_compile::fp8_linear(x, weight, weight_scale, bias, block_n, block_k)`` is a dense block-fp8 linear
(transformers' ``FP8Linear``) on the same arithmetic.
"""

from __future__ import annotations

import torch

from ..quant.fp8 import check_fp8_inputs, check_weight_scales, moe_fp8_torch
from ..quant.fp8 import fp8_linear as _fp8_linear
from ..spec import ExpertSpec

__all__ = ["fp8_linear", "moe_fp8", "moe_fp8_triton"]


@torch.library.custom_op("moe_compile::moe_fp8", mutates_args=())
def moe_fp8(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up_scale: torch.Tensor,
    w_down_scale: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """The canonical MoE op on block-fp8 expert weights (W8A8), torch implementation."""
    s = ExpertSpec.decode(spec)
    check_fp8_inputs(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, s)
    return moe_fp8_torch(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, s)


@moe_fp8.register_fake
def moe_fp8_fake(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, spec):
    s = ExpertSpec.decode(spec)
    check_fp8_inputs(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, s)
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moe_compile::moe_fp8_triton", mutates_args=())
def moe_fp8_triton(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up_scale: torch.Tensor,
    w_down_scale: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: str,
) -> torch.Tensor:
    """``moe_compile::moe_fp8`` on the Triton kernels (same schema, same arithmetic)."""
    from ..kernels.fp8_moe import fused_moe_fp8

    s = ExpertSpec.decode(spec)
    return fused_moe_fp8(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, s)


moe_fp8_triton.register_fake(moe_fp8_fake)


@torch.library.custom_op("moe_compile::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    """A dense block-fp8 linear, ``[..., K] -> [..., N]`` in ``x``'s dtype (W8A8, :mod:`moe_compile.quant.fp8`)."""
    check_weight_scales("fp8_linear", weight, weight_scale, (block_n, block_k))
    return _fp8_linear(x, weight, weight_scale, bias, (block_n, block_k))


@fp8_linear.register_fake
def fp8_linear_fake(x, weight, weight_scale, bias, block_n, block_k):
    check_weight_scales("fp8_linear", weight, weight_scale, (block_n, block_k))
    return x.new_empty(*x.shape[:-1], weight.shape[0])
