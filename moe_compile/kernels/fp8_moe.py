"""The Triton MoE layer on block-fp8 experts (``moe_compile::moe_fp8_triton``): W8A8, scales per K block.

Shape legend as in :mod:`.grouped_gemm` (``T`` tokens, ``K`` top-k, ``E`` experts, ``H`` hidden, ``I``
intermediate, ``N`` up width, ``S = T*K`` pairs, ``KB`` K blocks of the scale grid).

What it computes is the arithmetic of :mod:`moe_compile.quant.fp8`, step by step::

    qx, sx   = quantize_activations(hidden)                      torch, the shared quantizer
    act_SI   = act(sum_b (dot_b(qx, W_up[e]) * sx[b]) * sw_up[rb(n), b] + b_up)   fp32, stored in hidden's dtype
    qa, sa   = quantize_activations(act_SI)                      torch, the shared quantizer
    y_SH     = w_s * (sum_b (dot_b(qa, W_down[e]) * sa[b]) * sw_down[rb(h), b] + b_down)   stored in hidden's dtype
    out_TH   = sum_k y_SH[t*K + k]                               fp32, in order (:func:`.grouped_gemm.reduce_topk`)

The activations are quantized in torch, before the kernels: the Triton interpreter rounds fp32 -> fp8
casts wrongly (triton-lang/triton PR #11897), and a quantizer shared with the emulation is exact by
construction. Each kernel step multiplies its ``BLOCK_K``-wide partial dot by the activation scale of
(row, K block) and the weight scale of (column's block row, K block); ``BLOCK_K`` must divide the
checkpoint's ``block_k`` (128), so a step never straddles two scale blocks. The result equals the
emulation up to fp32 summation order (the emulation sums a whole 128-wide block before scaling).

The fp8 operands are passed as ``uint8`` views and read by ``FP8_MODE``:

- ``"native"`` (sm_89 and newer; sm_90 compiles ``wgmma ... e4m3.e4m3``): the bytes bitcast to e4m3, fp8 dots;
- ``"decode"`` (sm_80, which has no fp8 type or fp8 MMA): the e4m3 bits decoded in integer arithmetic
  (:func:`_e4m3_to_f32`, exact for every finite code) and cast to bf16 (exact: 4 significant bits), bf16 dots.
  The products and fp32 sums are those of the native path: the arithmetic is still W8A8, on 16-bit MMAs;
- under ``TRITON_INTERPRET=1`` either decoding, to fp32 dots (exact products); its fp32 -> bf16 stores truncate,
  so there the kernels round to bf16 in integer arithmetic first (:func:`_round_bf16`), as a GPU cast does.

Only the concat gate/up layout, ``[E, out, in]`` weights: what fp8 checkpoints store (``ExpertSpec`` checks it).
Per-K-block scaling waits for each step's MMA before scaling it, so on sm_90 no wgmma stays in flight across
steps; the loads are still pipelined (``num_stages``), which is what the compile gate checks for fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.fp8 import check_fp8_inputs, quantize_activations
from ..spec import ExpertSpec
from .align import Alignment, align
from .configs import KernelConfig, interpreting, select_config
from .grouped_gemm import (
    Launch,
    _activate,
    _block_coords,
    _check_alignment,
    _check_device,
    _check_float,
    reduce_topk,
)

__all__ = ["DECODE_CONFIGS", "FP8_MODES", "down_fp8_launch", "fp8_config", "fp8_mode", "fused_moe_fp8", "up_fp8_launch"]

FP8_MODES = ("native", "decode")
#: sm_80 ("decode"): configs by rows per expert (at most 16, 64, more). The decoding costs registers: the
#: 16-bit tables' 64x128x64 / 128x128x64 / 32x64x128 up kernels spill there (compile gate); these do not.
DECODE_CONFIGS = (
    (16, KernelConfig(16, 64, 32, 1, 4, 3)),  # BLOCK_K 64 spills 8 B in the down kernel with triton 3.6
    (64, KernelConfig(64, 64, 64, 8, 4, 3)),
    (None, KernelConfig(128, 128, 32, 16, 8, 3)),
)


def fp8_mode(device: torch.device | None = None, cc: int | None = None) -> str:
    """``"native"`` where the GPU has fp8 (compute capability 8.9 or newer), else ``"decode"``; under the
    interpreter ``MOE_COMPILE_FP8_MODE`` may pick either (both run there)."""
    import os

    if cc is None:
        if device is not None and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            cc = major * 10 + minor
        else:
            mode = os.environ.get("MOE_COMPILE_FP8_MODE", "decode")
            if mode not in FP8_MODES:
                raise ValueError(f"MOE_COMPILE_FP8_MODE={mode!r}: expected one of {FP8_MODES}")
            return mode
    return "native" if cc >= 89 else "decode"


@triton.jit
def _e4m3_to_f32(bits):
    """e4m3fn bytes (int) -> fp32, exactly: normal codes by their exponent and mantissa bits, subnormals as
    ``m * 2^-9`` (NaN codes, 0x7F/0xFF, which no weight holds, decode as 480)."""
    b = bits.to(tl.int32)
    sign = (b >> 7) & 1
    exp = (b >> 3) & 15
    man = b & 7
    normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _round_bf16(x, ROUND_BF16: tl.constexpr):
    """fp32 -> the nearest bf16 value (ties to even), still fp32, in integer arithmetic: the interpreter's
    fp32 -> bf16 store truncates, so under it the kernels round first (``ROUND_BF16``); a GPU's cast rounds alike."""
    if ROUND_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _load_fp8(ptrs, mask, FP8_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    bits = tl.load(ptrs, mask=mask, other=0)
    if FP8_MODE == "native":
        return bits.to(tl.float8e4nv, bitcast=True).to(DOT_DTYPE)
    else:
        return _e4m3_to_f32(bits).to(DOT_DTYPE)


@triton.jit
def _up_fp8_kernel(
    x_ptr,  # [T, H] uint8 view of the e4m3 activations
    xs_ptr,  # [T, KB] fp32 activation scales
    w_ptr,  # [E, N, H] uint8 view of the e4m3 weights
    ws_ptr,  # [E, NB, KB] fp32 weight scales
    b_ptr,  # [E, N] or a dummy
    out_ptr,  # [S, I] activations, hidden's dtype
    pair_ids_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    num_pairs,
    H,
    I,
    num_m_blocks,
    group_m,
    alpha,
    limit,
    gate_cap,
    up_cap,
    half_blocks,  # scale rows of the gate half: the up half's rows start there
    stride_xt,
    stride_xh,
    stride_xst,
    stride_xsk,
    stride_we,
    stride_wn,
    stride_wh,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_bn,
    stride_os,
    stride_oi,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    CLAMP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP8_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, I, group_m, BLOCK_N)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pair_M = tl.load(pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = pair_M < num_pairs
    token_M = pair_M // TOP_K

    offs_i_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok_N = offs_i_N < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token_M[:, None] * stride_xt + offs_k[None, :] * stride_xh
    xs_ptrs = xs_ptr + token_M * stride_xst
    w_base = w_ptr + expert * stride_we
    wg_ptrs = w_base + offs_k[:, None] * stride_wh + offs_i_N[None, :] * stride_wn
    wu_ptrs = w_base + offs_k[:, None] * stride_wh + (offs_i_N + I)[None, :] * stride_wn
    ws_base = ws_ptr + expert * stride_wse
    sg_ptrs = ws_base + (offs_i_N // SCALE_N) * stride_wsn
    su_ptrs = ws_base + (half_blocks + offs_i_N // SCALE_N) * stride_wsn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        kb = k0 // SCALE_K
        x = _load_fp8(x_ptrs, row_ok_M[:, None] & k_ok[None, :], FP8_MODE, DOT_DTYPE)
        sx_M = tl.load(xs_ptrs + kb * stride_xsk, mask=row_ok_M, other=0.0)
        wg = _load_fp8(wg_ptrs, k_ok[:, None] & col_ok_N[None, :], FP8_MODE, DOT_DTYPE)
        sg_N = tl.load(sg_ptrs + kb * stride_wsk, mask=col_ok_N, other=0.0)
        part = tl.dot(x, wg, input_precision=DOT_PRECISION)
        acc_gate += part * sx_M[:, None] * sg_N[None, :]
        if GATED:
            wu = _load_fp8(wu_ptrs, k_ok[:, None] & col_ok_N[None, :], FP8_MODE, DOT_DTYPE)
            su_N = tl.load(su_ptrs + kb * stride_wsk, mask=col_ok_N, other=0.0)
            part_up = tl.dot(x, wu, input_precision=DOT_PRECISION)
            acc_up += part_up * sx_M[:, None] * su_N[None, :]
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_wh
        wu_ptrs += BLOCK_K * stride_wh
    if HAS_BIAS:
        b_base = b_ptr + expert * stride_be
        acc_gate += tl.load(b_base + offs_i_N * stride_bn, mask=col_ok_N, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_base + (offs_i_N + I) * stride_bn, mask=col_ok_N, other=0.0).to(tl.float32)[None, :]
    act = _round_bf16(_activate(acc_gate, acc_up, alpha, limit, gate_cap, up_cap, ACTIVATION, GATED, CLAMP), ROUND_BF16)
    out_ptrs = out_ptr + pair_M[:, None] * stride_os + offs_i_N[None, :] * stride_oi
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok_M[:, None] & col_ok_N[None, :])


@triton.jit
def _down_fp8_kernel(
    a_ptr,  # [S, I] uint8 view of the e4m3 activations, by pair id
    as_ptr,  # [S, KB] fp32 activation scales
    w_ptr,  # [E, H, I] uint8 view of the e4m3 weights
    ws_ptr,  # [E, HB, KB] fp32 weight scales
    b_ptr,  # [E, H] or a dummy
    rw_ptr,  # [T, K] routing weights
    out_ptr,  # [S, H] weighted per-pair rows, hidden's dtype
    pair_ids_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    num_pairs,
    I,
    H,
    num_m_blocks,
    group_m,
    stride_as,
    stride_ai,
    stride_ass,
    stride_ask,
    stride_we,
    stride_wh,
    stride_wi,
    stride_wse,
    stride_wsh,
    stride_wsk,
    stride_be,
    stride_bh,
    stride_rt,
    stride_rk,
    stride_os,
    stride_oh,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP8_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, H, group_m, BLOCK_N)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pair_M = tl.load(pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = pair_M < num_pairs

    offs_h_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok_N = offs_h_N < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair_M[:, None] * stride_as + offs_k[None, :] * stride_ai
    as_ptrs = as_ptr + pair_M * stride_ass
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wi + offs_h_N[None, :] * stride_wh
    ws_ptrs = ws_ptr + expert * stride_wse + (offs_h_N // SCALE_N) * stride_wsh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        kb = k0 // SCALE_K
        a = _load_fp8(a_ptrs, row_ok_M[:, None] & k_ok[None, :], FP8_MODE, DOT_DTYPE)
        sa_M = tl.load(as_ptrs + kb * stride_ask, mask=row_ok_M, other=0.0)
        w = _load_fp8(w_ptrs, k_ok[:, None] & col_ok_N[None, :], FP8_MODE, DOT_DTYPE)
        sw_N = tl.load(ws_ptrs + kb * stride_wsk, mask=col_ok_N, other=0.0)
        part = tl.dot(a, w, input_precision=DOT_PRECISION)
        acc += part * sa_M[:, None] * sw_N[None, :]
        a_ptrs += BLOCK_K * stride_ai
        w_ptrs += BLOCK_K * stride_wi
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_h_N * stride_bh, mask=col_ok_N, other=0.0).to(tl.float32)[
            None, :
        ]
    rw_ptrs = rw_ptr + (pair_M // TOP_K) * stride_rt + (pair_M % TOP_K) * stride_rk
    acc *= tl.load(rw_ptrs, mask=row_ok_M, other=0.0).to(tl.float32)[:, None]
    acc = _round_bf16(acc, ROUND_BF16)
    out_ptrs = out_ptr + pair_M[:, None] * stride_os + offs_h_N[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok_M[:, None] & col_ok_N[None, :])


def _dot(mode: str, interpret: bool | None) -> tuple[tl.dtype, str | None]:
    if interpreting() if interpret is None else interpret:
        return tl.float32, "ieee"  # exact products; the interpreter's 8- and 16-bit arithmetic is not trusted
    return (tl.float8e4nv, None) if mode == "native" else (tl.bfloat16, None)


def fp8_config(
    num_experts: int, up_width: int, hidden: int, tokens: int, top_k: int, device: torch.device, mode: str
) -> KernelConfig:
    """The fp8 layer's config: the 16-bit choice where e4m3 is native (its BLOCK_K, at most 128, divides 128),
    :data:`DECODE_CONFIGS` on sm_80, the interpreter's under it."""
    if mode == "native" or interpreting():
        return select_config(num_experts, up_width, hidden, tokens, top_k, torch.bfloat16, device)
    rows = tokens * top_k / max(num_experts, 1)
    return next(c for bound, c in DECODE_CONFIGS if bound is None or rows <= bound)


def _round_stores(out_dtype: torch.dtype, interpret: bool | None) -> bool:
    return out_dtype == torch.bfloat16 and (interpreting() if interpret is None else interpret)


def _check_block_k(spec: ExpertSpec, config: KernelConfig) -> None:
    if spec.block_k % config.block_k:
        raise ValueError(
            f"moe fp8 kernels: BLOCK_K={config.block_k} does not divide the scale block {spec.block_k}; "
            "a kernel step would straddle two scale blocks"
        )


def up_fp8_launch(
    qx_TH: torch.Tensor,
    sx_TB: torch.Tensor,
    alignment: Alignment,
    w_up: torch.Tensor,
    s_up: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    spec: ExpertSpec,
    top_k: int,
    config: KernelConfig,
    out_dtype: torch.dtype,
    mode: str,
    interpret: bool | None = None,
) -> tuple[Launch | None, torch.Tensor]:
    """Checks, allocates ``act_SI [S, I]`` (``out_dtype``) and returns the fp8 up kernel's launch."""
    _check_alignment(alignment, config.block_m)
    _check_block_k(spec, config)
    T, H = qx_TH.shape
    E, N, _ = w_up.shape
    I = N // 2 if spec.gated else N  # noqa: E741
    S = T * top_k
    out_SI = torch.empty(S, I, dtype=out_dtype, device=qx_TH.device)
    num_m_blocks = alignment.block_expert_B.numel()
    if num_m_blocks == 0 or I == 0:
        return None, out_SI
    if b_up_EN is not None:
        _check_float("b_up", b_up_EN)
    bias = b_up_EN if b_up_EN is not None else s_up
    stride_be, stride_bn = b_up_EN.stride() if b_up_EN is not None else (0, 0)
    dot_dtype, precision = _dot(mode, interpret)
    c = config
    block_n = max(16, c.block_n // 2) if spec.gated else c.block_n
    x8, w8 = qx_TH.view(torch.uint8), w_up.view(torch.uint8)
    launch = Launch(
        _up_fp8_kernel,
        (num_m_blocks * triton.cdiv(I, block_n),),
        (
            x8, sx_TB, w8, s_up, bias, out_SI, *alignment,
            S, H, I, num_m_blocks, c.group_m, float(spec.alpha), float(spec.limit),
            float(spec.gate_softcap), float(spec.up_softcap), triton.cdiv(I, spec.block_n),
            x8.stride(0), x8.stride(1), sx_TB.stride(0), sx_TB.stride(1), *w8.stride(), *s_up.stride(),
            stride_be, stride_bn, out_SI.stride(0), out_SI.stride(1),
        ),
        {
            "TOP_K": top_k, "ACTIVATION": spec.activation, "CLAMP": spec.clamp, "GATED": spec.gated,
            "HAS_BIAS": b_up_EN is not None,
            "FP8_MODE": mode, "DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision,
            "ROUND_BF16": _round_stores(out_dtype, interpret), "SCALE_N": spec.block_n, "SCALE_K": spec.block_k,
            "BLOCK_M": c.block_m, "BLOCK_N": block_n, "BLOCK_K": c.block_k,
        },
        c.num_warps,
        c.num_stages,
    )  # fmt: skip
    return launch, out_SI


def down_fp8_launch(
    qa_SI: torch.Tensor,
    sa_SB: torch.Tensor,
    alignment: Alignment,
    topk_weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    s_down: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
    config: KernelConfig,
    out_dtype: torch.dtype,
    mode: str,
    interpret: bool | None = None,
) -> tuple[Launch | None, torch.Tensor]:
    """Checks, allocates ``y_SH [S, H]`` (``out_dtype``) and returns the fp8 down kernel's launch."""
    _check_alignment(alignment, config.block_m)
    _check_block_k(spec, config)
    _check_float("topk_weights", topk_weights_TK)
    S, I = qa_SI.shape
    T, K = topk_weights_TK.shape
    E, H, _ = w_down.shape
    if S != T * K:
        raise ValueError(f"down fp8: {S} activation rows for {T} tokens x top-{K}")
    out_SH = torch.empty(S, H, dtype=out_dtype, device=qa_SI.device)
    num_m_blocks = alignment.block_expert_B.numel()
    if num_m_blocks == 0 or H == 0:
        return None, out_SH
    if b_down_EH is not None:
        _check_float("b_down", b_down_EH)
    bias = b_down_EH if b_down_EH is not None else s_down
    stride_be, stride_bh = b_down_EH.stride() if b_down_EH is not None else (0, 0)
    dot_dtype, precision = _dot(mode, interpret)
    c = config
    a8, w8 = qa_SI.view(torch.uint8), w_down.view(torch.uint8)
    launch = Launch(
        _down_fp8_kernel,
        (num_m_blocks * triton.cdiv(H, c.block_n),),
        (
            a8, sa_SB, w8, s_down, bias, topk_weights_TK, out_SH, *alignment,
            S, I, H, num_m_blocks, c.group_m,
            a8.stride(0), a8.stride(1), sa_SB.stride(0), sa_SB.stride(1), *w8.stride(), *s_down.stride(),
            stride_be, stride_bh, topk_weights_TK.stride(0), topk_weights_TK.stride(1),
            out_SH.stride(0), out_SH.stride(1),
        ),
        {
            "TOP_K": K, "HAS_BIAS": b_down_EH is not None, "FP8_MODE": mode, "DOT_DTYPE": dot_dtype,
            "DOT_PRECISION": precision, "ROUND_BF16": _round_stores(out_dtype, interpret),
            "SCALE_N": spec.block_n, "SCALE_K": spec.block_k,
            "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
        },
        c.num_warps,
        c.num_stages,
    )  # fmt: skip
    return launch, out_SH


def fused_moe_fp8(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    s_up: torch.Tensor,
    s_down: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
    config: KernelConfig | None = None,
    mode: str | None = None,
) -> torch.Tensor:
    """The block-fp8 MoE layer in Triton: ``[T, H] -> [T, H]`` in ``hidden``'s dtype (module doc)."""
    check_fp8_inputs(hidden_TH, topk_ids_TK, topk_weights_TK, w_up, w_down, s_up, s_down, b_up_EN, b_down_EH, spec)
    _check_float("hidden", hidden_TH)
    _check_device(hidden_TH, topk_ids_TK, w_up, w_down, s_up, s_down, b_up_EN, b_down_EH)
    T, K = topk_ids_TK.shape
    H = hidden_TH.shape[1]
    dtype = hidden_TH.dtype
    mode = mode or fp8_mode(hidden_TH.device)
    if config is None:
        config = fp8_config(w_up.shape[0], w_up.shape[1], H, T, K, hidden_TH.device, mode)
    alignment = align(topk_ids_TK, w_up.shape[0], config.block_m)
    if spec.scale_input:
        x = (hidden_TH.unsqueeze(1) * topk_weights_TK.unsqueeze(-1).to(dtype)).reshape(T * K, H)
        top_k, topk_weights_TK = 1, torch.ones_like(topk_weights_TK)
    else:
        x, top_k = hidden_TH, K
    qx, sx = quantize_activations(x, spec.block_k)
    launch, act_SI = up_fp8_launch(qx, sx, alignment, w_up, s_up, b_up_EN, spec, top_k, config, dtype, mode)
    if launch is not None:
        launch.run()
    qa, sa = quantize_activations(act_SI, spec.block_k)
    launch, y_SH = down_fp8_launch(
        qa, sa, alignment, topk_weights_TK, w_down, s_down, b_down_EH, spec, config, dtype, mode
    )
    if launch is not None:
        launch.run()
    if _round_stores(dtype, None):  # the interpreter's bf16 store truncates: sum in fp32, round in torch
        return reduce_topk(y_SH, K, torch.float32).to(dtype)
    return reduce_topk(y_SH, K, dtype)
