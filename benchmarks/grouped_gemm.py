"""TFLOP/s of the Triton MoE layer vs torch grouped matmul vs a dense matmul of the same FLOPs.

Three columns, measured side by side on the same inputs in one run:

- ``triton``: :func:`moe_compile.kernels.fused_moe` (align, up+activation, down+weight, reduce);
- ``grouped_mm``: :func:`moe_compile.ops.moe_torch`, the same layer on ``grouped_mm``
  (sort, gather, two grouped GEMMs, activation, weighted scatter, sum);
- ``dense``: two bf16 matmuls ``[S, H] @ [H, N]`` and ``[S, I] @ [I, H]`` (``S = T*K``),
  the same FLOPs with no routing: the ceiling.

FLOPs of one layer: ``2*S*H*N + 2*S*I*H``. Routing is ``uniform`` (top-k of random
logits) or ``skewed`` (logits biased so a few experts take most pairs).

    python benchmarks/grouped_gemm.py                   # GPU: all shapes, 512/4096/16384 tokens
    python benchmarks/grouped_gemm.py --models mixtral --tokens 4096
    MOE_COMPILE_AUTOTUNE=1 python benchmarks/grouped_gemm.py   # autotune first, log the winners
    python benchmarks/grouped_gemm.py --cpu-smoke       # no GPU: one tiny shape, Triton interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    E: int  # experts
    H: int  # hidden
    I: int  # intermediate (per expert)
    K: int  # experts per token


MODELS = {
    "qwen3-30b": Shape("Qwen3-30B-A3B", 128, 2048, 768, 8),
    "qwen3-235b": Shape("Qwen3-235B-A22B", 128, 4096, 1536, 8),
    "mixtral": Shape("Mixtral-8x7B", 8, 4096, 14336, 2),
    "deepseek-v3": Shape("DeepSeek-V3", 256, 7168, 2048, 8),
}
SMOKE = Shape("smoke", 8, 32, 32, 2)


def route(T: int, shape: Shape, routing: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, K]``, ``topk_weights [T, K]``; skewed adds a decaying bias so low experts dominate."""
    logits_TE = torch.randn(T, shape.E, device=device)
    if routing == "skewed":
        logits_TE += -0.25 * torch.arange(shape.E, device=device, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(logits_TE.softmax(-1), shape.K)
    return ids_TK, weights_TK


def time_ms(fn: Callable[[], object], gpu: bool) -> float:
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def layer_inputs(shape: Shape, T: int, routing: str, dtype: torch.dtype, device: str) -> tuple:
    """``fused_moe``'s arguments for one SiLU-gated layer of ``shape`` on ``T`` tokens (random, O(1) activations)."""
    from moe_compile.spec import ExpertSpec

    E, H, I = shape.E, shape.H, shape.I
    hidden_TH = torch.randn(T, H, device=device, dtype=dtype)
    ids_TK, weights_TK = route(T, shape, routing, device)
    w_up_ENH = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H**-0.5
    w_down_EHI = torch.randn(E, H, I, device=device, dtype=dtype) * I**-0.5
    return hidden_TH, ids_TK, weights_TK, w_up_ENH, w_down_EHI, None, None, ExpertSpec()


def bench_one(shape: Shape, T: int, routing: str, dtype: torch.dtype, device: str) -> dict[str, float]:
    from moe_compile.kernels import fused_moe
    from moe_compile.moe_math import moe_torch
    from moe_compile.verify import rel_err

    H, I, K = shape.H, shape.I, shape.K
    S, N = T * K, 2 * I
    args = layer_inputs(shape, T, routing, dtype, device)
    w_up_ENH, w_down_EHI = args[3], args[4]

    out_triton = fused_moe(*args)
    out_torch = moe_torch(*args)
    err = rel_err(out_triton, out_torch)

    x_SH = torch.randn(S, H, device=device, dtype=dtype)
    a_SI = torch.randn(S, I, device=device, dtype=dtype)
    dense_up_HN, dense_down_IH = w_up_ENH[0].t(), w_down_EHI[0].t()

    def dense() -> None:
        x_SH @ dense_up_HN
        a_SI @ dense_down_IH

    gpu = device == "cuda"
    flops = 2 * S * H * N + 2 * S * I * H
    ms = {
        "triton": time_ms(lambda: fused_moe(*args), gpu),
        "grouped_mm": time_ms(lambda: moe_torch(*args), gpu),
        "dense": time_ms(dense, gpu),
    }
    result = {f"{k}_tflops": flops / (v * 1e-3) / 1e12 for k, v in ms.items()}
    result["rel_err"] = err
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on CPU under the Triton interpreter")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    parser.add_argument("--routing", nargs="+", choices=["uniform", "skewed"], default=["uniform", "skewed"])
    opts = parser.parse_args()

    if opts.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
        device, dtype, shapes, tokens = "cpu", torch.float32, [SMOKE], [16]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the interpreter check")
        device, dtype = "cuda", torch.bfloat16
        shapes, tokens = [MODELS[m] for m in opts.models], opts.tokens
        print(f"device: {torch.cuda.get_device_name()}  dtype: bf16  SiLU-gated")

    header = (
        f"{'model':<16}{'tokens':>7} {'routing':<8}{'triton':>9}{'grp_mm':>9}{'dense':>9}"
        f"{'tri/grp':>9}{'tri/dense':>10}{'rel_err':>10}"
    )
    print(header + "\n" + "-" * len(header))
    for shape in shapes:
        for T in tokens:
            for routing in opts.routing:
                r = bench_one(shape, T, routing, dtype, device)
                tri, grp, dense = r["triton_tflops"], r["grouped_mm_tflops"], r["dense_tflops"]
                print(
                    f"{shape.name:<16}{T:>7} {routing:<8}{tri:>9.3g}{grp:>9.3g}{dense:>9.3g}"
                    f"{tri / grp:>9.3g}{tri / dense:>10.3g}{r['rel_err']:>10.1e}"
                )
                if device == "cuda":
                    torch.cuda.empty_cache()
    print("TFLOP/s columns; ratios are Triton over grouped_mm and over dense.")


if __name__ == "__main__":
    main()
