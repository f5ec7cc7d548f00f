"""FP8 block-scaled weights (DeepSeek-V3/R1, Qwen3-*-FP8): the format, its checks, and the W8A8 arithmetic in torch.

Shape legend: ``S`` rows (tokens or (token, expert) pairs), ``K`` reduction size, ``N`` output size,
``NB``/``KB`` block rows/columns of a weight's scale grid, ``E`` experts.

**Format.** A weight ``q [..., N, K]`` is ``float8_e4m3fn``; its scale ``s [..., NB, KB]`` (``*_scale_inv`` in the
checkpoints) holds one fp32 number per ``block_n x block_k`` block (``(128, 128)``); partial blocks at the
edges are real (sizes round up). The dequantized weight is ``w[n, k] = q[n, k] * s[rb(n), k // block_k]``
with ``rb(n) = n // block_n``, except for a gated up weight ``[2I, K]``, whose gate and up halves have
rows of blocks of their own (transformers' ``FP8Experts`` gives ``gate_up_proj`` at least two scale rows)::

    rb(n) = (n // I) * ceil(I / block_n) + (n % I) // block_n      (= n // block_n when I % block_n == 0)

A grid in which a block would straddle the gate/up boundary is refused (:func:`check_weight_scales`).

**Arithmetic (W8A8, dynamic activation quantization)**, what transformers' GPU path, vLLM, SGLang and
DeepGEMM compute, and what every implementation of ``moe_compile::moe_fp8`` computes:

- activations are quantized per row and per ``block_k`` channels (:func:`quantize_activations`):
  ``scale = max(amax, EPS) / 448``, ``q = e4m3(clamp(x / scale, -448, 448))`` (round to nearest even);
- ``y[s, n] = sum_b (dot_b(qa[s], qw[n]) * sa[s, b]) * sw[rb(n), b]`` over the K blocks ``b`` in order, in fp32
  (products of two e4m3 numbers are exact in fp32; only the fp32 sums round, so implementations that
  sum a block in another order, or in sub-blocks of ``BLOCK_K`` dividing ``block_k``, agree to fp32 rounding);
- in the experts (:func:`moe_fp8_torch`): the up projection's fp32 result (plus bias) goes through the
  activation in fp32 and is stored in the activation dtype, re-quantized for the down projection; the down
  projection's fp32 result (plus bias) times the routing weight is stored in the activation dtype; the ``K``
  rows of a token are summed in fp32 in order and cast to the activation dtype.

HF stores ``scale_inv = 1 / (448 / amax)``, not ``amax / 448``: equal up to rounding, so nothing here
assumes the checkpoints' scales equal what :func:`quantize_weight` would compute.
"""

from __future__ import annotations

import torch

from ..moe_math import activate, check_inputs

__all__ = [
    "EPS",
    "FP8_DTYPE",
    "FP8_MAX",
    "check_fp8_inputs",
    "check_weight_scales",
    "dequantize_weight",
    "fp8_linear",
    "moe_fp8_torch",
    "quantize_activations",
    "quantize_weight",
    "row_blocks",
    "scale_grid",
    "scales_to_float32",
    "w8a8_linear",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn
EPS = 1e-10  # floor of a group's amax (vLLM's per_token_group_quant_fp8), so an all-zero group has a finite scale
#: the block forms moe_compile runs: weight_block_size of the checkpoints it was checked on
SUPPORTED_BLOCKS = ((128, 128),)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_fp8_inputs(hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down, spec):
    """``moe_compile::moe_fp8``'s checks: the canonical op's shape checks, plus dtypes and scale grids."""
    check_inputs(hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec)
    torch._check(spec.quant == "fp8_block", lambda: f"moe_fp8: spec has quant={spec.quant!r}, expected 'fp8_block'")
    block = (spec.block_n, spec.block_k)
    check_weight_scales("moe_fp8 w_up", w_up, w_up_scale, block, 2 if spec.gated else 1)
    check_weight_scales("moe_fp8 w_down", w_down, w_down_scale, block, 1)


def scale_grid(N: int, K: int, block: tuple[int, int], halves: int = 1) -> tuple[int, int]:
    """``(NB, KB)``, the scale shape of a ``[N, K]`` weight (``halves=2``: a gated up weight, see the module doc)."""
    bn, bk = block
    return halves * _cdiv(N // halves, bn), _cdiv(K, bk)


def row_blocks(N: int, block_n: int, halves: int = 1, device=None) -> torch.Tensor:
    """``rb(n)`` for every weight row ``n`` (int64 ``[N]``): the scale row it reads."""
    R = N // halves
    n = torch.arange(N, device=device)
    return (n // R) * _cdiv(R, block_n) + (n % R) // block_n


def scales_to_float32(scale: torch.Tensor, what: str = "scale") -> torch.Tensor:
    """fp32 scales from the stored ones: fp32 as is, bf16/fp16 and ue8m0 (``float8_e8m0fnu``, powers of two) exactly.

    Any other dtype is refused.
    """
    if scale.dtype == torch.float32:
        return scale
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if scale.dtype in (torch.bfloat16, torch.float16):
        return scale.float()  # every bf16/fp16 value is an fp32 value
    if e8m0 is not None and scale.dtype == e8m0:
        # 2 ** (byte - 127); 0xFF is NaN in e8m0 and has no meaning as a scale
        bits = scale.view(torch.uint8)
        if bool((bits == 255).any()):
            raise ValueError(f"{what}: ue8m0 scale holds NaN (0xFF); the checkpoint is damaged")
        return torch.ldexp(torch.ones_like(bits, dtype=torch.float32), bits.to(torch.int32) - 127)
    raise ValueError(f"{what}: scales of dtype {scale.dtype} are not supported; expected float32, bf16 or ue8m0")


def check_weight_scales(
    name: str, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], halves: int = 1
) -> None:
    """One-line ValueError when ``weight``/``scale`` are not an e4m3 weight and its fp32 block-scale grid."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: fp8 weight must be float8_e4m3fn, got {weight.dtype}")
    if scale.dtype != torch.float32:
        raise ValueError(f"{name}: scale must be float32 (convert bf16/ue8m0: scales_to_float32), got {scale.dtype}")
    *lead, N, K = weight.shape
    if halves == 2 and N % 2:
        raise ValueError(f"{name}: a gated up weight needs an even number of rows, got {N}")
    expected = (*lead, *scale_grid(N, K, block, halves))
    if tuple(scale.shape) != expected:
        bn, bk = block
        straddle = ""
        if halves == 2 and tuple(scale.shape[-2:]) == (_cdiv(N, bn), _cdiv(K, bk)):
            straddle = (
                f" (a {bn}-row block would straddle the gate/up boundary at row {N // 2}: "
                f"re-quantize gate and up separately)"
            )
        raise ValueError(
            f"{name}: scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)} with "
            f"{bn}x{bk} blocks, expected {expected}{straddle}"
        )


def quantize_activations(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(q e4m3 [..., K], scale fp32 [..., ceil(K / block_k)])``, per row and block_k channels."""
    K = x.shape[-1]
    KB = _cdiv(K, block_k)
    xf = x.float()
    if KB * block_k != K:
        xf = torch.nn.functional.pad(xf, (0, KB * block_k - K))  # zeros: they do not change a group's amax
    groups = xf.unflatten(-1, (KB, block_k))
    scale = groups.abs().amax(dim=-1).clamp_min(EPS) / FP8_MAX
    q = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :K], scale


def quantize_weight(w: torch.Tensor, block: tuple[int, int], halves: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> ``(q e4m3, scale fp32 [..., NB, KB])`` with ``scale = max(amax, EPS) / 448`` per block.

    Used to make fp8 weights (tests, fixtures); checkpoints bring their own scales.
    """
    *lead, N, K = w.shape
    bn, bk = block
    NB, KB = scale_grid(N, K, block, halves)
    rows = row_blocks(N, bn, halves, w.device)
    wf = w.float()
    amax = torch.zeros(*lead, NB, KB, dtype=torch.float32, device=w.device)
    for b in range(KB):
        col = wf[..., b * bk : (b + 1) * bk].abs().amax(dim=-1)  # [..., N]
        index = rows.expand_as(col)
        amax[..., b] = torch.zeros_like(amax[..., b]).scatter_reduce_(-1, index, col, "amax", include_self=True)
    scale = amax.clamp_min(EPS) / FP8_MAX
    q = (wf / _expand(scale, N, K, block, halves)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _expand(scale: torch.Tensor, N: int, K: int, block: tuple[int, int], halves: int) -> torch.Tensor:
    """The scale of every weight element, ``[..., N, K]``."""
    rows = row_blocks(N, block[0], halves, scale.device)
    return scale.index_select(-2, rows).repeat_interleave(block[1], dim=-1)[..., :K]


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], halves: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * s`` per block, in fp32, cast to ``dtype``."""
    N, K = q.shape[-2:]
    return (q.float() * _expand(scales_to_float32(scale), N, K, block, halves)).to(dtype)


def w8a8_linear(
    qa_SK: torch.Tensor,
    sa_SB: torch.Tensor,
    qw_NK: torch.Tensor,
    sw: torch.Tensor,
    block: tuple[int, int],
    halves: int = 1,
) -> torch.Tensor:
    """``[S, N]`` fp32: ``sum_b (dot_b(qa, qw) * sa[:, b]) * sw[rb(n), b]`` over the K blocks, in order."""
    S, K = qa_SK.shape
    N = qw_NK.shape[0]
    bn, bk = block
    sw_NB = sw.float().index_select(0, row_blocks(N, bn, halves, sw.device))
    a, w = qa_SK.float(), qw_NK.float()
    out = torch.zeros(S, N, dtype=torch.float32, device=qa_SK.device)
    for b in range(_cdiv(K, bk)):
        part = a[:, b * bk : (b + 1) * bk] @ w[:, b * bk : (b + 1) * bk].t()
        out += part * sa_SB[:, b : b + 1] * sw_NB[:, b]
    return out


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int]
) -> torch.Tensor:
    """A dense block-fp8 ``nn.Linear`` (transformers' ``FP8Linear``): W8A8, ``[..., K] -> [..., N]``, x's dtype."""
    lead = x.shape[:-1]
    qa, sa = quantize_activations(x.reshape(-1, x.shape[-1]), block[1])
    y = w8a8_linear(qa, sa, weight, scale, block)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def _grouped_w8a8(qa_SK, sa_SB, w_E, s_E, ids_S, block, halves) -> torch.Tensor:
    """Rows of pair ``s`` through expert ``ids_S[s]``'s weight: ``[S, N]`` fp32 (rows sorted by expert first)."""
    S = qa_SK.shape[0]
    out = torch.empty(S, w_E.shape[1], dtype=torch.float32, device=qa_SK.device)
    order = torch.argsort(ids_S, stable=True)
    counts = torch.bincount(ids_S, minlength=w_E.shape[0])
    start = 0
    # NOTE: one host sync for the per-expert row counts (the CPU path; the GPU runs moe_fp8_triton)
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = order[start : start + n]
            out[rows] = w8a8_linear(qa_SK[rows], sa_SB[rows], w_E[e], s_E[e], block, halves)
            start += n
    return out


def moe_fp8_torch(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    s_up: torch.Tensor,
    s_down: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    spec,
) -> torch.Tensor:
    """``moe_compile::moe_fp8`` in torch: the stated W8A8 arithmetic (module doc), ``[T, H]`` in ``hidden``'s dtype."""
    T, K = topk_ids_TK.shape
    dtype = hidden_TH.dtype
    block = (spec.block_n, spec.block_k)
    ids_S = topk_ids_TK.reshape(-1).long()  # pair s = t * K + k
    x_SH = hidden_TH.repeat_interleave(K, dim=0)
    weights_S1 = topk_weights_TK.reshape(-1, 1).float()
    if spec.scale_input:
        x_SH = x_SH * topk_weights_TK.reshape(-1, 1).to(dtype)
        weights_S1 = torch.ones_like(weights_S1)
    qx, sx = quantize_activations(x_SH, spec.block_k)
    up_SN = _grouped_w8a8(qx, sx, w_up, s_up, ids_S, block, 2 if spec.gated else 1)
    if b_up_EN is not None:
        up_SN = up_SN + b_up_EN.float().index_select(0, ids_S)
    act_SI = activate(up_SN, spec).to(dtype)
    qa, sa = quantize_activations(act_SI, spec.block_k)
    y_SH = _grouped_w8a8(qa, sa, w_down, s_down, ids_S, block, 1)
    if b_down_EH is not None:
        y_SH = y_SH + b_down_EH.float().index_select(0, ids_S)
    y_TKH = (y_SH * weights_S1).to(dtype).view(T, K, -1)
    out_TH = y_TKH[:, 0].float()
    for k in range(1, K):  # in order, as the Triton reduce
        out_TH = out_TH + y_TKH[:, k].float()
    return out_TH.to(dtype)
