"""One command for the whole GPU story: the first thing to run when a GPU is at hand.

    python benchmarks/gpu_suite.py --out DIR                 # one H100/H200: about 9 minutes, bounded by --budget-s
    python benchmarks/gpu_suite.py --out DIR --autotune      # also autotune, write DIR/tuned/<device>.json
    python benchmarks/gpu_suite.py --out DIR --cpu-smoke     # no GPU: the same plumbing in under a minute

Sections, each in its own process (a crash, a CUDA error or a hang in one is reported as that section's
failure and the others still run) with its own time budget carved from ``--budget-s``:

1. ``tests``: the CUDA-only tests (``tests/kernel_tests``: real Triton kernels in bf16/fp16/fp32 against the torch
   reference, every seed config, the align step and the launch free of host syncs, the canonical op in a CUDA
   graph; ``tests/test_offload_cuda.py``: offload's pinned memory and side-stream copies), run by pytest in
   parallel shards. Any failure fails the suite. ``--cpu-smoke`` runs only the CUDA-only files, which skip.
2. ``autotune`` (``--autotune`` only): autotunes the grouped-GEMM shapes and writes the winners as
   ``DIR/tuned/<device>.json`` (:func:`moe_compile.kernels.configs.write_tuned`); the later sections load it.
   Copy it to ``moe_compile/kernels/tuned/`` (or pass ``--install-tuned``) to ship it.
3. ``gemm``: ``benchmarks/grouped_gemm.py``'s shapes (Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B,
   DeepSeek-V3 at 512/4096/16384 tokens, uniform and skewed routing): TFLOP/s of the Triton MoE layer vs
   ``torch._grouped_mm`` vs a dense bf16 matmul of equal FLOPs (its ``bench_one``).
4. ``fp8`` (``gpusuite/fp8.py``): block-fp8 experts (issue #22): ``benchmarks/fp8_gemm.py``'s ``bench_fp8`` (Triton
   fp8 vs Triton bf16 vs ``torch._grouped_mm`` bf16, relative error vs the torch W8A8 emulation) on the
   Qwen3-30B-A3B, Qwen3-235B-A22B and DeepSeek-V3 expert shapes at 512 and 16384 tokens, and an fp8 end-to-end
   prefill (2 Qwen3-30B-A3B-shaped layers with transformers' ``FP8Experts``, ``prepare`` + ``moe_prefill``)
   timed against the same model in bf16, its logits checked against the emulation.
5. ``prefill``: ``benchmarks/prefill.py``'s Qwen3-30B-A3B layers with random weights (as many layers as fit in
   memory, at most ``--prefill-layers``), 4k and 16k tokens: HF eager, ``torch.compile`` (Inductor) and
   ``moe_prefill``; tokens/s and MFU. Logits of the last token only (``logits_to_keep=1``), as a prefill
   server computes them.
6. ``offload``: one torch.profiler trace of ``offload="cpu"`` with a (random-weight) predictor; the share of
   the expert-copy time that overlaps compute, from the trace's copy events vs the compute stream's kernels.
7. ``serve`` (``gpusuite/serve.py``, issue #21): a Qwen3-30B-A3B-shaped checkpoint with random weights written to
   disk (at most 4 layers), ``moe-compile score --device cuda`` on it in a subprocess against HF eager on the same
   requests: max |log-prob difference|, requests/s, tokens/s, seconds from launch to the first answer.

Everything lands under ``--out``: ``results.json`` (machine, versions, every section's rows and status, the
targets), ``summary.md`` (ready to paste into docs/benchmarks.md), ``offload_trace.json.gz`` (open in
Perfetto or chrome://tracing), ``logs/<section>.log``, ``tests/*.xml``. The targets (those of the kernels
issue) are stated with pass/miss: Triton at least ``torch._grouped_mm`` on every shape; Triton at least 60%
of dense bf16 TFLOP/s at 16k tokens; end-to-end at least 1.3x HF eager and 1.15x Inductor; fp8 Triton at least
1.3x bf16 Triton at 16k tokens and 1.5x at 512, stretch 700 TFLOP/s. The exit code is
nonzero when a section failed, ran out of time (``timeout``) or had to leave rows out (``partial``); a missed
target is a measurement, not a failure.
The parts live in ``benchmarks/gpusuite/``, one module per section of this file as it was: ``common`` (paths, caps,
``Section``), ``targets``, ``trace`` (overlap from a profiler trace), ``sections`` (what each child process runs;
the fp8 section in ``fp8``, the serve section in ``serve``),
``runner`` (the parent) and ``summary`` (the markdown); this file is the command and re-exports their names.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpusuite/, also when loaded by path (tests)

from gpusuite import runner  # noqa: E402  (the parent: tests replace runner._run_child)
from gpusuite.common import (  # noqa: E402
    BENCHMARKS,
    CUDA_TESTS,
    GEMM_SLACK,
    GPU_CAPS,
    NEEDED,
    PREFILL_TOKENS,
    ROOT,
    SECTIONS,
    SMOKE_CAPS,
    SMOKE_TESTS,
    TOKENS,
    TRACE,
    Section,
    section_file,
)
from gpusuite.fp8 import FP8_TOKENS, run_fp8  # noqa: E402
from gpusuite.runner import machine, main  # noqa: E402
from gpusuite.sections import RUNNERS, child, run_autotune, run_gemm, run_offload, run_prefill, run_tests  # noqa: E402
from gpusuite.summary import render_summary  # noqa: E402
from gpusuite.targets import Target, evaluate_fp8_targets, evaluate_targets  # noqa: E402
from gpusuite.trace import copy_overlap  # noqa: E402

__all__ = [
    "BENCHMARKS",
    "CUDA_TESTS",
    "FP8_TOKENS",
    "GEMM_SLACK",
    "GPU_CAPS",
    "NEEDED",
    "PREFILL_TOKENS",
    "ROOT",
    "RUNNERS",
    "SECTIONS",
    "SMOKE_CAPS",
    "SMOKE_TESTS",
    "TOKENS",
    "TRACE",
    "Section",
    "Target",
    "child",
    "copy_overlap",
    "evaluate_fp8_targets",
    "evaluate_targets",
    "machine",
    "main",
    "render_summary",
    "run_autotune",
    "run_fp8",
    "run_gemm",
    "run_offload",
    "run_prefill",
    "run_tests",
    "runner",
    "section_file",
]

if __name__ == "__main__":
    sys.exit(main())
