"""The backend end to end: options, dense models, dtypes, custom modules, near misses."""

import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from custom_moe import DenseScoredMoE, TinyLM

import moe_compile
from moe_compile.testing import zoo


def _compare(model, *inputs, options=None, seqs=None, tol=1e-5):
    compiled = torch.compile(model, backend="moe_prefill", options=options)
    with torch.no_grad():
        for x in inputs:
            expected, got = model(x), compiled(x)
            expected = getattr(expected, "logits", expected)
            got = getattr(got, "logits", got)
            assert rel_err(got, expected) < tol


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kernel": "triton"}, "unknown moe_prefill option 'kernel'; valid options are: debug, debug_dir, kernels"),
        ({"kernels": "cuda"}, "option 'kernels' must be one of 'auto', 'triton', 'torch', got 'cuda'"),
        ({"inductor": 1}, "option 'inductor' must be one of 'auto', True, False, got 1"),
        ({"debug": "yes"}, "option 'debug' must be True or False"),
    ],
)
def test_bad_options_name_the_problem(options, message):
    model = TinyLM()
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="moe_prefill", options=options)(torch.randint(0, 64, (1, 4)))


def test_one_options_type_flows_from_the_user_to_the_passes():
    """The user's dict becomes ``Options`` once (``Options.from_user``); ``compile_graph`` takes only that."""
    from moe_compile.backend import compile_graph

    opts = moe_compile.Options.from_user({"kernels": "torch"})
    assert isinstance(opts, moe_compile.Options) and opts.kernels == "torch"
    with pytest.raises(ValueError, match="moe_prefill options must be a dict, got Options"):
        moe_compile.Options.from_user(opts)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"compile_graph takes Options \(Options.from_user\(a dict\)\), got dict"):
        compile_graph(gm, [torch.randn(1, 2)], {"kernels": "torch"})
    report = moe_compile.explain(TinyLM(), torch.randint(0, 64, (1, 4)), options={"kernels": "torch"})
    assert report.blocks and all(b.implementation == "torch" for b in report.blocks), report


def test_custom_module_detected_and_exact():
    torch.manual_seed(0)
    model = TinyLM(layers=3, dense_layers=(1,)).eval()
    report = moe_compile.explain(model, torch.randint(0, 64, (2, 5)))
    assert [b.path for b in report.blocks] == ["blocks.0", "blocks.2"], report
    block = report.blocks[0]
    assert (block.num_experts, block.top_k, block.hidden_size, block.intermediate_size) == (4, 2, 32, 16)
    assert block.router == "sigmoid -> top-k -> renormalise"
    assert "batched_mm" in block.layout and block.activation == "SiLU-gated"
    _compare(model, torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (3, 8)))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"post_norm": True}, "also reads"),
        ({"weight_input": True}, "the experts' input is scaled before the experts"),
        # where(mask, other rows, x) is no masked fill: not walked through to find the experts' input
        ({"sentinel": "rows"}, "no integer [tokens, k] expert-index tensor"),
    ],
)
def test_near_miss_is_skipped_with_reason_and_left_exact(kwargs, reason):
    torch.manual_seed(0)
    model = TinyLM(**kwargs).eval()
    report = moe_compile.explain(model, torch.randint(0, 64, (2, 5)))
    assert report.blocks == []
    assert len(report.skipped) == 2 and all(reason in s.reason for s in report.skipped), report
    assert "skipped blocks.0" in str(report)
    _compare(model, torch.randint(0, 64, (2, 5)))


def test_masked_fill_written_as_where_is_walked_through():
    """``torch.where(mask, 0.0, x)`` on the experts' input (Inductor's post-grad form of ``masked_fill``)."""
    torch.manual_seed(0)
    model = TinyLM(sentinel="zero").eval()
    report = moe_compile.explain(model, torch.randint(0, 64, (2, 5)))
    assert len(report.blocks) == 2 and report.skipped == [], report
    _compare(model, torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (3, 7)))


def test_dense_model_has_no_blocks_and_same_outputs():
    model = zoo.build_dense()
    input_ids = zoo.make_inputs(model, seq=6)
    report = moe_compile.explain(model, input_ids)
    assert report.blocks == [] and report.skipped == []
    _compare(model, input_ids)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_bf16_matches_eager(name):
    model = zoo.build(name, dtype=torch.bfloat16)
    input_ids = zoo.make_inputs(model, seq=7)
    report = moe_compile.explain(model, input_ids)
    assert len(report.blocks) == len(zoo.moe_layer_indices(name, model.config)), report
    _compare(model, input_ids, tol=2e-2)


@pytest.mark.slow  # a compile per router kind (over 10 s)
def test_router_kinds_are_described():
    expected = {
        "mixtral": "softmax -> top-k -> renormalise",
        "qwen2_moe": "softmax -> top-k",
        "gpt_oss": "top-k -> softmax",
        "deepseek_v3": "sigmoid + bias correction -> group-limited top-k -> renormalise -> x 2.5",
    }
    reports = {}
    for name, router in expected.items():
        model = zoo.build(name)
        reports[name] = moe_compile.explain(model, zoo.make_inputs(model, seq=4))
        assert {b.router for b in reports[name].blocks} == {router}, (name, reports[name])
    gpt = reports["gpt_oss"].blocks[0]
    assert gpt.activation == "clamped SwiGLU (alpha=1.702, limit=7)"
    assert gpt.layout.startswith("fused 3D [E,H,2I]/[E,I,H] transposed, biases, interleaved gate/up")
    assert gpt.weights["b_up"].endswith("experts.gate_up_proj_bias")


def test_autograd_on_leaves_graph_alone():
    model = zoo.build("qwen3_moe")
    input_ids = zoo.make_inputs(model, seq=5)
    with moe_compile.backend.collect_reports() as report:
        out = torch.compile(model, backend="moe_prefill")(input_ids).logits
    assert report.blocks == [] and report.skipped
    assert all("autograd is on" in s.reason for s in report.skipped), report
    with torch.no_grad():
        assert rel_err(out.detach(), model(input_ids).logits) < 1e-5


def test_checkpoint_round_trip(tmp_path):
    model = zoo.build("mixtral")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    input_ids = zoo.make_inputs(loaded, seq=6)
    report = moe_compile.explain(loaded, input_ids)
    assert len(report.blocks) == 2 and report.blocks[0].weights["w_up"] == "model.layers.0.mlp.experts.gate_up_proj"
    _compare(loaded, input_ids)


def test_debug_mode_writes_graphs_and_summary(tmp_path):
    model = zoo.build("qwen3_moe")
    input_ids = zoo.make_inputs(model, seq=5)
    _compare(model, input_ids, options={"debug": True, "debug_dir": str(tmp_path)})
    (graph_dir,) = tmp_path.iterdir()
    names = sorted(p.name for p in graph_dir.iterdir())
    for i, pass_name in enumerate(["detect_moe", "canonicalize_moe", "lower_triton"]):
        assert f"{i:02d}_{pass_name}.before.py" in names and f"{i:02d}_{pass_name}.after.py" in names
    after = (graph_dir / "01_canonicalize_moe.after.py").read_text()
    before = (graph_dir / "01_canonicalize_moe.before.py").read_text()
    assert after.count("torch.ops.moe_compile.moe.default") == 2 and "moe_compile.moe" not in before
    assert "grouped_mm_fallback" in before and "grouped_mm_fallback" not in after
    summary = (graph_dir / "summary.md").read_text()
    assert "| 1 | canonicalize_moe | yes |" in summary and "model.layers.1.mlp" in summary


@pytest.mark.slow  # a fresh interpreter imports torch and compiles (over 10 s)
def test_backend_entry_point_without_import():
    code = (
        "import torch\n"
        "f = torch.compile(lambda x: x * 2, backend='moe_prefill')\n"
        "print(f(torch.ones(2)).sum().item())\n"
        "assert 'moe_compile' in __import__('sys').modules  # loaded by the entry point\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4.0"


@pytest.mark.slow
def test_inductor_execution_matches_eager():
    model = zoo.build("qwen3_moe", num_layers=1)
    input_ids = zoo.make_inputs(model, seq=6)
    _compare(model, input_ids, options={"inductor": True})
    (block,) = moe_compile.last_report().blocks  # found in Inductor's post-grad graph (decomposed ops)
    assert block.router == "softmax -> top-k -> renormalise", block  # softmax decomposed there


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_triton_kernels_end_to_end(name):
    model = zoo.build(name)
    input_ids = zoo.make_inputs(model, seq=5)
    report = moe_compile.explain(model, input_ids, options={"kernels": "triton"})
    assert {b.implementation for b in report.blocks} == {"triton"} and len(report.blocks) == 2, report
    assert "triton" in str(report)
    _compare(model, input_ids, zoo.make_inputs(model, seq=7), options={"kernels": "triton"})
    torch._dynamo.reset()
    torch_report = moe_compile.explain(model, input_ids, options={"kernels": "torch"})
    assert {b.implementation for b in torch_report.blocks} == {"torch"}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_llama4_dense_input_scaled_experts_become_the_input_scaled_op(kernels):
    """Llama 4 runs every expert on every token, scaled by a score zero off the top k: one sparse op call."""
    model = zoo.build("llama4")
    input_ids = zoo.make_inputs(model, seq=6)
    report = moe_compile.explain(model, input_ids, options={"kernels": kernels})
    assert len(report.blocks) == len(zoo.moe_layer_indices("llama4", model.config)) and not report.skipped, report
    block = report.blocks[0]
    assert block.activation == "SiLU-gated, routing weight scales the input", block
    assert block.top_k == model.config.num_experts_per_tok, block
    assert "every expert on every token" in block.layout and block.shared_experts, block
    _compare(model, input_ids, zoo.make_inputs(model, seq=9), options={"kernels": kernels})


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({}, None),
        ({"k": 1}, None),
        ({"fill": 0.0}, "is 0.5, not 0, outside the top k"),  # every expert contributes: dense, not top-k
        ({"bias": True}, "no canonical form reproduces the block"),  # expert(0) = down(act(b)) != 0
    ],
)
def test_dense_scored_experts_are_rewritten_only_when_zero_off_the_top_k(kwargs, reason):
    torch.manual_seed(0)
    model = TinyLM(block=DenseScoredMoE, **kwargs).eval()
    report = moe_compile.explain(model, torch.randint(0, 64, (2, 5)), options={"inductor": False})
    if reason is None:
        assert len(report.blocks) == 2 and not report.skipped, report
        assert all(b.top_k == kwargs.get("k", 2) and "scales the input" in b.activation for b in report.blocks)
    else:
        assert report.blocks == [] and len(report.skipped) == 2, report
        assert all(reason in s.reason for s in report.skipped), report.skipped
    _compare(model, torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (3, 8)), options={"inductor": False})


def test_router_before_the_experts_pre_norm_is_found():
    """Gemma 4's order: the router reads the block input, the experts a norm of it computed after the router."""
    torch.manual_seed(0)
    model = TinyLM(pre_norm=True).eval()
    report = moe_compile.explain(model, torch.randint(0, 64, (2, 5)), options={"inductor": False})
    assert [b.path for b in report.blocks] == ["blocks.0", "blocks.1"] and not report.skipped, report
    _compare(model, torch.randint(0, 64, (2, 5)), options={"inductor": False})


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_batched_mm_experts_implementation(name):
    model = zoo.build(name, experts_implementation="batched_mm")
    input_ids = zoo.make_inputs(model, seq=6)
    report = moe_compile.explain(model, input_ids)
    assert len(report.blocks) == 2 and all("batched_mm" in b.layout for b in report.blocks), report
    _compare(model, input_ids)


def test_eager_experts_loop_needs_prepare():
    model = zoo.build("mixtral", experts_implementation="eager")
    input_ids = zoo.make_inputs(model, seq=6)
    before = moe_compile.explain(model, input_ids)
    assert before.blocks == [] and before.graphs > 1 and "moe_compile.prepare" in str(before)
    torch._dynamo.reset()
    moe_compile.prepare(model)
    assert model.config._experts_implementation == "grouped_mm"
    assert len(moe_compile.explain(model, input_ids).blocks) == 2
    _compare(model, input_ids)
