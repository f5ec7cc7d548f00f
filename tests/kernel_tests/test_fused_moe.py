"""The whole Triton MoE layer against ``moe_reference`` / ``moe_torch``, and the custom op."""

import itertools

import pytest
import torch

from moe_compile import ops
from moe_compile.kernels import fused_moe
from moe_compile.spec import ExpertSpec

from .kernel_testing import DEVICE, TOLERANCE, make_experts, rel_err, route

GATED_ACTS = ["silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai"]
PLAIN_ACTS = ["silu", "gelu", "gelu_tanh", "relu", "relu2"]
VARIANTS = [
    pytest.param(
        ExpertSpec(activation=act, gate_layout=layout, transposed=tr), bias, id=f"{act}-{layout}-t{tr:d}-b{bias:d}"
    )
    for act, layout, tr, bias in itertools.product(GATED_ACTS, ["concat", "interleaved"], [False, True], [False, True])
] + [
    pytest.param(ExpertSpec(activation=act, gated=False, transposed=tr), bias, id=f"{act}-plain-t{tr:d}-b{bias:d}")
    for act, tr, bias in itertools.product(PLAIN_ACTS, [False, True], [False, True])
]
VARIANTS += [  # caps small enough that the tanh bites on O(1) activations
    pytest.param(
        ExpertSpec("swiglu_softcap", gate_layout=layout, transposed=tr, gate_softcap=0.6, up_softcap=0.9),
        bias,
        id=f"swiglu_softcap-{layout}-t{tr:d}-b{bias:d}",
    )
    for layout, tr, bias in itertools.product(["concat", "interleaved"], [False, True], [False, True])
]
SOFTCAP = ExpertSpec(activation="swiglu_softcap", gate_layout="interleaved", gate_softcap=0.6, up_softcap=0.9)
VARIANTS += [
    pytest.param(ExpertSpec(transposed=True, scale_input=True), bias, id=f"silu-scale-input-t1-b{bias:d}")
    for bias in (False, True)
]


def _inputs(T, H, I, E, K, spec=ExpertSpec(), bias=False, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(T, H, generator=gen).to(dtype=dtype, device=device)
    ids_TK, weights_TK = route(T, E, K, device, gen)
    return [hidden_TH, ids_TK, weights_TK.to(dtype), *make_experts(E, H, I, spec, bias, dtype, device, gen)]


def _check(args, spec, dtype=torch.float32):
    out = fused_moe(*args, spec)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    err = rel_err(out, ops.moe_reference(*args, spec))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    return out


@pytest.mark.parametrize("spec,bias", VARIANTS)
def test_variants_fp32(spec, bias, device):
    args = _inputs(T=5, H=24, I=20, E=4, K=2, spec=spec, bias=bias, device=device)
    _check(args, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "spec,bias",
    [
        (ExpertSpec(), False),
        (ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True), True),
        (ExpertSpec(activation="relu2", gated=False), True),
        (SOFTCAP, True),
    ],
    ids=["silu", "swiglu_oai", "relu2", "swiglu_softcap"],
)
def test_half_precision(spec, bias, dtype, device):
    args = _inputs(T=9, H=40, I=24, E=6, K=2, spec=spec, bias=bias, dtype=dtype, device=device)
    out = _check(args, spec, dtype)
    assert rel_err(out, ops.moe_torch(*args, spec)) < TOLERANCE[dtype]


@pytest.mark.parametrize("K", [1, 2, 8])
def test_top_k(K, device):
    _check(_inputs(T=6, H=16, I=16, E=8, K=K, device=device), ExpertSpec())


@pytest.mark.parametrize("E", [60, 160])
def test_many_experts(E, device):
    _check(_inputs(T=16, H=16, I=16, E=E, K=8, device=device), ExpertSpec())


def test_one_token(device):
    _check(_inputs(T=1, H=16, I=16, E=8, K=2, device=device), ExpertSpec())


def test_odd_sizes(device):
    spec = ExpertSpec(gate_layout="interleaved")
    _check(_inputs(T=7, H=13, I=7, E=5, K=3, spec=spec, bias=True, device=device), spec)


def test_empty_experts(device):
    args = _inputs(T=8, H=16, I=16, E=8, K=2, device=device)
    args[1] = torch.tensor([[5, 2], [2, 5]] * 4, device=device)  # experts 0, 1, 3, 4, 6, 7 get nothing
    _check(args, ExpertSpec())


def test_all_tokens_on_one_expert(device):
    args = _inputs(T=16, H=16, I=16, E=4, K=2, device=device)
    args[1] = torch.full((16, 2), 3, device=device)  # both slots on expert 3: 32 rows, two blocks
    _check(args, ExpertSpec())


def test_non_contiguous_inputs(device):
    spec = ExpertSpec(transposed=True)
    args = _inputs(T=6, H=24, I=16, E=4, K=2, spec=spec, bias=True, device=device)
    gen = torch.Generator().manual_seed(1)
    args[0] = torch.randn(6, 3 * 24, generator=gen).to(device)[:, 1::3]  # strided view [T, H]
    args[2] = torch.rand(2, 6, generator=gen).to(device).t()  # [T, K] column-major
    args[3] = (torch.randn(4, 2 * 16, 24, generator=gen) * 0.2).to(device).transpose(1, 2)  # [E, H, N], non-contiguous
    assert not any(a.is_contiguous() for a in (args[0], args[2], args[3]))
    _check(args, spec)


def test_deterministic(device):
    args = _inputs(T=16, H=24, I=16, E=4, K=4, dtype=torch.bfloat16, device=device)
    assert torch.equal(fused_moe(*args, ExpertSpec()), fused_moe(*args, ExpertSpec()))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA sync debug mode")
def test_no_host_sync_in_launch():
    args = _inputs(T=64, H=128, I=96, E=60, K=8, dtype=torch.bfloat16, device="cuda")
    fused_moe(*args, ExpertSpec())  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(*args, ExpertSpec())
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_schema_matches_canonical_op():
    canonical = str(torch.ops.moe_compile.moe.default._schema).replace("moe_compile::moe(", "moe_compile::moe_triton(")
    assert str(torch.ops.moe_compile.moe_triton.default._schema) == canonical


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias, device):
    spec = ExpertSpec(gate_layout="interleaved")
    args = _inputs(T=4, H=16, I=16, E=4, K=2, spec=spec, bias=bias, device=device)
    torch.library.opcheck(torch.ops.moe_compile.moe_triton.default, (*args, spec.encode()))


def test_torch_compile_fullgraph(device):
    spec = ExpertSpec()
    hidden_TH, _, _, w_up, w_down, _, _ = _inputs(T=6, H=16, I=16, E=4, K=2, device=device)
    router_HE = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)).to(device)

    def block(x_TH: torch.Tensor) -> torch.Tensor:
        weights_TK, ids_TK = torch.topk((x_TH @ router_HE).softmax(-1), 2)
        return (
            torch.ops.moe_compile.moe_triton(x_TH, ids_TK, weights_TK, w_up, w_down, None, None, spec.encode()) + x_TH
        )

    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden_TH), block(hidden_TH))
    weights_TK, ids_TK = torch.topk((hidden_TH @ router_HE).softmax(-1), 2)
    ref = ops.moe_reference(hidden_TH, ids_TK, weights_TK, w_up, w_down, None, None, spec) + hidden_TH
    assert rel_err(compiled(hidden_TH), ref) < 1e-5


def test_fused_moe_checks_inputs(device):
    args = _inputs(T=4, H=16, I=16, E=4, K=2, device=device)
    args[0] = args[0][:, :8]
    with pytest.raises(RuntimeError, match="do not match hidden size"):
        fused_moe(*args, ExpertSpec())
