"""Grouped GEMMs of the MoE experts, over the block layout of :mod:`.align`.

Shape legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden,
``I`` intermediate, ``N`` up width (``2I`` gated, else ``I``), ``S = T*K`` pairs
(pair ``s`` is token ``s // K``, slot ``s % K``), ``P`` padded rows, ``B = P/BLOCK_M``.

What the three kernels compute (``e`` the expert of a pair, fp32 accumulation)::

    up:      act_SI[s]   = act(x[s // K] @ W_up[e]^T + b_up[e])        gate and up halves in one program
    down:    y_SH[s]     = topk_weights[s] * (act_SI[s] @ W_down[e]^T + b_down[e])
    reduce:  out_TH[t]   = sum_{k < K} y_SH[t*K + k]                   fixed order: deterministic

The up kernel never writes the unactivated ``[S, N]`` tensor: a program owns
``BLOCK_N`` output columns ``i`` of ``act`` and accumulates both the gate column
(``i``, or ``2i`` interleaved) and the matching up column (``I + i``, or ``2i + 1``),
then writes ``act(gate) * up``. Interleaved gate/up columns are read as one contiguous
``[BLOCK_K, 2*BLOCK_N]`` tile, one dot per step, and split into gate and up after the loop, so the
GPT-OSS layout pipelines like the standard one. Programs walk blocks of ``BLOCK_M`` rows of one
expert (pairs gathered through ``pair_ids_P``); blocks at or past ``num_blocks``
return at once, so grids are sized by the static bound and nothing syncs with the
host. Weights are read through their strides, so both layouts of
:class:`~moe_compile.spec.ExpertSpec` (``transposed``) and non-contiguous inputs
need no copy.

Operands are cast to ``DOT_DTYPE`` right after loading: the weight dtype on a GPU
(bf16/fp16 tensor cores; fp32 uses ``ieee`` precision, not tf32), always fp32
under ``TRITON_INTERPRET=1``, whose bf16 arithmetic is wrong. ``act_SI`` and
``y_SH`` are stored in the weight dtype, ``out_TH`` in the hidden dtype.

Each launcher (``up_projection``...) checks its inputs and runs a :class:`Launch` built by
``up_launch``/``down_launch``/``reduce_launch``; :mod:`.compile_gate` compiles the same launches for
sm_80 and sm_90 without a GPU.

The same maths in torch, per stage, are the tests' references (``tests/kernel_tests/references.py``).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ..spec import ExpertSpec
from .align import Alignment
from .configs import KernelConfig, interpreting

__all__ = [
    "Launch",
    "down_launch",
    "down_projection",
    "reduce_launch",
    "reduce_topk",
    "up_launch",
    "up_projection",
]  # fmt: skip

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_REDUCE_BLOCK = 1024  # columns per reduce program
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _fix_old_interpreter_index() -> None:
    """Older Triton interpreters (3.6) turn a scalar kernel argument into an int with ``int(array of shape (1,))``.

    NumPy 2.4 made that an error ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``for k0 in range(0, H, BLOCK_K)`` loop over a runtime bound fails there (triton 3.6 + NumPy 2.4). Newer
    interpreters squeeze the array first; this applies the same fix to the old one. Interpreter only: compiled
    kernels never run this code.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no interpreter in this triton
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_moe_compile_fixed", False) or "squeeze" in inspect.getsource(patch):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._moe_compile_fixed = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _fix_old_interpreter_index()


@triton.jit
def _tanh(z):
    """fp32 ``tanh`` (no libdevice: the interpreter has none), relative error a few ulp.

    ``(1 - e) / (1 + e)`` with ``e = exp(-2|z|)`` loses digits to cancellation near 0, so
    ``|z| < 0.25`` takes the odd Taylor series to ``z^9`` (truncation below 1e-8 relative).
    """
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, near, far)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _activate(
    gate,
    up,
    alpha,
    limit,
    gate_cap,
    up_cap,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr = "none",
):
    """fp32 tiles -> ``act(gate) * up`` (or ``act(gate)`` when not gated); ``CLAMP`` as ``ExpertSpec.clamp``."""
    if CLAMP != "none":
        up = tl.minimum(tl.maximum(up, -limit), limit)
        if CLAMP == "before":
            gate = tl.minimum(gate, limit)
    if ACTIVATION == "swiglu_oai":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(alpha * gate))
    elif ACTIVATION == "swiglu_softcap":
        # cap(gate) * sigmoid(gate) * cap(up), cap(x, c) = tanh(x / c) * c: the sigmoid sees the raw gate
        out = _tanh(gate / gate_cap) * gate_cap * tl.sigmoid(gate) * (_tanh(up / up_cap) * up_cap)
    else:
        if ACTIVATION == "silu":
            out = gate * tl.sigmoid(gate)
        elif ACTIVATION == "gelu":
            out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            # 0.5 * (1 + tanh(z)) == sigmoid(2z), z = sqrt(2/pi) * (g + 0.044715 g^3)
            out = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
        elif ACTIVATION == "relu2":
            out = tl.maximum(gate, 0.0)
            out = out * out
        else:  # relu
            out = tl.maximum(gate, 0.0)
        if CLAMP == "after":
            out = tl.minimum(out, limit)
        if GATED:
            out = out * up
    return out


@triton.jit
def _block_coords(num_m_blocks, num_cols, group_m, BLOCK_N: tl.constexpr):
    """Program id -> (row block, column block), ``group_m`` row blocks per column sweep (L2 reuse).

    ``group_m`` is a runtime argument: it only orders the programs, so one compiled kernel serves every value.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(num_cols, BLOCK_N)
    per_group = group_m * num_n_blocks
    first_m = (pid // per_group) * group_m
    group_size = tl.minimum(num_m_blocks - first_m, group_m)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _up_kernel(
    # pointers
    x_ptr,  # [T, H] hidden
    w_ptr,  # [E, N, H] or [E, H, N] (strides say which)
    b_ptr,  # [E, N] or a dummy when not HAS_BIAS
    out_ptr,  # [S, I] activations, indexed by pair id
    pair_ids_ptr,  # [P] int32
    block_expert_ptr,  # [B] int32
    num_blocks_ptr,  # [1] int32
    # sizes
    num_pairs,
    H,
    I,
    num_m_blocks,
    group_m,
    alpha,
    limit,
    gate_cap,
    up_cap,
    # strides
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_be,
    stride_bn,
    stride_os,
    stride_oi,
    # compile-time constants
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, I, group_m, BLOCK_N)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pair_M = tl.load(pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # P % BLOCK_M == 0
    row_ok_M = pair_M < num_pairs
    token_M = pair_M // TOP_K

    offs_i_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok_N = offs_i_N < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token_M[:, None] * stride_xt + offs_k[None, :] * stride_xh  # [BM, BK]
    w_base = w_ptr + expert * stride_we
    if INTERLEAVED:
        # gate/up columns alternate: columns [2 i0, 2 i0 + 2 BN) are one contiguous weight tile, one dot,
        # split in registers after the loop (strided gate/up loads would not pipeline)
        offs_c_2N = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        col_ok_2N = offs_c_2N < 2 * I
        w_ptrs = w_base + offs_k[:, None] * stride_wh + offs_c_2N[None, :] * stride_wn  # [BK, 2BN]
        acc_2N = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = offs_k < H - k0
            x = tl.load(x_ptrs, mask=row_ok_M[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok_2N[None, :], other=0.0).to(DOT_DTYPE)
            acc_2N = tl.dot(x, w, acc_2N, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xh
            w_ptrs += BLOCK_K * stride_wh
        if HAS_BIAS:
            b_2N = tl.load(b_ptr + expert * stride_be + offs_c_2N * stride_bn, mask=col_ok_2N, other=0.0)
            acc_2N += b_2N.to(tl.float32)[None, :]
        acc_gate, acc_up = tl.split(tl.reshape(acc_2N, (BLOCK_M, BLOCK_N, 2)))
    else:
        gate_col_N = offs_i_N
        up_col_N = offs_i_N + I
        wg_ptrs = w_base + offs_k[:, None] * stride_wh + gate_col_N[None, :] * stride_wn  # [BK, BN]
        wu_ptrs = w_base + offs_k[:, None] * stride_wh + up_col_N[None, :] * stride_wn  # [BK, BN]
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):  # not range(tl.cdiv(H, BLOCK_K)): triton 3.6's interpreter rejects it
            k_ok = offs_k < H - k0
            x = tl.load(x_ptrs, mask=row_ok_M[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok_N[None, :], other=0.0).to(DOT_DTYPE)
            acc_gate = tl.dot(x, wg, acc_gate, input_precision=DOT_PRECISION)
            if GATED:
                wu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok_N[None, :], other=0.0).to(DOT_DTYPE)
                acc_up = tl.dot(x, wu, acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
            wu_ptrs += BLOCK_K * stride_wh
        if HAS_BIAS:
            b_base = b_ptr + expert * stride_be
            acc_gate += tl.load(b_base + gate_col_N * stride_bn, mask=col_ok_N, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b_base + up_col_N * stride_bn, mask=col_ok_N, other=0.0).to(tl.float32)[None, :]
    act = _activate(acc_gate, acc_up, alpha, limit, gate_cap, up_cap, ACTIVATION, GATED, CLAMP)

    out_ptrs = out_ptr + pair_M[:, None] * stride_os + offs_i_N[None, :] * stride_oi
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok_M[:, None] & col_ok_N[None, :])


@triton.jit
def _down_kernel(
    # pointers
    a_ptr,  # [S, I] activations, indexed by pair id
    w_ptr,  # [E, H, I] or [E, I, H] (strides say which)
    b_ptr,  # [E, H] or a dummy when not HAS_BIAS
    rw_ptr,  # [T, K] routing weights
    out_ptr,  # [S, H] weighted per-pair rows
    pair_ids_ptr,  # [P] int32
    block_expert_ptr,  # [B] int32
    num_blocks_ptr,  # [1] int32
    # sizes
    num_pairs,
    I,
    H,
    num_m_blocks,
    group_m,
    # strides
    stride_as,
    stride_ai,
    stride_we,
    stride_wh,
    stride_wi,
    stride_be,
    stride_bh,
    stride_rt,
    stride_rk,
    stride_os,
    stride_oh,
    # compile-time constants
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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

    a_ptrs = a_ptr + pair_M[:, None] * stride_as + offs_k[None, :] * stride_ai  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wi + offs_h_N[None, :] * stride_wh  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        a = tl.load(a_ptrs, mask=row_ok_M[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok_N[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ai
        w_ptrs += BLOCK_K * stride_wi

    if HAS_BIAS:
        b_N = tl.load(b_ptr + expert * stride_be + offs_h_N * stride_bh, mask=col_ok_N, other=0.0)
        acc += b_N.to(tl.float32)[None, :]
    rw_ptrs = rw_ptr + (pair_M // TOP_K) * stride_rt + (pair_M % TOP_K) * stride_rk
    acc *= tl.load(rw_ptrs, mask=row_ok_M, other=0.0).to(tl.float32)[:, None]

    out_ptrs = out_ptr + pair_M[:, None] * stride_os + offs_h_N[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok_M[:, None] & col_ok_N[None, :])


@triton.jit
def _reduce_kernel(
    y_ptr,  # [S, H] weighted per-pair rows
    out_ptr,  # [T, H]
    H,
    stride_ys,
    stride_yh,
    stride_ot,
    stride_oh,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(TOP_K):  # fixed order: bitwise deterministic
        acc += tl.load(y_ptr + (token * TOP_K + k) * stride_ys + offs_h * stride_yh, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers


class Launch(NamedTuple):
    """One kernel launch, fully specified: what the launchers run and what the compile gate compiles.

    ``args`` are the kernel's runtime arguments in order, ``constexprs`` its compile-time ones; Triton
    specializes ``args`` (pointer alignment, integers equal to 1 or divisible by 16) at launch, and
    :mod:`.compile_gate` applies the same specialization to compile for real targets without a GPU.
    """

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _dot_settings(dtype: torch.dtype, interpret: bool | None = None) -> tuple[tl.dtype, str | None]:
    """(operand dtype of tl.dot, its input precision): fp32 (exact, not tf32) under the interpreter."""
    if (interpreting() if interpret is None else interpret) or dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], None  # fp16/bf16 tensor cores


def _check_device(*tensors: torch.Tensor | None) -> None:
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"moe kernels: all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"moe kernels: Triton needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"moe kernels: {name} must be fp32, fp16 or bf16, got {t.dtype}")


def _check_alignment(alignment: Alignment, block_m: int) -> None:
    pair_ids_P, block_expert_B, num_blocks_1 = alignment
    if pair_ids_P.numel() != block_expert_B.numel() * block_m or num_blocks_1.numel() != 1:
        raise ValueError(
            f"moe kernels: alignment was built for another BLOCK_M (pairs {pair_ids_P.numel()}, "
            f"blocks {block_expert_B.numel()}, BLOCK_M {block_m})"
        )
    for name, t in zip(Alignment._fields, alignment, strict=True):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise TypeError(f"moe kernels: alignment {name} must be contiguous int32, got {t.dtype}")


def up_launch(
    hidden_TH: torch.Tensor,
    alignment: Alignment,
    w_up: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    spec: ExpertSpec,
    top_k: int,
    config: KernelConfig,
    interpret: bool | None = None,
) -> tuple[Launch | None, torch.Tensor]:
    """Checks shapes, allocates ``act_SI [S, I]`` and returns the up kernel's launch (None: nothing to do).

    ``interpret`` overrides :func:`~.configs.interpreting` for the dot settings (the compile gate passes False).
    """
    _check_float("hidden", hidden_TH)
    _check_float("w_up", w_up)
    _check_alignment(alignment, config.block_m)
    if hidden_TH.dim() != 2 or w_up.dim() != 3:
        raise ValueError(f"up: need hidden [T, H] and w_up [E, ., .], got {tuple(hidden_TH.shape)} {tuple(w_up.shape)}")
    T, H = hidden_TH.shape
    E = w_up.shape[0]
    # [E, N, H] -> strides (e, n, h); transposed [E, H, N] -> the same roles, swapped.
    if spec.transposed:
        w_H, N = w_up.shape[1], w_up.shape[2]
        stride_we, stride_wh, stride_wn = w_up.stride()
    else:
        N, w_H = w_up.shape[1], w_up.shape[2]
        stride_we, stride_wn, stride_wh = w_up.stride()
    if w_H != H:
        raise ValueError(f"up: w_up {tuple(w_up.shape)} (transposed={spec.transposed}) does not take hidden size {H}")
    if spec.gated and N % 2:
        raise ValueError(f"up: gated experts need an even up width, got N={N}")
    I = N // 2 if spec.gated else N
    if b_up_EN is not None:
        _check_float("b_up", b_up_EN)
        if tuple(b_up_EN.shape) != (E, N):
            raise ValueError(f"up: b_up must be [E, N] = {(E, N)}, got {tuple(b_up_EN.shape)}")
    S = T * top_k
    out_SI = torch.empty(S, I, dtype=w_up.dtype, device=hidden_TH.device)
    num_m_blocks = alignment.block_expert_B.numel()
    if num_m_blocks == 0 or I == 0:
        return None, out_SI
    bias = b_up_EN if b_up_EN is not None else w_up
    stride_be, stride_bn = b_up_EN.stride() if b_up_EN is not None else (0, 0)
    dot_dtype, precision = _dot_settings(w_up.dtype, interpret)
    c = config
    block_n = max(16, c.block_n // 2) if spec.gated else c.block_n  # gate + up tiles: c.block_n weight columns
    launch = Launch(
        _up_kernel,
        (num_m_blocks * triton.cdiv(I, block_n),),
        (
            hidden_TH, w_up, bias, out_SI, *alignment,
            S, H, I, num_m_blocks, c.group_m, float(spec.alpha), float(spec.limit),
            float(spec.gate_softcap), float(spec.up_softcap),
            hidden_TH.stride(0), hidden_TH.stride(1), stride_we, stride_wn, stride_wh,
            stride_be, stride_bn, out_SI.stride(0), out_SI.stride(1),
        ),
        {
            "TOP_K": top_k, "ACTIVATION": spec.activation, "GATED": spec.gated, "CLAMP": spec.clamp,
            "INTERLEAVED": spec.gated and spec.gate_layout == "interleaved", "HAS_BIAS": b_up_EN is not None,
            "DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision,
            "BLOCK_M": c.block_m, "BLOCK_N": block_n, "BLOCK_K": c.block_k,
        },
        c.num_warps,
        c.num_stages,
    )  # fmt: skip
    return launch, out_SI


def up_projection(
    hidden_TH: torch.Tensor,
    alignment: Alignment,
    w_up: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    spec: ExpertSpec,
    top_k: int,
    config: KernelConfig,
) -> torch.Tensor:
    """Up projection with the activation fused: ``[T, H] -> act_SI [S, I]`` (weight dtype)."""
    _check_device(hidden_TH, w_up, b_up_EN, *alignment)
    launch, out_SI = up_launch(hidden_TH, alignment, w_up, b_up_EN, spec, top_k, config)
    if launch is not None:
        launch.run()
    return out_SI


def down_launch(
    act_SI: torch.Tensor,
    alignment: Alignment,
    topk_weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
    config: KernelConfig,
    interpret: bool | None = None,
) -> tuple[Launch | None, torch.Tensor]:
    """Checks shapes, allocates ``y_SH [S, H]`` and returns the down kernel's launch (None: nothing to do)."""
    _check_float("activations", act_SI)
    _check_float("topk_weights", topk_weights_TK)
    _check_float("w_down", w_down)
    _check_alignment(alignment, config.block_m)
    if act_SI.dim() != 2 or w_down.dim() != 3 or topk_weights_TK.dim() != 2:
        raise ValueError("down: need act [S, I], topk_weights [T, K] and w_down [E, ., .]")
    S, I = act_SI.shape
    T, K = topk_weights_TK.shape
    E = w_down.shape[0]
    if S != T * K:
        raise ValueError(f"down: {S} activation rows for {T} tokens x top-{K}")
    # [E, H, I] -> strides (e, h, i); transposed [E, I, H] -> the same roles, swapped.
    if spec.transposed:
        w_I, H = w_down.shape[1], w_down.shape[2]
        stride_we, stride_wi, stride_wh = w_down.stride()
    else:
        H, w_I = w_down.shape[1], w_down.shape[2]
        stride_we, stride_wh, stride_wi = w_down.stride()
    if w_I != I:
        raise ValueError(f"down: w_down {tuple(w_down.shape)} (transposed={spec.transposed}) does not take I={I}")
    if b_down_EH is not None:
        _check_float("b_down", b_down_EH)
        if tuple(b_down_EH.shape) != (E, H):
            raise ValueError(f"down: b_down must be [E, H] = {(E, H)}, got {tuple(b_down_EH.shape)}")
    out_SH = torch.empty(S, H, dtype=w_down.dtype, device=act_SI.device)
    num_m_blocks = alignment.block_expert_B.numel()
    if num_m_blocks == 0 or H == 0:
        return None, out_SH
    bias = b_down_EH if b_down_EH is not None else w_down
    stride_be, stride_bh = b_down_EH.stride() if b_down_EH is not None else (0, 0)
    dot_dtype, precision = _dot_settings(w_down.dtype, interpret)
    c = config
    launch = Launch(
        _down_kernel,
        (num_m_blocks * triton.cdiv(H, c.block_n),),
        (
            act_SI, w_down, bias, topk_weights_TK, out_SH, *alignment,
            S, I, H, num_m_blocks, c.group_m,
            act_SI.stride(0), act_SI.stride(1), stride_we, stride_wh, stride_wi, stride_be, stride_bh,
            topk_weights_TK.stride(0), topk_weights_TK.stride(1), out_SH.stride(0), out_SH.stride(1),
        ),
        {
            "TOP_K": K, "HAS_BIAS": b_down_EH is not None, "DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision,
            "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
        },
        c.num_warps,
        c.num_stages,
    )  # fmt: skip
    return launch, out_SH


def down_projection(
    act_SI: torch.Tensor,
    alignment: Alignment,
    topk_weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
    config: KernelConfig,
) -> torch.Tensor:
    """Down projection times the routing weight: ``act_SI [S, I] -> y_SH [S, H]`` (weight dtype)."""
    _check_device(act_SI, topk_weights_TK, w_down, b_down_EH, *alignment)
    launch, out_SH = down_launch(act_SI, alignment, topk_weights_TK, w_down, b_down_EH, spec, config)
    if launch is not None:
        launch.run()
    return out_SH


def reduce_launch(
    y_SH: torch.Tensor, top_k: int, out_dtype: torch.dtype, block_h: int | None = None
) -> tuple[Launch | None, torch.Tensor]:
    """Checks shapes, allocates ``out_TH [T, H]`` and returns the reduce kernel's launch (None: nothing to do).

    ``block_h`` defaults to the whole row up to :data:`MAX_REDUCE_BLOCK` columns per program.
    """
    _check_float("per-pair rows", y_SH)
    if y_SH.dim() != 2 or top_k < 1 or y_SH.shape[0] % top_k:
        raise ValueError(f"reduce: {tuple(y_SH.shape)} is not [T*K, H] for K={top_k}")
    S, H = y_SH.shape
    T = S // top_k
    if block_h is None:
        block_h = min(triton.next_power_of_2(max(H, 1)), MAX_REDUCE_BLOCK)
    out_TH = torch.empty(T, H, dtype=out_dtype, device=y_SH.device)
    if T == 0 or H == 0:
        return None, out_TH
    launch = Launch(
        _reduce_kernel,
        (T, triton.cdiv(H, block_h)),
        (y_SH, out_TH, H, y_SH.stride(0), y_SH.stride(1), out_TH.stride(0), out_TH.stride(1)),
        {"TOP_K": top_k, "BLOCK_H": block_h},
        4,
        3,  # Triton's defaults
    )
    return launch, out_TH


def reduce_topk(y_SH: torch.Tensor, top_k: int, out_dtype: torch.dtype, block_h: int | None = None) -> torch.Tensor:
    """``y_SH [T*K, H] -> out_TH [T, H]``: the K rows of each token summed in fp32, in order."""
    _check_device(y_SH)
    launch, out_TH = reduce_launch(y_SH, top_k, out_dtype, block_h)
    if launch is not None:
        launch.run()
    return out_TH
