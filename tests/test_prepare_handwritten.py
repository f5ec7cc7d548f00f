"""moe_compile.prepare on hand-written MoE modules that route their own tokens (tests/handwritten_moe.py).

Each form becomes one canonical call per layer (``RoutedExperts``) only after its routing rule and
experts reproduce the module on random inputs; a form that is not a top-k MoE is left alone.
"""

import pytest
import torch
from conftest import rel_err
from handwritten_moe import HandwrittenLM

import moe_compile
from moe_compile.prepare import RoutedExperts, prepare_report
from moe_compile.verify import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "act, gated, bias", [("silu", True, False), ("gelu", False, True)], ids=["swiglu", "gelu-bias"]
)
@pytest.mark.parametrize("form", ["loop", "dense", "einsum"])
def test_handwritten_moe_prepared_compiled_and_exact(form, act, gated, bias, dtype):
    torch.manual_seed(0)
    model = HandwrittenLM(form, act=act, gated=gated, bias=bias).to(dtype).eval()
    ids = [torch.randint(0, 64, shape) for shape in ((2, 7), (3, 11))]
    with torch.no_grad():
        expected = [model(x) for x in ids]
    moe_compile.prepare(model)
    assert all(isinstance(m, RoutedExperts) for m in model.moes), model
    assert [what.split(",")[0] for _, what in prepare_report()] == ["routed: self-routed MoE"] * 2, prepare_report()
    assert all(m.routing.k == 2 and m.routing.renormalise for m in model.moes)
    torch._dynamo.reset()
    report = moe_compile.explain(model, ids[0])
    assert report.graphs == 1 and [b.path for b in report.blocks] == ["moes.0", "moes.1"], report
    compiled = torch.compile(model, backend="moe_prefill")
    with torch.no_grad():
        for x, e in zip(ids, expected, strict=True):
            assert rel_err(compiled(x), e) < tolerance(dtype)


def test_top1_unnormalised_routing_is_found():
    torch.manual_seed(1)
    model = HandwrittenLM("dense", k=1, renormalise=False).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(x)
        moe_compile.prepare(model)
        assert model.moes[0].routing.k == 1 and not model.moes[0].routing.renormalise
        assert rel_err(torch.compile(model, backend="moe_prefill")(x), expected) < 1e-5


def test_near_miss_capacity_dropping_is_left_alone():
    """With a capacity of 2 tokens per expert, tokens are dropped: no top-k rule reproduces it."""
    torch.manual_seed(2)
    model = HandwrittenLM("einsum", capacity=2).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(x)
        moe_compile.prepare(model)
        assert not any(isinstance(m, RoutedExperts) for m in model.modules())
        assert prepare_report() and all("left alone: no top-k routing rule" in w for _, w in prepare_report())
        assert rel_err(model(x), expected) == 0
