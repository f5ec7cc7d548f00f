"""The Triton MoE layer: align -> up (+activation) -> down (x routing weight) -> reduce.

Shape legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden,
``I`` intermediate, ``N`` up width, ``S = T*K`` pairs.

What it computes is ``moe_compile::moe`` (:mod:`moe_compile.moe_math`)::

    out[t] = sum_k  topk_weights[t, k] * down_e(act(up_e(hidden[t]))),   e = topk_ids[t, k]

:func:`fused_moe` is the Python entry point; ``moe_compile::moe_triton`` (registered in
:mod:`moe_compile.ops.canonical`, which imports this module on the op's first call) is the same
function as a custom op with exactly the schema of ``moe_compile::moe``, so a graph pass can swap
one for the other by target alone. Nothing on the launch path syncs with the host (grids come
from shapes, valid block counts stay on the device), so the layer can be captured in a CUDA graph;
the opt-in autotune (``MOE_COMPILE_AUTOTUNE=1``) is the exception and runs once per shape beforehand.
The torch reference is :func:`moe_compile.moe_math.moe_reference`. This package imports the maths,
never :mod:`moe_compile.ops` (a test of the import graph keeps it so).
"""

from __future__ import annotations

import torch
import triton

from ..moe_math import check_inputs
from ..spec import ExpertSpec
from .align import align
from .configs import KernelConfig, select_config
from .grouped_gemm import down_projection, reduce_topk, up_projection

__all__ = ["fused_moe"]


def fused_moe(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The MoE layer in Triton: ``[T, H] -> [T, H]`` in ``hidden``'s dtype; ``config`` overrides the choice."""
    check_inputs(hidden_TH, topk_ids_TK, topk_weights_TK, w_up, w_down, b_up_EN, b_down_EH, spec)
    T, K = topk_ids_TK.shape
    H = hidden_TH.shape[1]
    if config is None:
        args = (hidden_TH, topk_ids_TK, topk_weights_TK, w_up, w_down, b_up_EN, b_down_EH, spec)
        N = w_up.shape[2] if spec.transposed else w_up.shape[1]
        config = select_config(
            w_up.shape[0], N, H, T, K, w_up.dtype, hidden_TH.device,
            bench=lambda c: triton.testing.do_bench(lambda: fused_moe(*args, config=c)),
        )  # fmt: skip
    alignment = align(topk_ids_TK, w_up.shape[0], config.block_m)  # [P], [B], [1]
    if spec.scale_input:
        # the weight scales each pair's input row: the up kernel reads row p of [S, H] (top-1 indexing), the
        # down kernel weighs by one. NOTE: the [S, H] copy could be a per-row scale in the up epilogue instead.
        hidden_SH = (hidden_TH.unsqueeze(1) * topk_weights_TK.unsqueeze(-1).to(hidden_TH.dtype)).reshape(T * K, H)
        act_SI = up_projection(hidden_SH, alignment, w_up, b_up_EN, spec, 1, config)  # [S, I]
        topk_weights_TK = torch.ones_like(topk_weights_TK)
    else:
        act_SI = up_projection(hidden_TH, alignment, w_up, b_up_EN, spec, K, config)  # [S, I]
    y_SH = down_projection(act_SI, alignment, topk_weights_TK, w_down, b_down_EH, spec, config)  # [S, H]
    return reduce_topk(y_SH, K, hidden_TH.dtype)  # [T, H]
