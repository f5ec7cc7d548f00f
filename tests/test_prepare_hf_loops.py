"""moe_compile.prepare on transformers' expert loops: real tiny HF models, compiled against eager as built.

DBRX (experts flattened into [E*I, H]), Step3p7/Step3p5 (3D weights, one-hot over E + 1 classes),
LongCat-Flash (plus identity "zero" experts), JetMoE (self-routed, `split(expert_size)`, output bias)
and NLLB-MoE (per-expert ModuleDict with a token dropout, output scaled by 1 - moe_token_dropout)
loop over the experts they hit and graph-break; prepare replaces each by the canonical op, verified.
From transformers 5.25, Step3p7/Step3p5 and LongCat-Flash's experts use the experts interface
(``@use_experts_implementation``, ``grouped_mm`` by default): prepare has nothing to do, the detector finds
them, and the same tests check that instead (the lowest-versions CI lane runs the loop forms).
MuseSpark's experts trace, but norm each expert's output before its routing weight (``post_expert_norm``):
prepare runs each (token, expert) pair as its own row of the op, then the module's own norm.
"""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import rel_err

import moe_compile
from moe_compile.backend import collect_reports
from moe_compile.prepare import PostNormExperts, RoutedExperts, StackedExperts, prepare_report
from moe_compile.prepare.probe import is_interface_experts
from moe_compile.testing import coverage
from moe_compile.verify import tolerance

pytestmark = pytest.mark.slow  # a family sweep of prepare's loop forms, fp32 and bf16 (seconds each)


def _needs_family(family: str) -> None:
    """Skip, naming the reason, on a transformers that has no such family (the lowest-versions lane)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family} (a newer release added it)")


def _interface_experts(model) -> int:
    return sum(is_interface_experts(m) for m in model.modules())


def _check(
    family, dtype, replaced: type, report: str, modules: int, blocks: int | set[int], fp32_reference=False,
    interface_form: bool = False,
):  # fmt: skip
    """Eager (as built) vs compiled after prepare, on fresh inputs; the replacement and the blocks found.

    ``fp32_reference``: compare with the eager model as built run in fp32 (the same bf16-rounded weights),
    for a model whose bf16 eager output jumps with a routing near-tie elsewhere in the model.
    ``interface_form``: the family's experts may use transformers' experts interface (5.25 and newer): then
    prepare replaces nothing and the backend finds the same blocks by itself.
    """
    with coverage._quiet():
        model = coverage._build_model(family).to(dtype)
    inputs = [coverage._inputs(model, seq, seed=100 + seq) for seq in (5, 8)]
    reference = copy.deepcopy(model).float() if fp32_reference else model
    with torch.no_grad(), coverage._quiet():
        expected = [coverage._output(reference(**kw)).clone() for kw in inputs]
    moe_compile.prepare(model)
    done = [what for _, what in prepare_report() if not what.startswith("left alone")]
    if interface_form and _interface_experts(model) == modules:
        assert done == [] and not any(isinstance(m, replaced) for m in model.modules()), prepare_report()
    else:
        assert len(done) == modules and all(report in what for what in done), prepare_report()
        assert sum(isinstance(m, replaced) for m in model.modules()) == modules
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
    try:
        with torch.no_grad(), coverage._quiet(), collect_reports() as found:
            got = [coverage._output(compiled(**kw)) for kw in inputs]
    finally:
        torch._dynamo.reset()
    assert len({b.path for b in found.blocks}) in (blocks if isinstance(blocks, set) else {blocks}), found
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) < tolerance(dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dbrx_flattened_experts_are_stacked(dtype):
    model = _check("dbrx", dtype, StackedExperts, "mlp.w2 as [E, 32, 32].T", modules=2, blocks=2)
    assert moe_compile.ExpertSpec.decode(model.transformer.blocks[0].ffn.experts.spec).activation == "silu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["step3p7", "step3p5"])
def test_step3p7_experts_are_stacked(family, dtype):
    _check(
        family, dtype, StackedExperts, "gate_up gate_up_proj, down_proj, concat", modules=1, blocks=1,
        interface_form=True,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_longcat_flash_experts_and_identity_experts(dtype):
    model = _check(
        "longcat_flash", dtype, StackedExperts, "and 4 identity experts", modules=2, blocks=2, interface_form=True
    )
    experts = model.model.layers[0].mlp.experts
    if is_interface_experts(experts):  # 5.25: the identity experts are computed in LongcatFlashMoE.forward
        assert experts.num_experts == 8 and model.model.layers[0].mlp.zero_expert_num == 4
    else:
        assert experts.num_experts == 8 and experts.identity_experts == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nllb_moe_experts_with_token_dropout_are_stacked(dtype):
    model = _check("nllb-moe", dtype, StackedExperts, "output scaled by 0.8", modules=4, blocks=4)
    assert model.model.encoder.layers[0].ffn.experts.output_scale == pytest.approx(0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jetmoe_mlp_is_routed_and_its_attention_moe_left_alone(dtype):
    # at fp32 only layer 0's MLP block is found: the MoA's `expert_size.tolist()` graph breaks make Dynamo
    # give up on (run eagerly) the frame that holds layer 1's MLP; at bf16 both are found. At bf16 the
    # reference is fp32 eager: layer 1's attention MoE (untouched) flips a top-2 choice on a 0.3% change of
    # its input, which moves bf16 eager itself 4% from fp32 at seq 8 (the compiled model stays within 0.5%)
    model = _check(
        "jetmoe", dtype, RoutedExperts, "8 experts' stacked weights", modules=2, blocks={1, 2},
        fp32_reference=dtype == torch.bfloat16,
    )  # fmt: skip
    assert model.model.layers[0].mlp.bias is not None
    refused = [(name, what) for name, what in prepare_report() if what.startswith("left alone")]
    assert [name for name, _ in refused] == [f"model.layers.{i}.self_attention.experts" for i in (0, 1)]
    assert all("mixture of attention (`map`/`reduce`)" in what for _, what in refused)


def test_clamped_step3p7_experts():
    """Step-3.7-Flash clamps some layers' experts (`swiglu_limits`): ``act(gate).clamp(max=7) * up.clamp(-7, 7)``.

    Before transformers 5.25, prepare refuses that loop (its probes at a large input scale reach the clamp). From
    5.25 the experts use the experts interface; the backend rewrites the layer as the op with ``clamp="after"``,
    verified at unit and at large input scale, and stays exact where the clamp bites (layer 1's gate/up weights are
    scaled so that its projections reach 40, far past 7).
    """
    config = coverage.tiny_config("step3p7")
    text = config.get_text_config()
    text.swiglu_limits = [0.0] * text.num_hidden_layers
    text.swiglu_limits[1] = 7.0
    torch.manual_seed(0)
    with coverage._quiet():
        model = coverage._model_class("step3p7", config)._from_config(config, dtype=torch.float32).eval()
    layer = model.language_model.layers[1]
    experts = layer.mlp.experts
    moe_compile.prepare(model)
    assert layer.mlp.experts is experts
    if not is_interface_experts(experts):
        ((name, what),) = prepare_report()
        assert name == "language_model.layers.1.mlp.experts"
        assert what.startswith("left alone: no canonical expert form")
        return
    assert prepare_report() == []
    kw = coverage._inputs(model, 8, seed=1)
    sizes = []  # the largest |projection| of layer 1's experts on their real input: past the limit, the clamp bites
    hook = experts.register_forward_hook(lambda m, args, out: sizes.append((args[0] @ m.gate_up_proj.mT).abs().max()))
    with torch.no_grad(), coverage._quiet():
        model(**kw)
        experts.gate_up_proj.mul_(40.0 / max(sizes))  # projections up to 40: far past the limit of 7
        sizes.clear()
        expected = coverage._output(model(**kw)).clone()
    hook.remove()
    assert sizes and max(sizes) > 2 * 7.0, sizes
    torch._dynamo.reset()
    try:
        with torch.no_grad(), coverage._quiet(), collect_reports() as found:
            got = coverage._output(torch.compile(model, backend="moe_prefill", options={"inductor": False})(**kw))
    finally:
        torch._dynamo.reset()
    (block,) = [b for b in found.blocks if b.path == "language_model.layers.1.mlp"]
    assert "clamped at 7 after the activation" in block.activation, block
    assert rel_err(got, expected) < 1e-5


class _ZeroOutput(nn.Module):
    def forward(self, x):
        return x * 0


def test_extra_experts_that_are_not_identity_are_refused():
    """LongCat's extra ids are identity experts; ones that output nothing are not, and prepare says so."""
    with coverage._quiet():
        model = coverage._build_model("longcat_flash")
    if is_interface_experts(model.model.layers[0].mlp.experts):
        pytest.skip(
            "transformers >= 5.25 computes LongCat's identity experts in LongcatFlashMoE.forward (no identity_expert "
            "module to replace); the lowest-versions CI lane runs this test on the loop form"
        )
    for layer in model.model.layers:
        layer.mlp.experts.identity_expert = _ZeroOutput()
    moe_compile.prepare(model)
    assert not any(isinstance(m, StackedExperts) for m in model.modules())
    reasons = [what for _, what in prepare_report()]
    assert len(reasons) == 2
    assert all(r.startswith("left alone: ids 8..11") and "are not identity experts" in r for r in reasons)


class _TransposedInterleavedExperts(nn.Module):
    """A hand-written loop over `[E, H, 2I]` weights, gate and up interleaved, GELU-gated (no HF class)."""

    def __init__(self, E=6, H=16, I=8):  # noqa: E741
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, H, 2 * I) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, I, H) / I**0.5)

    def forward(self, hidden_states, expert_ids, routing_weights):
        out = torch.zeros_like(hidden_states)
        for e in expert_ids.unique().tolist():
            t, k = torch.where(expert_ids == e)
            h = hidden_states[t] @ self.w_in[e]
            h = nn.functional.gelu(h[:, ::2]) * h[:, 1::2]
            out.index_add_(0, t, (h @ self.w_out[e]) * routing_weights[t, k, None])
        return out


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 6, bias=False)
        self.experts = _TransposedInterleavedExperts()

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.router(x), dim=-1), 2, dim=-1)
        return self.experts(x, ids, weights)


def test_hand_written_transposed_interleaved_experts_are_stacked():
    torch.manual_seed(0)
    block = _Block().eval()
    x = torch.randn(11, 16)
    with torch.no_grad():
        expected = block(x)
    moe_compile.prepare(block)
    assert isinstance(block.experts, StackedExperts)
    spec = moe_compile.ExpertSpec.decode(block.experts.spec)
    assert (spec.activation, spec.gated, spec.gate_layout) == ("gelu", True, "interleaved")
    (entry,) = prepare_report()
    assert entry == ("experts", "stacked: 6 experts' stacked weights (gate_up w_in.T, w_out.T, interleaved)")
    torch._dynamo.reset()
    with torch.no_grad(), collect_reports() as found:
        got = torch.compile(block, backend="moe_prefill", options={"inductor": False})(x)
    torch._dynamo.reset()
    assert len(found.blocks) == 1 and found.blocks[0].top_k == 2, found
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muse_spark_post_expert_norm_runs_after_the_op_on_each_pair(dtype):
    _needs_family("muse_spark_text")
    model = _check("muse_spark_text", dtype, PostNormExperts, "each output normed", modules=2, blocks=2)
    experts = model.layers[0].mlp.experts
    assert experts.norm is not None and type(experts.norm).__name__ == "MuseSparkTextInputScaledRMSNorm"


def test_post_norm_experts_are_refused_when_no_activation_fits():
    _needs_family("muse_spark_text")
    with coverage._quiet():
        model = coverage._build_model("muse_spark_text")
    experts = model.layers[0].mlp.experts
    experts.act_fn = torch.nn.Softplus()  # not a canonical activation
    moe_compile.prepare(model)
    assert model.layers[0].mlp.experts is experts
    assert any(
        what == "left alone: no canonical activation followed by its norm reproduces the experts' outputs"
        for _, what in prepare_report()
    ), prepare_report()
