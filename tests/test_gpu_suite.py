"""benchmarks/gpu_suite.py: the CPU smoke run end to end (outputs exist and are well formed), and the parts that
turn measurements into numbers (copy/compute overlap from a trace, the targets, a failing section's isolation)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_compile.kernels import configs

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = suite  # dataclasses look their module up
_spec.loader.exec_module(suite)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--cpu-smoke", "--autotune", "--quiet"]
    cmd += ["--out", str(out), "--budget-s", "600"]  # generous: CI machines are shared; idle, it takes under a minute
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    return out, proc


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "cpu-smoke" and res["exit_code"] == 0 and res["failed_sections"] == []
    assert {"torch", "triton", "transformers", "python", "date", "device"} <= set(res["machine"])
    assert list(res["sections"]) == ["tests", "autotune", "gemm", "fp8", "prefill", "offload", "serve"]
    assert all(s["status"] == "ok" and s["wall_s"] > 0 for s in res["sections"].values()), res["sections"]

    serve = res["sections"]["serve"]["result"]  # moe-compile score in a subprocess on a checkpoint on disk
    assert (serve["model"], serve["layers"], serve["device"], serve["dtype"]) == ("tiny zoo qwen3_moe", 2, "cpu",
                                                                                  "float32")  # fmt: skip
    assert serve["scored"] == serve["requests"] == serve["compared"] == 16 and serve["errors"] == 0
    assert serve["exact"] and serve["max_abs_logprob_diff"] < 1e-4
    assert serve["requests_per_s"] > 0 and serve["tokens_per_s"] > 0
    assert 0 < serve["first_answer_s"] <= serve["wall_s"] and "--device cpu" in serve["command"]

    tests = res["sections"]["tests"]["result"]
    assert tests["collected"] > 0 and tests["counts"]["skipped"] == tests["collected"]  # CUDA-only: all skip
    assert all(x.exists() for x in (out / "tests").glob("*.xml"))

    gemm = res["sections"]["gemm"]["result"]["rows"]
    assert gemm and all(r["model"] == "smoke" and r["rel_err"] < 1e-4 for r in gemm)
    assert all(r[f"{k}_tflops"] > 0 for r in gemm for k in ("triton", "grouped_mm", "dense"))

    fp8 = res["sections"]["fp8"]["result"]
    assert [(r["model"], r["tokens"]) for r in fp8["rows"]] == [("smoke", 8), ("smoke", 16)]
    assert all(r[f"{k}_tflops"] > 0 for r in fp8["rows"] for k in ("fp8", "bf16", "grouped_mm"))
    assert all(r["fp8_vs_bf16"] == pytest.approx(r["fp8_tflops"] / r["bf16_tflops"]) for r in fp8["rows"])
    assert fp8["rows"][0]["rel_err"] < 1e-3 and fp8["rows"][1]["rel_err"] is None  # emulation at the smallest only
    assert fp8["mismatches"] == []
    e2e = fp8["e2e"]
    assert e2e["fp8_blocks"] == 2 and all(q.startswith("fp8 e4m3 W8A8, 128x128") for q in e2e["quantization"])
    assert e2e["exact"] and e2e["rel_err"] < 1e-2 and e2e["rel_err_timed"] < 1e-2  # Triton (interpreter) = emulation
    assert 1e-4 < e2e["rel_vs_bf16"] < 0.1  # the quantization moves the logits, by a few percent
    assert e2e["expert_bytes"]["fp8_weights"] * 2 == e2e["expert_bytes"]["bf16"]
    assert e2e["dense_fp8_layers"] == 0  # attention kept bf16: the two models differ in their experts only
    assert [r["variant"] for r in e2e["rows"]] == ["bf16", "fp8"] and all(r["tokens_per_s"] > 0 for r in e2e["rows"])

    prefill = res["sections"]["prefill"]["result"]
    assert [r["variant"] for r in prefill["rows"]] == ["eager", "inductor", "moe_prefill"]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 256 for r in prefill["rows"])
    assert prefill["moe_blocks"] == 2

    offload = res["sections"]["offload"]["result"]
    overlap = offload["overlap"]
    assert overlap["trace_kind"] == "cpu" and overlap["copy_events"] > 0 and overlap["compute_us"] > 0
    assert overlap["copy_overlap_fraction"] == 0.0  # one CPU thread: copies and matmuls never overlap
    assert offload["bytes"]["bytes_ahead"] > 0  # the random predictor brought experts ahead
    with gzip.open(out / suite.TRACE, "rt") as f:
        trace = json.load(f)
    assert any(e.get("name") == "aten::copy_" for e in trace["traceEvents"])

    tuned = res["sections"]["autotune"]["result"]
    dtype, table = configs.parse_tuned(json.loads((out / tuned["file"]).read_text()), tuned["file"])
    assert dtype == "float32" and list(table) == [(8, 64, 32)]

    assert [t["status"] for t in res["targets"]] == ["n/a"] * 7  # figures from a CPU smoke run mean nothing


@pytest.mark.slow
def test_cpu_smoke_summary_has_every_table(smoke):
    out, _ = smoke
    md = (out / "summary.md").read_text()
    res = json.loads((out / "results.json").read_text())
    for heading in ("Sections", "Targets", "CUDA-only tests", "Autotune", "Grouped GEMM", "End-to-end prefill",
                    "Offload overlap", "Block-fp8 experts", "Serving a checkpoint (`moe-compile score`)"):  # fmt: skip
        assert f"### {heading}" in md
    for name in res["sections"]:
        assert f"| {name} | ok |" in md
    for target in res["targets"]:
        assert f"| {target['name']} | {target['measured']} |" in md
    assert "| smoke | 16 | uniform |" in md
    for variant in ("eager", "inductor", "moe_prefill"):
        assert f"| 256 | {variant} |" in md
    assert "| expert-copy time overlapping compute | 0.0% |" in md
    assert "| smoke | 8 |" in md and "| 16 | fp8 |" in md and "compiled without Inductor (exact" in md
    assert "| requests (prompt tokens) | 16 (" in md and "| launch to first answer (s) |" in md


def _x(cat, name, stream, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"stream": stream}}  # fmt: skip


def test_copy_overlap_from_a_gpu_trace():
    events = [
        _x("kernel", "gemm", 7, 0, 10),
        _x("kernel", "gemm", 7, 20, 10),
        _x("kernel", "small", 9, 40, 1),  # less kernel time: stream 7 is the compute stream
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 9, 5, 20),  # ahead: overlaps [5, 10] and [20, 25]
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 7, 30, 4),  # on demand
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 9, 0, 50),  # not an expert copy
        {"ph": "i", "name": "marker", "ts": 3},
    ]
    o = suite.copy_overlap(events)
    assert o["trace_kind"] == "gpu" and o["compute_lane"] == "7"
    assert (o["compute_us"], o["copy_ahead_us"], o["copy_on_demand_us"], o["overlapped_us"]) == (20, 20, 4, 10)
    assert o["copy_overlap_fraction"] == pytest.approx(10 / 24) and o["ahead_overlap_fraction"] == 0.5


def test_copy_overlap_merges_nested_and_overlapping_events():
    events = [
        _x("kernel", "a", 1, 0, 10),
        _x("kernel", "b", 1, 5, 10),  # overlaps a: compute busy [0, 15]
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 2, 12, 10),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 2, 14, 2),  # inside the one above
    ]
    o = suite.copy_overlap(events)
    assert (o["compute_us"], o["copy_ahead_us"], o["overlapped_us"]) == (15, 10, 3)
    assert suite.copy_overlap([])["copy_overlap_fraction"] is None


def _gemm(model, tokens, triton, grouped, dense):
    return {"model": model, "tokens": tokens, "routing": "uniform", "triton_tflops": triton,
            "grouped_mm_tflops": grouped, "dense_tflops": dense}  # fmt: skip


def _prefill(tokens, eager, inductor, moe):
    return [{"tokens": tokens, "variant": v, "tokens_per_s": x}
            for v, x in (("eager", eager), ("inductor", inductor), ("moe_prefill", moe))]  # fmt: skip


def test_targets_pass_and_miss_on_the_worst_row():
    gemm = [_gemm("a", 512, 100, 90, 300), _gemm("a", 16384, 500, 400, 700), _gemm("b", 16384, 300, 310, 600)]
    prefill = _prefill(4096, 100, 120, 140) + _prefill(16384, 100, 110, 135)
    t = {x.name: x for x in suite.evaluate_targets(gemm, prefill, smoke=False)}
    grouped, dense, eager, inductor = t.values()
    assert (grouped.status, grouped.measured) == ("miss", "0.97x") and "b 16384" in grouped.detail
    assert (dense.status, dense.measured) == ("miss", "0.50x") and "16384 tokens" in dense.name  # b: 300/600
    assert (eager.status, eager.measured) == ("pass", "1.35x") and "16384" in eager.detail
    assert (inductor.status, inductor.measured) == ("pass", "1.17x") and "4096" in inductor.detail
    assert [x.status for x in suite.evaluate_targets([], [], smoke=False)] == ["n/a"] * 4
    no_16k = [x.status for x in suite.evaluate_targets(gemm[:1], [], smoke=False)]
    assert no_16k == ["pass", "n/a", "n/a", "n/a"]  # 16k rows not measured: that target is not met by 512's


def _fp8(model, tokens, fp8, bf16):
    return {"model": model, "tokens": tokens, "fp8_tflops": fp8, "bf16_tflops": bf16}


def test_fp8_targets_take_the_worst_ratio_and_the_best_tflops():
    rows = [_fp8("a", 512, 160, 100), _fp8("b", 512, 140, 100), _fp8("a", 16384, 720, 500), _fp8("b", 16384, 600, 500)]
    big, small, stretch = suite.evaluate_fp8_targets(rows, smoke=False)
    assert "16384" in big.name and (big.status, big.measured) == ("miss", "1.20x") and "b 16384" in big.detail
    assert "512" in small.name and (small.status, small.measured) == ("miss", "1.40x") and "b 512" in small.detail
    assert (stretch.status, stretch.measured) == ("pass", "720 TFLOP/s") and "a 16384" in stretch.detail
    fast = [_fp8("a", 512, 160, 100), _fp8("a", 16384, 650, 500)]
    assert [t.status for t in suite.evaluate_fp8_targets(fast, smoke=False)] == ["pass", "pass", "miss"]
    assert [t.status for t in suite.evaluate_fp8_targets(rows[:2], smoke=False)] == ["n/a", "miss", "n/a"]
    assert [t.status for t in suite.evaluate_fp8_targets(rows, smoke=True)] == ["n/a"] * 3


def test_a_failing_section_does_not_stop_the_others(tmp_path, monkeypatch):
    """A section that crashes without a result, one that times out with partial rows, one that succeeds."""

    def fake_child(name, opts, timeout, env):
        s = suite.Section(name, opts, deadline=0)
        if name == "gemm":
            s.result["rows"] = [_gemm("a", 512, 1, 1, 1) | {"routing": "uniform", "rel_err": 0.0}]
            s.save()  # then killed: a timeout
            return None, 5.0
        if name == "prefill":
            s.result["rows"] = [r | {"ms": 1.0, "vs_first": 1.0, "mfu": None} for r in _prefill(4096, 1, 1, 2)]
            s.save("ok")
            return 0, 1.0
        return 1, 1.0  # tests, fp8, offload, serve: crashed before writing anything

    monkeypatch.setattr(suite.runner, "_run_child", fake_child)
    code = suite.main(["--cpu-smoke", "--out", str(tmp_path), "--quiet"])
    res = json.loads((tmp_path / "results.json").read_text())
    status = {n: s["status"] for n, s in res["sections"].items()}
    expected = {"tests": "failed", "gemm": "timeout", "fp8": "failed", "prefill": "ok", "offload": "failed",
                "serve": "failed"}  # fmt: skip
    assert code == 1 and status == expected
    assert res["failed_sections"] == ["tests", "gemm", "fp8", "offload", "serve"]
    assert res["sections"]["gemm"]["result"]["rows"]  # the rows measured before the kill are kept
    md = (tmp_path / "summary.md").read_text()
    assert "| gemm | timeout |" in md and "| tests | failed |" in md and "| 4096 | moe_prefill |" in md
