"""Report block paths are the module paths a user sees, whatever frame the graph starts in."""

import torch
from conftest import rel_err

import moe_compile
from moe_compile.graph import normalize_module_path
from moe_compile.prepare import StackedExperts
from moe_compile.testing import zoo


def test_normalize_module_path_of_positional_arguments():
    assert normalize_module_path("L['args'][0].model.layers[0]._modules['mlp']") == "args.0.model.layers.0.mlp"
    assert normalize_module_path("L['self'].model.layers[3]._modules['mlp']") == "model.layers.3.mlp"


def test_switch_encoder_and_decoder_blocks_read_their_real_paths(one_torch_thread):
    # graph breaks: the graphs start inside encoder and decoder blocks, whose modules Dynamo names from there
    model = moe_compile.prepare(zoo.build("switch_transformers"))
    expected = {name.rpartition(".")[0] for name, m in model.named_modules() if isinstance(m, StackedExperts)}
    assert len(expected) == 2 and any(p.startswith("encoder.") for p in expected), expected
    ids = zoo.make_inputs(model, seq=6)
    report = moe_compile.explain(model, input_ids=ids, decoder_input_ids=ids, options={"inductor": False})
    assert report.graphs > 1, report  # the case this test is about
    assert {b.path for b in report.blocks} == expected, report


def test_model_called_through_a_wrapper_reads_model_paths(one_torch_thread):
    model = moe_compile.prepare(zoo.build("qwen3_moe", experts_implementation="eager"))

    def run(*args):  # Dynamo names the model's modules from the wrapper's arguments: args.0.model...
        return args[0](args[1]).logits

    compiled = torch.compile(run, backend="moe_prefill", options={"inductor": False})
    ids = zoo.make_inputs(model, seq=6)
    with torch.no_grad(), moe_compile.backend.collect_reports() as report:
        got = compiled(model, ids)
    assert rel_err(got, model(ids).logits) < 1e-5
    assert sorted(b.path for b in report.blocks) == ["model.layers.0.mlp", "model.layers.1.mlp"], report
