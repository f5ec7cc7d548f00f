"""What only a GPU can show: real (non-interpreter) block sizes in fp32/fp16/bf16, tensor-core dots, and
the layer captured in a CUDA graph. Skipped without CUDA; ``benchmarks/gpu_suite.py`` runs them first.

The interpreter tests (the rest of this folder) run the same kernels with tiny blocks and fp32 dots; here
every seed config of :mod:`moe_compile.kernels.configs` and the heuristic run on the device, on shapes
large enough for several blocks per expert and several K steps.
"""

import dataclasses

import pytest
import torch

from moe_compile import ops
from moe_compile.kernels import configs, fused_moe
from moe_compile.spec import ExpertSpec

from .kernel_testing import DEVICE, TOLERANCE, make_experts, rel_err, route

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (real Triton kernels)")

#: (E, N, H, K) of the benchmark models (Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B, DeepSeek-V3)
MODEL_SHAPES = [(128, 1536, 2048, 8), (128, 3072, 4096, 8), (8, 28672, 4096, 2), (256, 4096, 7168, 8)]


def _selectable_configs() -> list[configs.KernelConfig]:
    """Every config select_config returns on this device for the benchmark models in bf16 (tuned file or seed
    table), and the heuristic's; block_k halved for fp32 in the test."""
    chosen = {configs.heuristic(128, T, 8, torch.bfloat16) for T in (16, 512, 4096, 65536)}
    if DEVICE == "cuda":
        for E, N, H, K in MODEL_SHAPES:
            for T in (256, 512, 4096, 16384, 65536):
                chosen.add(configs.select_config(E, N, H, T, K, torch.bfloat16, torch.device("cuda")))
    return sorted(chosen, key=str)


SEED_CONFIGS = _selectable_configs()


def _fp32_variant(config: configs.KernelConfig) -> configs.KernelConfig:
    return dataclasses.replace(config, block_k=32, num_stages=min(config.num_stages, 3))


def _inputs(T, H, I, E, K, spec, dtype, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(T, H, generator=gen).to(dtype=dtype, device="cuda")
    ids_TK, weights_TK = route(T, E, K, "cuda", gen)
    return [hidden_TH, ids_TK, weights_TK.to(dtype), *make_experts(E, H, I, spec, bias, dtype, "cuda", gen)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", SEED_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.num_stages}")
def test_every_seed_config_matches_the_reference(config, dtype):
    """T*K/E = 48 rows per expert (partial blocks), H and I not multiples of the blocks, skewed experts."""
    spec = ExpertSpec()
    args = _inputs(T=192, H=320, I=200, E=32, K=8, spec=spec, dtype=dtype)
    args[1][:64] = torch.arange(8, device="cuda")  # experts 0-7 take 64 extra tokens: several blocks
    if dtype == torch.float32:
        config = _fp32_variant(config)
    out = fused_moe(*args, spec, config=config)
    ref = ops.moe_torch(*[a.float() if a is not None and a.is_floating_point() else a for a in args], spec)
    assert rel_err(out, ref) < TOLERANCE[dtype], f"{config} {dtype}: relative error {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "spec,bias",
    [
        (ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True), True),  # GPT-OSS
        (ExpertSpec(activation="gelu", gated=False), True),
        (ExpertSpec(transposed=True), False),
        (ExpertSpec(activation="relu2", gated=False), False),  # Nemotron-H
        # Inkling 2's softcapped SwiGLU, caps small enough to bite: the GPU's exp and division in _tanh
        (ExpertSpec(activation="swiglu_softcap", gate_softcap=1.0, up_softcap=2.0), False),
    ],
    ids=["gpt_oss", "plain_gelu", "transposed", "plain_relu2", "swiglu_softcap"],
)
def test_layouts_with_selected_configs(spec, bias, dtype):
    """select_config's own choice (tuned table or heuristic) on each expert layout, against the fp32 loop."""
    args = _inputs(T=96, H=256, I=128, E=8, K=2, spec=spec, dtype=dtype, bias=bias, seed=3)
    out = fused_moe(*args, spec)
    ref = ops.moe_reference(*args, spec)
    assert rel_err(out, ref) < TOLERANCE[dtype], f"relative error {rel_err(out, ref):.2e}"


def _capture(fn, *static):
    """``fn(*static)`` captured in a CUDA graph after a warm-up on a side stream (as the CUDA graph docs do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


@pytest.mark.parametrize(
    "op",
    [
        "moe_triton",
        pytest.param(
            "moe",
            marks=pytest.mark.skipif(
                DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                reason="the canonical op's torch path is sync-free with bf16 grouped_mm (sm90+)",
            ),
        ),
    ],
)
def test_canonical_op_in_a_cuda_graph(op):
    """Router + op + residual captured once, replayed on fresh inputs: equal to the reference each time."""
    spec, (T, H, I, E, K) = ExpertSpec(), (64, 256, 128, 16, 4)
    hidden, _, _, w_up, w_down, _, _ = _inputs(T, H, I, E, K, spec, torch.bfloat16)
    router_HE = torch.randn(H, E, device="cuda", dtype=torch.bfloat16) * H**-0.5
    moe_op = getattr(torch.ops.moe_compile, op)

    def block(x_TH: torch.Tensor) -> torch.Tensor:
        weights_TK, ids_TK = torch.topk((x_TH @ router_HE).float().softmax(-1), K)
        return moe_op(x_TH, ids_TK, weights_TK.to(x_TH.dtype), w_up, w_down, None, None, spec.encode()) + x_TH

    static_TH = hidden.clone()
    graph, out_TH = _capture(block, static_TH)
    for seed in (1, 2):
        fresh_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        static_TH.copy_(fresh_TH)
        graph.replay()
        weights_TK, ids_TK = torch.topk((fresh_TH @ router_HE).float().softmax(-1), K)
        ref = ops.moe_reference(fresh_TH, ids_TK, weights_TK.to(torch.bfloat16), w_up, w_down, None, None, spec)
        assert rel_err(out_TH, ref + fresh_TH) < TOLERANCE[torch.bfloat16]


def test_moe_torch_launch_is_sync_free_in_bf16():
    """The canonical op's torch implementation on sm90 bf16 (grouped_mm) reads nothing on the host."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped_mm path needs sm90+")
    spec = ExpertSpec()
    args = _inputs(T=64, H=128, I=96, E=16, K=4, spec=spec, dtype=torch.bfloat16)
    ops.moe_torch(*args, spec)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.moe_torch(*args, spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")
