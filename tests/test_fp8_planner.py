"""The planner counts block-fp8 weights at their real size: one byte each plus an fp32 scale per 128x128 block."""

import pytest
import torch

from moe_compile import planner
from moe_compile.quant.fp8 import quantize_weight


def test_fp8_bytes_per_weight_equal_the_stored_tensors():
    q, s = quantize_weight(torch.randn(2, 512, 256), (128, 128))
    stored = q.numel() * q.element_size() + s.numel() * s.element_size()
    assert stored == q.numel() * planner.WEIGHT_BYTES["fp8"]


def test_fp8_gather_and_memory_include_the_scales():
    layer = planner.Layer(index=0, dense_params=1000, experts=8, expert_params=3 * 128 * 256, top_k=2)
    shape = planner.ModelShape("m", 128, (layer,), attention_flops_per_context_token=64, embedding_params=0)
    setting = dict(gpus=4, gpu="h100", link="nvlink", tokens_per_gpu=100, seq_len=10)
    bf16 = planner.plan(shape, planner.Setting(dtype="bf16", **setting))
    fp8 = planner.plan(shape, planner.Setting(dtype="fp8", **setting))
    assert fp8.layers[0].gather_s == pytest.approx(bf16.layers[0].gather_s / 2 * (1 + 4 / 128**2), rel=1e-12)
    assert fp8.memory_gb["ep"] == pytest.approx(bf16.memory_gb["ep"] / 2 * (1 + 4 / 128**2), rel=1e-12)
