"""What every part of the GPU suite shares: paths, section caps, and :class:`Section`, what a section function gets."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
SECTIONS = ("tests", "autotune", "gemm", "fp8", "prefill", "offload", "serve")
#: seconds per section on a GPU (scaled to --budget-s; unused time passes on to the later sections)
GPU_CAPS = {"tests": 100, "gemm": 90, "fp8": 120, "prefill": 170, "offload": 50, "serve": 120}
SMOKE_CAPS = {"tests": 25, "gemm": 25, "fp8": 45, "prefill": 40, "offload": 30, "serve": 60}
#: modules the sections import (moe_compile itself runs from the checkout: ROOT goes on the path)
NEEDED = ("torch", "triton", "transformers", "pytest", "safetensors", "networkx", "tqdm")
CUDA_TESTS = ["tests/kernel_tests", "tests/test_offload_cuda.py"]
SMOKE_TESTS = ["tests/kernel_tests/test_cuda_only.py", "tests/test_offload_cuda.py"]
TOKENS = [512, 4096, 16384]
PREFILL_TOKENS = [4096, 16384]
TRACE = "offload_trace.json.gz"
#: how much looser than moe_compile.verify's tolerance a gemm row (Triton layer vs grouped_mm) may be: an
#: fp32 layer at real sizes (H up to 7168) sums in Triton's K-blocked order against cuBLAS's, two matmuls deep
GEMM_SLACK = {"float32": 10.0}


class Section:
    """What a section function gets: the options, its deadline, a place to save partial results."""

    def __init__(self, name: str, opts: argparse.Namespace, deadline: float):
        self.name, self.opts, self.deadline = name, opts, deadline
        self.out = Path(opts.out)
        self.result: dict[str, Any] = {}
        self.status = "running"
        self.notes: list[str] = []

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self, status: str | None = None, error: str | None = None) -> None:
        """Write the section's file now (atomically): a timeout later still leaves these rows."""
        if status is not None:
            self.status = status
        doc = {"status": self.status, "result": self.result, "notes": self.notes, "error": error}
        path = section_file(self.out, self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(path)


def section_file(out: Path, name: str) -> Path:
    return out / "sections" / f"{name}.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            out[name] = f"unavailable ({type(err).__name__})"
    with contextlib.suppress(Exception):
        out["moe_compile_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    return out
