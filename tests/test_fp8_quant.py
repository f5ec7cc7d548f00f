"""FP8 block-scaled experts: the W8A8 emulation (``moe_compile::moe_fp8``) against a straightforward reference.

The reference below is written independently of :mod:`moe_compile.quant.fp8`: one (token, expert) pair at a
time, each activation group quantized by its own loop, each weight block dequantized on its own, float64 sums.
Fresh random inputs, sizes that are not multiples of 128 (partial edge blocks), gated and plain experts.
"""

from __future__ import annotations

import math

import pytest
import torch

import moe_compile  # noqa: F401  (registers the ops)
from moe_compile.ops import activate, moe_torch
from moe_compile.quant.fp8 import (
    check_weight_scales,
    dequantize_weight,
    quantize_activations,
    quantize_weight,
    scales_to_float32,
)
from moe_compile.spec import ExpertSpec

BLOCK = (128, 128)


def fp8_spec(**kw) -> ExpertSpec:
    return ExpertSpec(quant="fp8_block", block_n=128, block_k=128, scale_dtype="float32", **kw)


def ref_quant_row(x: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """One row, group by group: (dequantizable e4m3 values as float64, scale) per 128 channels."""
    qs, scales = [], []
    for start in range(0, x.numel(), 128):
        g = x[start : start + 128].double()
        scale = max(g.abs().max().item(), 1e-10) / 448.0
        scale = torch.tensor(scale, dtype=torch.float32).item()  # the scale is an fp32 number
        q = (g.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        qs.append(q)
        scales.append(scale)
    return qs, scales


def ref_weight(q: torch.Tensor, s: torch.Tensor, gated_halves: bool) -> torch.Tensor:
    """Dequantize one expert's weight block by block (float64)."""
    N, K = q.shape
    out = torch.empty(N, K, dtype=torch.float64)
    halves = [(0, N // 2), (N // 2, N)] if gated_halves else [(0, N)]
    row_block = 0
    for lo, hi in halves:
        for r0 in range(lo, hi, 128):
            r1 = min(r0 + 128, hi)
            for kb, c0 in enumerate(range(0, K, 128)):
                out[r0:r1, c0 : c0 + 128] = q[r0:r1, c0 : c0 + 128].double() * s[row_block, kb].double()
            row_block += 1
    return out


def ref_w8a8(x_row: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x_row [K]`` quantized per 128-channel group, times the dequantized weight ``[N, K]``; float64."""
    qs, scales = ref_quant_row(x_row)
    out = torch.zeros(w.shape[0], dtype=torch.float64)
    for b, (q, sc) in enumerate(zip(qs, scales, strict=True)):
        out += (w[:, b * 128 : b * 128 + q.numel()] @ q) * sc
    return out


def reference(x, ids, weights, qu, qd, su, sd, spec, b_up=None, b_down=None):
    T, K = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            xin = x[t] * weights[t, k].to(x.dtype) if spec.scale_input else x[t]
            up = ref_w8a8(xin, ref_weight(qu[e], su[e], spec.gated))
            if b_up is not None:
                up = up + b_up[e].double()
            act = activate(up.float(), spec).to(x.dtype)
            y = ref_w8a8(act, ref_weight(qd[e], sd[e], False))
            if b_down is not None:
                y = y + b_down[e].double()
            out[t] += y * (1.0 if spec.scale_input else float(weights[t, k]))
    return out


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(E, H, I, gated, seed, dtype=torch.float32):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    wu = torch.randn(E, N, H, generator=gen) / math.sqrt(H)
    wd = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    # blocks of very different magnitudes: a wrong block index shows
    wu = wu * torch.rand(E, N, 1, generator=gen).mul(8).exp2()
    qu, su = quantize_weight(wu, BLOCK, 2 if gated else 1)
    qd, sd = quantize_weight(wd, BLOCK)
    return qu, su, qd, sd


@pytest.mark.parametrize(
    "E,H,I,T,K,gated,act,scale_input,bias",
    [
        (4, 200, 72, 9, 2, True, "silu", False, False),  # partial blocks in H and I, I < 128 (two gate/up rows)
        (3, 136, 256, 5, 3, True, "gelu", False, True),  # I a multiple of 128, H one full + one partial block
        (5, 130, 40, 6, 1, False, "relu2", False, False),  # plain experts, top-1
        (3, 96, 72, 7, 2, True, "silu", True, False),  # the routing weight scales the input (Llama 4)
    ],
)
def test_moe_fp8_matches_straightforward_reference(E, H, I, T, K, gated, act, scale_input, bias):  # noqa: E741
    seed = int(torch.randint(0, 2**31, (1,)))
    qu, su, qd, sd = make(E, H, I, gated, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen).mul(6).exp2()
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
    w = torch.rand(T, K, generator=gen)
    N = 2 * I if gated else I
    b_up = torch.randn(E, N, generator=gen) if bias else None
    b_down = torch.randn(E, H, generator=gen) if bias else None
    spec = fp8_spec(activation=act, gated=gated, scale_input=scale_input)
    got = torch.ops.moe_compile.moe_fp8(x, ids, w, qu, qd, su, sd, b_up, b_down, spec.encode())
    ref = reference(x, ids, w, qu, qd, su, sd, spec, b_up, b_down)
    assert got.dtype == x.dtype and got.shape == x.shape
    # fp32 sums in another order than float64 can move a re-quantized activation by one e4m3 step
    assert rel(got, ref) < 1e-3, (seed, rel(got, ref))
    close = (got.double() - ref).abs() <= 1e-4 * ref.abs().max()
    assert close.float().mean() > 0.95, seed


def test_bf16_activations_and_unused_experts():
    qu, su, qd, sd = make(6, 160, 48, True, 5)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 160, generator=gen).bfloat16()
    ids = torch.randint(0, 2, (8, 2), generator=gen)  # experts 2..5 get no token
    w = torch.rand(8, 2, generator=gen).bfloat16()
    got = torch.ops.moe_compile.moe_fp8(x, ids, w, qu, qd, su, sd, None, None, fp8_spec().encode())
    ref = reference(x, ids, w, qu, qd, su, sd, fp8_spec())
    assert got.dtype == torch.bfloat16
    assert rel(got, ref) < 1e-2


def test_emulation_near_dequantized_weights():
    """W8A8 against the same weights dequantized (only the activations' quantization differs): a few percent."""
    qu, su, qd, sd = make(4, 256, 128, True, 7)
    gen = torch.Generator().manual_seed(8)
    x, ids, w = torch.randn(16, 256, generator=gen), torch.randint(0, 4, (16, 2), generator=gen), torch.rand(16, 2)
    got = torch.ops.moe_compile.moe_fp8(x, ids, w, qu, qd, su, sd, None, None, fp8_spec().encode())
    wu, wd = dequantize_weight(qu, su, BLOCK, 2), dequantize_weight(qd, sd, BLOCK)
    dense = moe_torch(x, ids, w, wu, wd, None, None, ExpertSpec())
    assert 1e-4 < rel(got, dense) < 0.08


def test_activation_quantizer_groups():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=gen) * 50
    x[1, 128:256] = 0  # an all-zero group: finite scale, zeros
    q, s = quantize_activations(x, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (3, 3)
    for r in range(3):
        qs, scales = ref_quant_row(x[r])
        assert torch.equal(torch.cat(qs).float(), q[r].float())
        assert s[r].tolist() == pytest.approx(scales, rel=0, abs=0)
    assert q.float().abs().max() <= 448


def test_scale_checks_are_clear():
    qu, su, qd, sd = make(2, 200, 72, True, 3)
    with pytest.raises(ValueError, match=r"scale shape \(2, 3, 2\) does not match weight"):
        check_weight_scales("w_up", qu, torch.ones(2, 3, 2), BLOCK, 2)
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        check_weight_scales("w_up", qu.float(), su, BLOCK, 2)
    with pytest.raises(ValueError, match="scale must be float32"):
        check_weight_scales("w_down", qd, sd.bfloat16(), BLOCK)
    # I = 192: 384 rows in 3 blocks of 128 would put rows 128..255 (gate and up) in one block
    q = torch.zeros(1, 384, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="straddle the gate/up boundary"):
        check_weight_scales("gate_up_proj", q, torch.ones(1, 3, 1), BLOCK, 2)
    bad = torch.ops.moe_compile.moe_fp8
    x, ids, w = torch.randn(2, 200), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="w_down: scale shape"):
        bad(x, ids, w, qu, qd, su, sd[:, :1, :1].contiguous(), None, None, fp8_spec().encode())
    with pytest.raises(ValueError, match="interleaved rows straddle blocks"):
        fp8_spec(gate_layout="interleaved")


def test_scale_formats_convert_exactly():
    powers = torch.tensor([2.0**-20, 0.5, 1.0, 8.0, 2.0**30])
    e8m0 = powers.to(torch.float8_e8m0fnu)
    assert torch.equal(scales_to_float32(e8m0), powers)
    b = torch.randn(5).bfloat16()
    assert torch.equal(scales_to_float32(b), b.float())
    with pytest.raises(ValueError, match="not supported"):
        scales_to_float32(torch.ones(2, dtype=torch.float64))


def test_spec_round_trip():
    spec = fp8_spec(activation="gelu")
    assert ExpertSpec.decode(spec.encode()) == spec
    assert "fp8 e4m3" in spec.describe_quant() and "128x128" in spec.describe_quant()
    assert ExpertSpec().describe_quant() == "-"
