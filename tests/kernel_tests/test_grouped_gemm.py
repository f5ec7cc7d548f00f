"""Each grouped GEMM against its torch reference, and the launchers' error messages."""

import pytest
import torch
import triton
import triton.language as tl

from moe_compile.kernels.align import align
from moe_compile.kernels.configs import select_config
from moe_compile.kernels.grouped_gemm import (
    _tanh,
    down_projection,
    reduce_topk,
    up_projection,
)
from moe_compile.spec import ExpertSpec

from .kernel_testing import TOLERANCE, make_experts, rel_err, route
from .references import down_reference, up_reference

T, H, I, E, K = 9, 40, 24, 6, 2  # H and I not multiples of the blocks

SPECS = [
    ExpertSpec(activation="silu"),
    ExpertSpec(activation="gelu", gate_layout="interleaved", transposed=True),
    ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True),
    ExpertSpec(activation="relu", gated=False),
    ExpertSpec(activation="relu2"),
    ExpertSpec(activation="relu2", gated=False, transposed=True),
    # caps small enough that tanh works on both sides of _tanh's series/exp switch (|x / cap| = 0.25)
    ExpertSpec(activation="swiglu_softcap", gate_softcap=0.5, up_softcap=0.8),
    ExpertSpec("swiglu_softcap", gate_layout="interleaved", transposed=True, gate_softcap=0.9, up_softcap=0.3),
    # limits small enough that the clamps bite on O(1) projections
    ExpertSpec(clamp="before", limit=0.5),
    ExpertSpec(activation="gelu_tanh", gate_layout="interleaved", transposed=True, clamp="after", limit=0.2),
]


def _setup(spec, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=gen).to(dtype=dtype, device=device)
    ids_TK, weights_TK = route(T, E, K, device, gen)
    experts = make_experts(E, H, I, spec, bias, dtype, device, gen)
    config = select_config(E, experts[0].shape[1], H, T, K, dtype, torch.device(device))
    return x_TH, ids_TK, weights_TK, experts, config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_up_projection(spec, dtype, device):
    x_TH, ids_TK, _, (w_up, _, b_up, _), config = _setup(spec, dtype, device)
    act_SI = up_projection(x_TH, align(ids_TK, E, config.block_m), w_up, b_up, spec, K, config)
    assert act_SI.shape == (T * K, I) and act_SI.dtype == dtype
    assert rel_err(act_SI, up_reference(x_TH, ids_TK, w_up, b_up, spec)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_down_projection(transposed, dtype, device):
    spec = ExpertSpec(transposed=transposed)
    _, ids_TK, weights_TK, (_, w_down, _, b_down), config = _setup(spec, dtype, device)
    act_SI = torch.randn(T * K, I, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    y_SH = down_projection(act_SI, align(ids_TK, E, config.block_m), weights_TK, w_down, b_down, spec, config)
    assert y_SH.shape == (T * K, H) and y_SH.dtype == dtype
    assert rel_err(y_SH, down_reference(act_SI, ids_TK, weights_TK, w_down, b_down, spec)) < TOLERANCE[dtype]


def test_reduce_topk(device):
    y_SH = torch.randn(T * K, H, generator=torch.Generator().manual_seed(2)).to(device)
    out_TH = reduce_topk(y_SH, K, torch.bfloat16, block_h=16)
    assert out_TH.dtype == torch.bfloat16
    torch.testing.assert_close(out_TH, y_SH.view(T, K, H).sum(1).to(torch.bfloat16))


def test_launcher_errors(device):
    spec = ExpertSpec()
    x_TH, ids_TK, weights_TK, (w_up, w_down, b_up, b_down), config = _setup(spec, torch.float32, device)
    alignment = align(ids_TK, E, config.block_m)
    with pytest.raises(ValueError, match="does not take hidden size"):
        up_projection(x_TH[:, :-1], alignment, w_up, b_up, spec, K, config)
    with pytest.raises(ValueError, match=r"b_up must be \[E, N\]"):
        up_projection(x_TH, alignment, w_up, b_up[:, :-1], spec, K, config)
    with pytest.raises(ValueError, match="even up width"):
        up_projection(x_TH, alignment, w_up[:, :-1], None, spec, K, config)
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        up_projection(x_TH.double(), alignment, w_up, b_up, spec, K, config)
    with pytest.raises(ValueError, match="another BLOCK_M"):
        up_projection(x_TH, align(ids_TK, E, config.block_m * 2), w_up, b_up, spec, K, config)
    act_SI = torch.randn(T * K, I, generator=torch.Generator().manual_seed(3)).to(device)
    with pytest.raises(ValueError, match="does not take I="):
        down_projection(act_SI[:, :-1], alignment, weights_TK, w_down, b_down, spec, config)
    with pytest.raises(ValueError, match="activation rows"):
        down_projection(act_SI[:-1], alignment, weights_TK, w_down, b_down, spec, config)
    with pytest.raises(ValueError, match=r"b_down must be \[E, H\]"):
        down_projection(act_SI, alignment, weights_TK, w_down, b_up, spec, config)
    with pytest.raises(ValueError, match=r"not \[T\*K, H\]"):
        reduce_topk(torch.empty(5, H, device=device), 2, torch.float32, block_h=16)
    if device == "cuda":
        with pytest.raises(ValueError, match="one device"):
            up_projection(x_TH.cpu(), alignment, w_up, b_up, spec, K, config)


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _tanh(x), mask=offs < n)


def test_kernel_tanh_is_accurate_near_zero_and_far(device):
    """The epilogue's own tanh (no libdevice under the interpreter): a few ulp, elementwise, across the switch."""
    mag = torch.cat([torch.logspace(-7, 1.5, 120), torch.tensor([0.2499, 0.25, 0.2501])])
    x = torch.cat([mag, -mag, torch.zeros(1)]).to(torch.float32).to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    want = torch.tanh(x.double())
    # 1e-6: a few fp32 ulp (the GPU's exp is an approximation too); exp alone near 0 is off by percents
    assert ((out.double() - want).abs() / want.abs().clamp_min(1e-30)).max() < 1e-6
    assert out[-1] == 0
