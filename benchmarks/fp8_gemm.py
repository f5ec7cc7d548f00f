"""TFLOP/s of the block-fp8 Triton MoE layer vs the bf16 Triton layer vs ``torch._grouped_mm`` in bf16 (issue #22).

Three columns on the same layer (SiLU-gated, the expert shapes of Qwen3-30B-A3B, Qwen3-235B-A22B and
DeepSeek-V3; ``benchmarks/grouped_gemm.py``'s ``MODELS``), measured side by side in one run:

- ``fp8``: :func:`moe_compile.kernels.fp8_moe.fused_moe_fp8` (activations quantized per token and 128 channels,
  e4m3 weights with 128x128 block scales; the quantizer's time included);
- ``bf16``: :func:`moe_compile.kernels.fused_moe` on the same weights dequantized to bf16;
- ``grouped_mm``: :func:`moe_compile.ops.moe_torch` on those bf16 weights (``torch._grouped_mm``).

``rel_err`` is the fp8 layer against the torch W8A8 emulation (:func:`moe_compile.quant.fp8.moe_fp8_torch`) at the
smallest token count (the emulation loops over experts and K blocks: slow at large sizes).

Targets for the day a GPU is lent: ``fp8 / bf16 >= 1.3`` at 16384 tokens and ``>= 1.5`` at 512; stretch
700 TFLOP/s. ``benchmarks/gpu_suite.py``'s ``fp8`` section runs ``bench_fp8`` at 512 and 16384 tokens with those
targets (and an fp8 end-to-end prefill); not yet run on a GPU.

    python benchmarks/fp8_gemm.py                   # GPU: the three shapes at 512/4096/16384 tokens
    python benchmarks/fp8_gemm.py --cpu-smoke       # no GPU: one tiny shape under the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FP8_MODELS = ("qwen3-30b", "qwen3-235b", "deepseek-v3")


def bench_fp8(shape, T: int, routing: str, device: str, dtype: torch.dtype, check: bool) -> dict[str, float]:
    import grouped_gemm as gg

    from moe_compile.kernels import fused_moe
    from moe_compile.kernels.fp8_moe import fused_moe_fp8
    from moe_compile.ops import moe_torch
    from moe_compile.quant.fp8 import dequantize_weight, moe_fp8_torch, quantize_weight
    from moe_compile.spec import ExpertSpec

    hidden, ids, weights, w_up, w_down, _, _, spec = gg.layer_inputs(shape, T, routing, dtype, device)
    q_up, s_up = quantize_weight(w_up, (128, 128), 2)
    q_down, s_down = quantize_weight(w_down, (128, 128))
    fp8_spec = ExpertSpec(quant="fp8_block", block_n=128, block_k=128, scale_dtype="float32")
    fp8_args = (hidden, ids, weights, q_up, q_down, s_up, s_down, None, None, fp8_spec)
    bf16_args = (hidden, ids, weights, dequantize_weight(q_up, s_up, (128, 128), 2, dtype),
                 dequantize_weight(q_down, s_down, (128, 128), 1, dtype), None, None, spec)  # fmt: skip
    result = {"rel_err": float("nan")}
    if check:
        got, ref = fused_moe_fp8(*fp8_args), moe_fp8_torch(*fp8_args)
        result["rel_err"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    gpu = device == "cuda"
    S, H, I = T * shape.K, shape.H, shape.I
    flops = 2 * S * H * 2 * I + 2 * S * I * H
    ms = {
        "fp8": gg.time_ms(lambda: fused_moe_fp8(*fp8_args), gpu),
        "bf16": gg.time_ms(lambda: fused_moe(*bf16_args), gpu),
        "grouped_mm": gg.time_ms(lambda: moe_torch(*bf16_args), gpu),
    }
    result.update({f"{k}_tflops": flops / (v * 1e-3) / 1e12 for k, v in ms.items()})
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on CPU under the Triton interpreter")
    parser.add_argument("--models", nargs="+", choices=FP8_MODELS, default=list(FP8_MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    opts = parser.parse_args(argv)
    if opts.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    import grouped_gemm as gg

    if opts.cpu_smoke:
        device, dtype, shapes, tokens = "cpu", torch.float32, [gg.SMOKE], [16]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the interpreter check")
        device, dtype = "cuda", torch.bfloat16
        shapes, tokens = [gg.MODELS[m] for m in opts.models], sorted(opts.tokens)
        print(f"device: {torch.cuda.get_device_name()}  fp8 W8A8 (128x128 blocks) vs bf16  SiLU-gated")
    header = f"{'model':<18}{'tokens':>7}{'fp8':>9}{'bf16':>9}{'grp_mm':>9}{'fp8/bf16':>10}{'rel_err':>10}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for shape in shapes:
        for i, T in enumerate(tokens):
            torch.manual_seed(0)
            r = bench_fp8(shape, T, "uniform", device, dtype, check=i == 0)
            rows.append({"model": shape.name, "tokens": T, **r})
            print(
                f"{shape.name:<18}{T:>7}{r['fp8_tflops']:>9.3g}{r['bf16_tflops']:>9.3g}{r['grouped_mm_tflops']:>9.3g}"
                f"{r['fp8_tflops'] / r['bf16_tflops']:>10.3g}{r['rel_err']:>10.1e}"
            )
            if device == "cuda":
                torch.cuda.empty_cache()
    print("TFLOP/s columns (fp8 includes the activation quantizer); fp8/bf16: the speedup over the bf16 Triton layer.")
    return rows


if __name__ == "__main__":
    main()
