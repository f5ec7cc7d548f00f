"""benchmarks/fp8_gemm.py's CPU smoke run: the fp8 Triton layer, the bf16 one and grouped_mm side by side."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_gemm_smoke_rows():
    spec = importlib.util.spec_from_file_location("fp8_gemm", ROOT / "benchmarks" / "fp8_gemm.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["fp8_gemm"] = bench
    spec.loader.exec_module(bench)
    (row,) = bench.main(["--cpu-smoke"])
    assert row["model"] == "smoke" and row["rel_err"] < 1e-3
    assert all(row[f"{k}_tflops"] > 0 for k in ("fp8", "bf16", "grouped_mm"))
