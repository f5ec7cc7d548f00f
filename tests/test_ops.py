"""The canonical op: its torch implementation against the reference loop, and its registration."""

import pytest
import torch
from conftest import rel_err

from moe_compile.ops import moe_reference, moe_torch
from moe_compile.spec import ExpertSpec

SPECS = [
    ExpertSpec(),
    ExpertSpec(activation="gelu"),
    ExpertSpec(activation="gelu_tanh", gate_layout="interleaved"),
    ExpertSpec(activation="relu", gated=False),
    ExpertSpec(activation="silu", transposed=True),
    ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True, alpha=1.5, limit=3.0),
]


def _inputs(spec, T=7, K=2, E=5, H=12, I=6, bias=False, dtype=torch.float32, seed=0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if spec.gated else I
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    w_up = r(E, H, N) if spec.transposed else r(E, N, H)
    w_down = r(E, I, H) if spec.transposed else r(E, H, I)
    b_up, b_down = (r(E, N), r(E, H)) if bias else (None, None)
    return r(T, H), ids, torch.rand(T, K, generator=g).to(dtype), w_up, w_down, b_up, b_down


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.encode())
@pytest.mark.parametrize("bias", [False, True])
def test_torch_impl_matches_reference(spec, bias):
    args = _inputs(spec, bias=bias)
    assert rel_err(moe_torch(*args, spec), moe_reference(*args, spec)) < 1e-5
    assert rel_err(torch.ops.moe_compile.moe(*args, spec.encode()), moe_reference(*args, spec)) < 1e-5


def test_unused_experts_single_token_and_one_expert():
    spec = ExpertSpec()
    x, ids, w, w_up, w_down, _, _ = _inputs(spec, T=1, K=1, E=9)
    assert rel_err(moe_torch(x, ids, w, w_up, w_down, None, None, spec), moe_reference(x, ids, w, w_up, w_down, None, None, spec)) < 1e-6
    x, ids, w, w_up, w_down, _, _ = _inputs(spec, T=6, K=1, E=4)
    ids = torch.full_like(ids, 2)  # every token on expert 2
    assert rel_err(moe_torch(x, ids, w, w_up, w_down, None, None, spec), moe_reference(x, ids, w, w_up, w_down, None, None, spec)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(dtype):
    spec = ExpertSpec()
    args = _inputs(spec, dtype=dtype)
    out = torch.ops.moe_compile.moe(*args, spec.encode())
    assert out.dtype == dtype and rel_err(out, moe_reference(*args, spec)) < 2e-2


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_and_meta(bias):
    spec = ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True)
    args = _inputs(spec, bias=bias)
    torch.library.opcheck(torch.ops.moe_compile.moe.default, (*args, spec.encode()))
    meta = [a.to("meta") if a is not None else None for a in args]
    assert torch.ops.moe_compile.moe(*meta, spec.encode()).shape == args[0].shape


def test_shape_errors_are_clear():
    spec = ExpertSpec()
    x, ids, w, w_up, w_down, _, _ = _inputs(spec)
    with pytest.raises(RuntimeError, match="do not match hidden size"):
        torch.ops.moe_compile.moe(x[:, :5], ids, w, w_up, w_down, None, None, spec.encode())
    with pytest.raises(RuntimeError, match="topk_weights and topk_ids differ"):
        torch.ops.moe_compile.moe(x, ids, w[:, :1], w_up, w_down, None, None, spec.encode())


def test_spec_round_trip_and_validation():
    spec = ExpertSpec(activation="gelu_tanh", gated=False, transposed=True)
    assert ExpertSpec.decode(spec.encode()) == spec
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ExpertSpec(activation="swish")


@pytest.mark.parametrize("H, I", [(16, 8), (12, 6)])  # noqa: E741 - 16-byte aligned rows use grouped_mm, others loop
def test_grouped_and_loop_paths_agree(H, I):  # noqa: E741
    spec = ExpertSpec()
    args = _inputs(spec, T=11, K=3, E=6, H=H, I=I)
    assert rel_err(moe_torch(*args, spec), moe_reference(*args, spec)) < 1e-5
