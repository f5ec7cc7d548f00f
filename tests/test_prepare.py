"""moe_compile.prepare: per-expert module containers become one canonical call, exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from custom_moe import ExpertList, PerExpertLM
from torch import nn

import moe_compile
from moe_compile.prepare import StackedExperts, prepare_report
from moe_compile.testing import zoo


def test_per_expert_linear_model_traces_after_prepare():
    torch.manual_seed(0)
    model = PerExpertLM(layers=2).eval()
    input_ids = torch.randint(0, 64, (2, 6))
    before = moe_compile.explain(model, input_ids)
    assert before.blocks == [] and before.graphs > 1  # the expert loop breaks the graph
    assert "moe_compile.prepare" in str(before)

    with torch.no_grad():
        expected = model(input_ids)
    moe_compile.prepare(model)
    assert isinstance(model.blocks[0].experts, StackedExperts)
    assert [what for _, what in prepare_report()] == [
        "stacked: 4 per-expert nn.Linear modules (gate_proj, up_proj, down_proj)"
    ] * 2
    with torch.no_grad():
        assert rel_err(model(input_ids), expected) < 1e-6  # prepare alone changes nothing

    torch._dynamo.reset()
    report = moe_compile.explain(model, input_ids)
    assert report.graphs == 1 and [b.path for b in report.blocks] == ["blocks.0", "blocks.1"], report
    assert report.blocks[0].router == "softmax -> top-k -> renormalise"
    assert report.blocks[0].layout.startswith("expert weights stacked by prepare()")
    compiled = torch.compile(model, backend="moe_prefill")
    with torch.no_grad():
        for seq in (6, 9):
            x = torch.randint(0, 64, (2, seq))
            assert rel_err(compiled(x), model(x)) < 1e-5


def test_switch_transformers_experts_are_stacked_exactly():
    model = zoo.build("switch_transformers")
    reference = copy.deepcopy(model)
    moe_compile.prepare(model)
    stacked = [m for m in model.modules() if isinstance(m, StackedExperts)]
    assert len(stacked) == len(zoo.moe_layer_indices("switch_transformers", model.config))
    assert ExpertSpecOf(stacked[0]).activation == "relu" and not ExpertSpecOf(stacked[0]).gated
    input_ids = zoo.make_inputs(model, seq=9)
    with torch.no_grad():
        assert rel_err(zoo.logits(model, input_ids), zoo.logits(reference, input_ids)) < 1e-6
    # the sparse feed-forward layer (router with capacity mask + stacked experts) compiles to one block
    layer = model.encoder.block[1].layer[1]
    hidden = torch.randn(2, 9, model.config.d_model)
    report = moe_compile.explain(layer, hidden)
    assert len(report.blocks) == 1 and report.blocks[0].top_k == 1, report
    with torch.no_grad():
        assert rel_err(torch.compile(layer, backend="moe_prefill")(hidden), layer(hidden)) < 1e-5


def ExpertSpecOf(module: StackedExperts) -> moe_compile.ExpertSpec:  # noqa: N802
    return moe_compile.ExpertSpec.decode(module.spec)


def test_container_that_is_not_a_weighted_sum_is_left_alone():
    torch.manual_seed(0)
    model = PerExpertLM(layers=1).eval()
    experts = model.blocks[0].experts
    original_forward = type(experts).forward

    class MaxOfExperts(type(experts)):  # combines experts by max, not by a weighted sum
        def forward(self, x_TH, ids_TK, weights_TK):
            return torch.stack([original_forward(self, x_TH, ids_TK[:, k : k + 1], weights_TK[:, k : k + 1])
                                for k in range(ids_TK.shape[1])]).amax(0)  # fmt: skip

    experts.__class__ = MaxOfExperts
    moe_compile.prepare(model)
    assert model.blocks[0].experts is experts
    (entry,) = prepare_report()
    assert "not sum_k weight * expert(x)" in entry[1]


class Relu2Expert(nn.Module):
    """Nemotron-H's expert MLP as a user writes it: up, relu², down (with biases)."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.up = nn.Linear(hidden, inter)
        self.down = nn.Linear(inter, hidden)

    def forward(self, x):
        return self.down(F.relu(self.up(x)) ** 2)


def test_relu2_experts_are_stacked_exactly():
    torch.manual_seed(0)
    model = PerExpertLM(layers=1).eval()
    model.blocks[0].experts = ExpertList(Relu2Expert(32, 16) for _ in range(4))
    input_ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = model(input_ids)
    moe_compile.prepare(model)
    stacked = model.blocks[0].experts
    assert isinstance(stacked, StackedExperts), prepare_report()
    assert ExpertSpecOf(stacked).activation == "relu2" and not ExpertSpecOf(stacked).gated
    torch._dynamo.reset()
    report = moe_compile.explain(model, input_ids, options={"inductor": False})
    assert [b.activation for b in report.blocks] == ["ReLU² (non-gated)"], report
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
    with torch.no_grad():
        assert rel_err(compiled(input_ids), expected) < 1e-5


def test_hf_expert_parallel_reads_inkling2_softcaps():
    """HF ``AllToAllEP`` experts are matched to a spec with the model's own caps, not the defaults."""
    from transformers.models.inkling2.configuration_inkling2 import Inkling2TextConfig
    from transformers.models.inkling2.modeling_inkling2 import Inkling2Experts

    from moe_compile.ops import activate
    from moe_compile.reference.hf_expert_parallel import _swiglu_constants

    config = Inkling2TextConfig(
        n_routed_experts=4, hidden_size=16, moe_intermediate_size=8, mlp_gate_softcap=1.5, mlp_up_softcap=2.5
    )
    experts = Inkling2Experts(config)
    constants = _swiglu_constants(experts, "swiglu_softcap")
    assert constants == {"gate_softcap": 1.5, "up_softcap": 2.5}
    spec = moe_compile.ExpertSpec(activation="swiglu_softcap", **constants)
    up_SN = torch.randn(10, 16) * 3
    assert torch.equal(activate(up_SN, spec), experts._apply_gate(up_SN))
    assert _swiglu_constants(nn.Linear(2, 2), "swiglu_softcap") == {}  # no caps found: the defaults are tried


class _PerDatasetHeads(torch.nn.ModuleList):
    """ViTPose's form: one nn.Linear per expert, picked by an input index (no router, no MLP)."""

    def __init__(self, experts=4, hidden=8):
        super().__init__(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, hidden, indices):
        return sum(expert(hidden) * (indices == i) for i, expert in enumerate(self))


def test_single_linear_experts_are_named_and_left_alone():
    model = torch.nn.Sequential()
    model.add_module("heads", _PerDatasetHeads())
    before = model.heads
    moe_compile.prepare(model)
    assert model.heads is before
    [(name, what)] = prepare_report()
    assert name == "heads" and what.startswith("left alone: its 4 experts are single nn.Linear layers"), what
    assert "forward(hidden, indices)" in what


def test_the_driver_returns_its_report_and_each_model_keeps_its_own():
    """``prepare_model`` returns its report; a second ``prepare`` no longer erases the first model's."""
    from moe_compile.prepare import prepare_model

    torch.manual_seed(0)
    first, second = PerExpertLM(layers=2).eval(), PerExpertLM(layers=1).eval()
    input_ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = first(input_ids)
    report = prepare_model(first)
    assert [name for name, _ in report] == ["blocks.0.experts", "blocks.1.experts"], report
    assert all(what.startswith("stacked: 4 per-expert nn.Linear") for _, what in report), report
    with torch.no_grad():
        assert rel_err(first(input_ids), expected) < 1e-6
    moe_compile.prepare(second)
    assert [name for name, _ in prepare_report(second)] == ["blocks.0.experts"]
    assert prepare_report() == prepare_report(second)  # the compatibility call: the latest prepare
    with pytest.raises(KeyError, match="was not prepared; call moe_compile.prepare"):
        prepare_report(first)  # prepared by the driver alone, which keeps nothing
