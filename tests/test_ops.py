"""The canonical op: its torch implementation against the reference loop, and its registration."""

import sys

import pytest
import torch
from conftest import rel_err

from moe_compile import moe_math as ops  # the op's maths (``moe_compile.ops.moe`` is the op)
from moe_compile.ops import moe_reference, moe_torch
from moe_compile.spec import ExpertSpec

SPECS = [
    ExpertSpec(),
    ExpertSpec(activation="gelu"),
    ExpertSpec(activation="gelu_tanh", gate_layout="interleaved"),
    ExpertSpec(activation="relu", gated=False),
    ExpertSpec(activation="silu", transposed=True),
    ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True, alpha=1.5, limit=3.0),
    ExpertSpec(scale_input=True),  # Llama 4: the routing weight scales the experts' input
    ExpertSpec(activation="gelu", gated=False, transposed=True, scale_input=True),
    ExpertSpec(activation="relu2"),
    ExpertSpec(activation="relu2", gated=False, transposed=True),
    # small caps: the tanh bites on these O(1) activations
    ExpertSpec(activation="swiglu_softcap", gate_softcap=0.7, up_softcap=1.3),
    ExpertSpec("swiglu_softcap", gate_layout="interleaved", transposed=True, gate_softcap=1.1, up_softcap=0.6),
    # small limits: the clamps bite on these O(1) projections
    ExpertSpec(clamp="before", limit=0.4),  # GLM-5-Next / HY-V4
    ExpertSpec(activation="gelu", gate_layout="interleaved", transposed=True, clamp="after", limit=0.3),  # Step-3.7
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
    args = (x, ids, w, w_up, w_down, None, None, spec)
    assert rel_err(moe_torch(*args), moe_reference(*args)) < 1e-6
    x, ids, w, w_up, w_down, _, _ = _inputs(spec, T=6, K=1, E=4)
    args = (x, torch.full_like(ids, 2), w, w_up, w_down, None, None, spec)  # every token on expert 2
    assert rel_err(moe_torch(*args), moe_reference(*args)) < 1e-6


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_input_is_llama4s_dense_experts_on_scaled_inputs(dtype):
    """``scale_input``: sum_k expert(w_k * x): every expert run on ``x`` scaled by a score zero off the top k."""
    spec = ExpertSpec(transposed=True, scale_input=True)
    x, ids, w, w_up, w_down, _, _ = _inputs(spec, T=9, K=2, E=6, dtype=dtype)
    scores_TE = torch.zeros(9, 6, dtype=dtype).scatter(1, ids, w)  # as Llama4Router builds them
    dense = torch.zeros(9, x.shape[1])
    for e in range(6):  # Llama4TextExperts: bmm over all experts
        gate, up = (x * scores_TE[:, e : e + 1]).float().matmul(w_up[e].float()).chunk(2, dim=-1)
        dense += (torch.nn.functional.silu(gate) * up).matmul(w_down[e].float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(moe_torch(x, ids, w, w_up, w_down, None, None, spec), dense) < tol
    # and it is another function than weighting the output (the spec is not ignored)
    plain = ExpertSpec(transposed=True)
    assert rel_err(moe_torch(x, ids, w, w_up, w_down, None, None, plain), dense) > 0.05


def test_up_and_down_weights_must_pair():
    spec = ExpertSpec()
    x, ids, w, w_up, w_down, _, _ = _inputs(spec)
    with pytest.raises(RuntimeError, match="are not an up/down pair"):
        torch.ops.moe_compile.moe(x, ids, w, w_up, w_down[..., :-1], None, None, spec.encode())


def test_spec_round_trip_and_validation():
    spec = ExpertSpec(activation="gelu_tanh", gated=False, transposed=True)
    assert ExpertSpec.decode(spec.encode()) == spec
    scaled = ExpertSpec(scale_input=True)
    assert ExpertSpec.decode(scaled.encode()) == scaled and "scales the input" in scaled.describe()
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ExpertSpec(activation="swish")
    with pytest.raises(ValueError, match="swiglu_softcap is a gated activation"):
        ExpertSpec(activation="swiglu_softcap", gated=False)
    with pytest.raises(ValueError, match="softcaps must be positive"):
        ExpertSpec(activation="swiglu_softcap", up_softcap=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamped_activations_equal_transformers(dtype):
    """The two clamped SwiGLUs against the transformers experts they stand for: GLM-5-Next/HY-V4 bound the gate
    before the SiLU, Step-3.7 bounds the activated gate; both bound up to [-limit, limit]."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    hy_v4 = pytest.importorskip("transformers.models.hy_v4.modeling_hy_v4", reason="HY-V4 is new in transformers 5.25")
    step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
    g = torch.Generator().manual_seed(2)
    up_SN = (torch.randn(64, 2 * 24, generator=g) * 12).to(dtype)  # wide enough that a limit of 7 bites
    before = ExpertSpec(clamp="before", limit=7.0)
    want = hy_v4.HYV4Experts._apply_gate(SimpleNamespace(swiglu_limit=7.0), up_SN)
    torch.testing.assert_close(ops.activate(up_SN, before), want, rtol=0, atol=0)
    after = ExpertSpec(clamp="after", limit=7.0)
    want = step3p7.Step3p7Experts._apply_gate(SimpleNamespace(act_fn=F.silu, limit=7.0), up_SN)
    torch.testing.assert_close(ops.activate(up_SN, after), want, rtol=0, atol=0)
    # and the bounds matter: the plain SwiGLU and the other placement are not these
    assert rel_err(ops.activate(up_SN, ExpertSpec()), want) > 1e-2
    if dtype == torch.float32:  # silu(7) = 6.994 (7 in bf16): the placements differ by limit * sigmoid(-limit)
        assert rel_err(ops.activate(up_SN, before), want) > 1e-4


def test_clamp_is_for_plain_gated_activations():
    with pytest.raises(ValueError, match="unknown clamp"):
        ExpertSpec(clamp="around")
    with pytest.raises(ValueError, match="bounds a plain gated activation"):
        ExpertSpec(gated=False, clamp="before")
    with pytest.raises(ValueError, match="bounds a plain gated activation"):
        ExpertSpec(activation="swiglu_oai", clamp="after")
    assert "clamped at 10 before" in ExpertSpec(clamp="before", limit=10.0).describe()


@pytest.mark.parametrize(
    "spec",
    [
        ExpertSpec(activation="relu2", gated=False),
        ExpertSpec(activation="swiglu_softcap", gate_softcap=0.1, up_softcap=1 / 3),
        ExpertSpec(activation="swiglu_softcap", gate_softcap=4.000000000000001, up_softcap=1e-20),
        ExpertSpec(activation="swiglu_oai", alpha=1.702, limit=7.0000001),
    ],
    ids=lambda s: s.activation,
)
def test_spec_round_trips_floats_exactly(spec):
    back = ExpertSpec.decode(spec.encode())
    assert back == spec
    for name in ("alpha", "limit", "gate_softcap", "up_softcap"):  # bit for bit, not merely close
        assert getattr(back, name).hex() == getattr(spec, name).hex(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_activations_equal_transformers(dtype):
    """relu² and the softcapped SwiGLU against the transformers modules they stand for, not against ourselves."""
    from transformers.activations import ACT2FN
    from transformers.models.inkling2.configuration_inkling2 import Inkling2TextConfig
    from transformers.models.inkling2.modeling_inkling2 import Inkling2SoftcappedSwiGLU

    g = torch.Generator().manual_seed(1)
    up_SN = (torch.randn(64, 2 * 24, generator=g) * 6).to(dtype)  # wide enough that the 4 / 25 caps bite
    relu2 = ops.activate(up_SN, ExpertSpec(activation="relu2", gated=False))
    torch.testing.assert_close(relu2, ACT2FN["relu2"](up_SN), rtol=0, atol=0)
    config = Inkling2TextConfig(mlp_gate_softcap=3.0, mlp_up_softcap=7.5)
    spec = ExpertSpec(activation="swiglu_softcap", gate_softcap=3.0, up_softcap=7.5)
    got = ops.activate(up_SN, spec)
    want = Inkling2SoftcappedSwiGLU(config)(*up_SN.chunk(2, dim=-1))
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and the caps matter: the plain SwiGLU is not this
    assert rel_err(ops.activate(up_SN, ExpertSpec()), want) > 1e-2


@pytest.mark.parametrize(
    "spec",
    [
        ExpertSpec(activation="relu2", gated=False),
        ExpertSpec(activation="relu2", gate_layout="interleaved"),
        ExpertSpec(activation="swiglu_softcap", gate_softcap=0.7, up_softcap=1.3),
    ],
    ids=lambda s: s.describe(),
)
def test_new_activations_bf16(spec):
    args = _inputs(spec, T=9, K=2, E=5, H=16, I=8, bias=True, dtype=torch.bfloat16)
    out = torch.ops.moe_compile.moe(*args, spec.encode())
    fp32 = [a.float() if a is not None and a.is_floating_point() else a for a in args]
    assert out.dtype == torch.bfloat16
    assert rel_err(out, moe_reference(*fp32, spec)) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, I, grouped", [(16, 8, True), (10, 5, False)])  # noqa: E741
def test_grouped_and_loop_paths_agree(H, I, grouped, dtype, monkeypatch):  # noqa: E741
    """16-byte aligned rows run grouped_mm (up and down), others the per-expert loop; both exact."""
    calls, grouped_mm = [], ops._grouped_mm

    def counting_grouped_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return grouped_mm(*args, **kwargs)

    if grouped and not ops._GROUPED_MM_ON_CPU:
        pytest.skip("this torch build has no CPU grouped_mm")
    monkeypatch.setattr(ops, "_grouped_mm", counting_grouped_mm)
    spec = ExpertSpec()
    H, I = (2 * H, 2 * I) if dtype == torch.bfloat16 else (H, I)  # 16 bytes = 8 bf16 values  # noqa: E741
    args = _inputs(spec, T=11, K=3, E=6, H=H, I=I, dtype=dtype)
    assert rel_err(moe_torch(*args, spec), moe_reference(*args, spec)) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert len(calls) == (2 if grouped else 0), calls


def test_the_op_and_its_module_have_different_names():
    """``moe_compile.ops.moe`` is the op; its module is ``moe_compile.ops.canonical`` (no shadowing)."""
    import importlib

    import moe_compile.ops

    assert moe_compile.ops.moe is importlib.import_module("moe_compile.ops.canonical").moe
    assert "moe_compile.ops.moe" not in sys.modules and moe_compile.ops.moe_torch is ops.moe_torch
