"""The block-fp8 Triton MoE layer (``moe_compile::moe_fp8_triton``) against the torch W8A8 emulation.

On CPU the interpreter runs the kernels; both ways of reading e4m3 run there: ``native`` (bitcast) and
``decode`` (the integer decoding sm_80 uses).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from moe_compile.kernels.fp8_moe import _e4m3_to_f32, fused_moe_fp8
from moe_compile.quant.fp8 import moe_fp8_torch, quantize_weight
from moe_compile.spec import ExpertSpec

from .kernel_testing import rel_err, route


def fp8_spec(**kw) -> ExpertSpec:
    return ExpertSpec(quant="fp8_block", block_n=128, block_k=128, scale_dtype="float32", **kw)


def _case(E, H, I, T, K, gated, bias, dtype, device, seed):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    wu = torch.randn(E, N, H, generator=gen) / math.sqrt(H) * torch.rand(E, N, 1, generator=gen).mul(6).exp2()
    wd = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    qu, su = quantize_weight(wu, (128, 128), 2 if gated else 1)
    qd, sd = quantize_weight(wd, (128, 128))
    x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen).mul(4).exp2()).to(dtype)
    ids, w = route(T, E, K, "cpu", gen)
    b_up = torch.randn(E, N, generator=gen).to(dtype) if bias else None
    b_down = torch.randn(E, H, generator=gen).to(dtype) if bias else None
    args = (x, ids, w.to(dtype), qu, qd, su, sd, b_up, b_down)
    return tuple(a.to(device) if a is not None else None for a in args)


@pytest.mark.parametrize("mode", ["native", "decode"])
@pytest.mark.parametrize(
    "E,H,I,K,gated,act,bias",
    [
        (3, 200, 40, 2, True, "silu", False),  # partial K blocks in H, I < 128
        (4, 144, 24, 1, False, "gelu", True),  # plain experts with biases, top-1
    ],
)
def test_fp8_kernels_match_emulation(mode, E, H, I, K, gated, act, bias, device):  # noqa: E741
    spec = fp8_spec(activation=act, gated=gated)
    seed = int(torch.randint(0, 2**31, (1,)))  # fresh inputs each run; the seed is in the failure message
    args = _case(E, H, I, 6, K, gated, bias, torch.float32, device, seed=seed)
    got = fused_moe_fp8(*args, spec, mode=mode if device == "cpu" else None)
    ref = moe_fp8_torch(*args, spec)
    assert got.dtype == ref.dtype
    # equal up to fp32 summation order (BLOCK_K steps vs whole 128 blocks), which can move one re-quantized value
    assert rel_err(got, ref) < 1e-3, f"seed {seed}"


def test_fp8_kernels_bf16_and_scale_input(device):
    spec = fp8_spec(scale_input=True)
    args = _case(3, 136, 32, 5, 2, True, False, torch.bfloat16, device, seed=4)
    got = fused_moe_fp8(*args, spec, mode="decode" if device == "cpu" else None)
    ref = moe_fp8_torch(*args, spec)
    assert got.dtype == torch.bfloat16
    # the interpreter truncates fp32 -> bf16 stores; the kernels round in integer arithmetic first (_round_bf16)
    assert rel_err(got, ref) < 1e-3


@pytest.mark.parametrize("clamp", ["before", "after"])
def test_fp8_kernels_clamped_activation(clamp, device):
    """GLM-5-Next / Step-3.7's bounded SwiGLU in the fp8 epilogue: the limit bites on these projections."""
    spec = fp8_spec(clamp=clamp, limit=0.5)
    args = _case(3, 144, 32, 6, 2, True, False, torch.float32, device, seed=5)
    got = fused_moe_fp8(*args, spec, mode="decode" if device == "cpu" else None)
    ref = moe_fp8_torch(*args, spec)
    assert rel_err(got, ref) < 1e-3
    assert rel_err(ref, moe_fp8_torch(*args, fp8_spec())) > 1e-2  # and the clamp matters here


@triton.jit
def _decode_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst + offs, _e4m3_to_f32(tl.load(src + offs, mask=ok, other=0)), mask=ok)


def test_e4m3_decoding_is_exact_for_every_finite_code(device):
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]  # 0x7F / 0xFF are e4m3fn's NaNs
    src = finite.to(device)
    dst = torch.empty(finite.numel(), dtype=torch.float32, device=device)
    _decode_kernel[(1,)](src, dst, finite.numel(), BLOCK=256)
    expected = finite.view(torch.float8_e4m3fn).float().to(device)
    assert torch.equal(dst, expected)
    # -0.0 stays -0.0 for every non-zero code; 0x80 (-0.0) may decode to +0.0 (triton 3.6's interpreter does):
    # the sign of a zero weight changes no product or sum the kernels compute
    nonzero = expected != 0
    assert torch.equal(torch.signbit(dst[nonzero]), torch.signbit(expected[nonzero]))


def test_fp8_triton_op_through_torch_compile(device):
    """The op moe_fp8_triton (what lower_triton retargets to) with the op's schema, under torch.compile."""
    spec = fp8_spec()
    args = _case(3, 64, 32, 4, 2, True, False, torch.float32, device, seed=2)

    def block(x):
        return torch.ops.moe_compile.moe_fp8_triton(x, *args[1:], spec.encode())

    got = torch.compile(block, backend="aot_eager", fullgraph=True)(args[0])
    assert rel_err(got, moe_fp8_torch(*args, spec)) < 1e-3
