"""Tiny Qwen3-MoE and DeepSeek-V3 with transformers' ``FP8Experts``/``FP8Linear`` (built on CPU, no download):
``prepare`` + ``moe_prefill`` rewrite every block, the report says fp8, the compiled model equals the torch W8A8
emulation, and the expert weights stay e4m3 in memory."""

from __future__ import annotations

import pytest
import torch

import moe_compile
from moe_compile.prepare import prepare_report
from moe_compile.quant.prepare_fp8 import BlockFP8Linear, FP8StackedExperts, fp8_bytes
from moe_compile.testing import zoo
from moe_compile.testing.fp8 import expert_param_bytes, quantize_model

FAMILIES = {
    # hidden 160: one full and one partial 128-block; I = 72 < 128: gate and up each one partial block row
    "qwen3_moe": {"hidden_size": 160, "moe_intermediate_size": 72},
    "deepseek_v3": {},  # shared experts, sigmoid group-limited router; hidden 32: partial blocks only
}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fp8_case(request):
    family = request.param
    model = zoo.build(family, dtype=torch.bfloat16, seed=0, overrides=FAMILIES[family] or None)
    fp8, deq = quantize_model(model)
    return family, model, fp8, deq


def test_prepare_replaces_fp8_modules_without_their_forward(fp8_case):
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    family, model, fp8, deq = fp8_case
    experts_before = [n for n, m in fp8.named_modules() if isinstance(m, FP8Experts)]
    linears_before = [n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)]
    assert experts_before and linears_before
    moe_compile.prepare(fp8)
    log = dict(prepare_report())
    for name in experts_before:
        assert isinstance(fp8.get_submodule(name), FP8StackedExperts), log.get(name)
        assert log[name].startswith("fp8:") and "128x128" in log[name]
    for name in linears_before:
        assert isinstance(fp8.get_submodule(name), BlockFP8Linear), log.get(name)
    assert not any(isinstance(m, (FP8Experts, FP8Linear)) for m in fp8.modules())


def test_compiled_fp8_matches_emulation_and_reports_fp8(fp8_case):
    family, model, fp8, deq = fp8_case
    moe_compile.prepare(fp8)  # idempotent: nothing of transformers' fp8 is left to replace
    ids = zoo.make_inputs(fp8, batch=2, seq=9)
    with torch.no_grad():
        emulated = zoo.logits(fp8, ids)  # eager: the torch W8A8 emulation ops
        compiled = zoo.logits(torch.compile(fp8, backend="moe_prefill", options={"kernels": "torch"}), ids)
        dequantized = zoo.logits(deq, ids)
    report = moe_compile.last_report()
    moe_layers = zoo.moe_layer_indices(family, fp8.config)
    assert sorted(b.path for b in report.blocks) == [f"model.layers.{i}.mlp" for i in moe_layers]
    for block in report.blocks:
        assert block.quantization.startswith("fp8 e4m3 W8A8, 128x128"), block
        assert "fp8" in block.layout
    assert rel(compiled, emulated) < 1e-2
    # the same ops run eagerly and compiled: equal up to graph-level reordering of the bf16 rest
    assert rel(compiled, emulated) < 1e-3
    # W8A8 against the dequantized bf16 model (what transformers runs on a CPU): measured 4.7% (qwen3_moe), 1.8%
    figure = rel(emulated, dequantized)
    assert 1e-4 < figure < 0.1, figure


def test_expert_weights_stay_fp8(fp8_case):
    family, model, fp8, deq = fp8_case
    moe_compile.prepare(fp8)
    experts = [m for m in fp8.modules() if isinstance(m, FP8StackedExperts)]
    for m in experts:
        assert m.w_up.dtype == m.w_down.dtype == torch.float8_e4m3fn
        assert m.w_up_scale.dtype == m.w_down_scale.dtype == torch.float32
    held = fp8_bytes(fp8)
    bf16 = expert_param_bytes(model)
    assert held["weights"] * 2 == bf16  # one byte per weight against bf16's two
    assert 0 < held["scales"] < held["weights"] / 50


def test_compiled_fp8_on_triton_kernels(fp8_case):
    """kernels="triton": the fp8 Triton layer (interpreter on CPU) against the torch W8A8 emulation."""
    family, model, fp8, deq = fp8_case
    moe_compile.prepare(fp8)
    ids = zoo.make_inputs(fp8, batch=2, seq=5)
    with torch.no_grad():
        emulated = zoo.logits(fp8, ids)
        compiled = zoo.logits(torch.compile(fp8, backend="moe_prefill", options={"kernels": "triton"}), ids)
    report = moe_compile.last_report()
    assert report.blocks and {b.implementation for b in report.blocks} == {"triton"}, report
    assert all("triton fp8 grouped GEMM" in b.rewrites for b in report.blocks)
    assert rel(compiled, emulated) < 1e-2
    assert rel(compiled, emulated) < 1e-4  # measured 0.0 in bf16: equal but for fp32 summation order


def test_offload_refuses_fp8_blocks_with_a_reason(fp8_case):
    """offload="cpu" keeps unquantized experts only: fp8 blocks stay resident, named in the report, still exact."""
    family, model, fp8, deq = fp8_case
    moe_compile.prepare(fp8)
    ids = zoo.make_inputs(fp8, batch=1, seq=6)
    torch._dynamo.reset()
    with torch.no_grad():
        emulated = zoo.logits(fp8, ids)
        compiled = zoo.logits(torch.compile(fp8, backend="moe_prefill", options={"offload": "cpu"}), ids)
    report = moe_compile.last_report()
    reasons = [s.reason for s in report.skipped]
    assert len(reasons) == len(report.blocks) and all("block-fp8 experts" in r for r in reasons), reasons
    assert all(b.implementation == "torch" for b in report.blocks)
    assert torch.equal(compiled, emulated)


def test_prepare_leaves_per_tensor_and_unloaded_fp8_alone_with_the_reason():
    from transformers import Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    from moe_compile.quant.prepare_fp8 import prepare_fp8

    config = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4)
    with torch.device("meta"):
        per_tensor = FP8Linear(32, 16, block_size=None)
        unloaded = FP8Experts(config, block_size=(128, 128))
    holder = torch.nn.ModuleDict({"per_tensor": per_tensor, "experts": unloaded})
    log = dict(prepare_fp8(holder))
    assert "per-tensor fp8 (weight_block_size=None) is not supported" in log["per_tensor"]
    assert "fp8 weights not loaded (meta device)" in log["experts"]
    assert holder["per_tensor"] is per_tensor and holder["experts"] is unloaded
