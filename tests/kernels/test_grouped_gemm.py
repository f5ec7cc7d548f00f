"""Each grouped GEMM against its torch reference, and the launchers' error messages."""

import pytest
import torch

from moe_compile.kernels.align import align
from moe_compile.kernels.configs import select_config
from moe_compile.kernels.grouped_gemm import down_projection, down_reference, reduce_topk, up_projection, up_reference
from moe_compile.spec import ExpertSpec

from .kernel_testing import TOLERANCE, make_experts, rel_err, route

T, H, I, E, K = 9, 40, 24, 6, 2  # H and I not multiples of the blocks

SPECS = [
    ExpertSpec(activation="silu"),
    ExpertSpec(activation="gelu", gate_layout="interleaved", transposed=True),
    ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True),
    ExpertSpec(activation="relu", gated=False),
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
