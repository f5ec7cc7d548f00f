"""What the passes share: the order check of the typed pass state, and MoECall (arguments by name)."""

import pytest
import torch
from custom_moe import TinyLM

from moe_compile import Options
from moe_compile.passes import PipelineOrderError, build_pipeline, check_order
from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.insert_predictors import InsertPredictors
from moe_compile.passes.lower_triton import LowerToTriton
from moe_compile.passes.moe_call import MoECall
from moe_compile.passes.offload_experts import OffloadExperts
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import run


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"offload": "cpu"},
        {"offload": "cpu", "predictor": "p.safetensors"},
        {"kernels": "triton"},
        {"parallel": "aep"},
        {"parallel": "ep"},
        {"parallel": "aep", "predictor": "p.safetensors"},
    ],
)
def test_every_pipeline_is_in_a_valid_order(options):
    passes = build_pipeline(Options.from_user(options))
    check_order(passes)
    names = [p.name for p in passes]
    assert names.index("detect_moe") < names.index("canonicalize_moe") < names.index("lower_triton")


def test_a_pass_before_its_producer_is_refused_with_both_names():
    with pytest.raises(PipelineOrderError, match=r"'lower_triton' reads PassContext.moe_blocks, .*canonicalize_moe"):
        check_order([DetectMoE(), LowerToTriton(), CanonicalizeMoE()])
    with pytest.raises(PipelineOrderError, match=r"'insert_predictors' reads PassContext.stores.*runs after it"):
        check_order([DetectMoE(), CanonicalizeMoE(), InsertPredictors(), OffloadExperts()])
    with pytest.raises(PipelineOrderError, match="is not in the pipeline"):
        check_order([LowerToTriton()])


def test_moe_call_reads_and_writes_arguments_by_name():
    torch.manual_seed(0)
    harness = run(PassHarness(DetectMoE(), CanonicalizeMoE()), TinyLM(layers=1).eval(), torch.randint(0, 64, (2, 5)))
    (node,) = [n for n in harness.record.module.graph.nodes if n.target is torch.ops.moe_compile.moe.default]
    call = MoECall.from_node(node)
    assert call.op == "moe" and call.b_up is None and set(call.experts()) == {"w_up", "w_down"}
    assert node.args == (call.hidden, call.topk_ids, call.topk_weights, call.w_up, call.w_down, None, None, call.spec)
    offload = call.replace(torch.ops.moe_compile.moe_offload.default, token=None, store=7, layer=3)
    assert node.args == (call.hidden, call.topk_ids, call.topk_weights, None, 7, 3, call.spec)
    assert (offload.op, offload.store, offload.layer) == ("moe_offload", 7, 3)
    with pytest.raises(TypeError, match="is not a moe_compile MoE call"):
        MoECall.from_node(call.hidden)
