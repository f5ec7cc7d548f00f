"""One command for the whole GPU story: the first thing to run when a GPU is at hand.

    python benchmarks/gpu_suite.py --out DIR                 # one H100/H200: about 7 minutes, bounded by --budget-s
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
4. ``prefill``: ``benchmarks/prefill.py``'s Qwen3-30B-A3B layers with random weights (as many layers as fit in
   memory, at most ``--prefill-layers``), 4k and 16k tokens: HF eager, ``torch.compile`` (Inductor) and
   ``moe_prefill``; tokens/s and MFU. Logits of the last token only (``logits_to_keep=1``), as a prefill
   server computes them.
5. ``offload``: one torch.profiler trace of ``offload="cpu"`` with a (random-weight) predictor; the share of
   the expert-copy time that overlaps compute, from the trace's copy events vs the compute stream's kernels.

Everything lands under ``--out``: ``results.json`` (machine, versions, every section's rows and status, the
targets), ``summary.md`` (ready to paste into docs/benchmarks.md), ``offload_trace.json.gz`` (open in
Perfetto or chrome://tracing), ``logs/<section>.log``, ``tests/*.xml``. The targets (those of the kernels
issue) are stated with pass/miss: Triton at least ``torch._grouped_mm`` on every shape; Triton at least 60%
of dense bf16 TFLOP/s at 16k tokens; end-to-end at least 1.3x HF eager and 1.15x Inductor. The exit code is
nonzero when a section failed, ran out of time (``timeout``) or had to leave rows out (``partial``); a missed
target is a measurement, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
SECTIONS = ("tests", "autotune", "gemm", "prefill", "offload")
#: seconds per section on a GPU (scaled to --budget-s; unused time passes on to the later sections)
GPU_CAPS = {"tests": 100, "gemm": 90, "prefill": 170, "offload": 50}
SMOKE_CAPS = {"tests": 25, "gemm": 25, "prefill": 40, "offload": 30}
#: modules the sections import (moe_compile itself runs from the checkout: ROOT goes on the path)
NEEDED = ("torch", "triton", "transformers", "pytest", "safetensors", "networkx", "tqdm")
CUDA_TESTS = ["tests/kernel_tests", "tests/test_offload_cuda.py"]
SMOKE_TESTS = ["tests/kernel_tests/test_cuda_only.py", "tests/test_offload_cuda.py"]
TOKENS = [512, 4096, 16384]
PREFILL_TOKENS = [4096, 16384]
TRACE = "offload_trace.json.gz"
#: relative error of the Triton layer vs grouped_mm above which a gemm row is a mismatch
GEMM_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}


# --- targets -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    name: str
    measured: str  # what was measured, as text
    threshold: str
    status: str  # "pass", "miss", "n/a" (not measured, or meaningless on this run)
    detail: str = ""


def evaluate_targets(gemm_rows: list[dict], prefill_rows: list[dict], smoke: bool) -> list[Target]:
    """The kernels issue's targets against the measured rows (worst case over the rows each target covers)."""
    targets: list[Target] = []

    def add(name: str, ratios: list[tuple[float, str]], threshold: float, text: str) -> None:
        if not ratios:
            targets.append(Target(name, "-", text, "n/a", "not measured"))
            return
        worst, where = min(ratios)
        status = "n/a" if smoke else ("pass" if worst >= threshold else "miss")
        detail = f"worst: {where}" + ("; cpu-smoke: figures meaningless" if smoke else "")
        targets.append(Target(name, f"{worst:.2f}x", text, status, detail))

    rows = [r for r in gemm_rows if r.get("triton_tflops")]
    add(
        "Triton MoE >= torch._grouped_mm, every shape",
        [(r["triton_tflops"] / r["grouped_mm_tflops"], _gemm_where(r)) for r in rows],
        1.0,
        ">= 1.00x",
    )
    big = max((r["tokens"] for r in rows), default=None) if smoke else TOKENS[-1]  # the smoke has one tiny size
    add(
        f"Triton MoE >= 60% of dense bf16 at {big} tokens",
        [(r["triton_tflops"] / r["dense_tflops"], _gemm_where(r)) for r in rows if r["tokens"] == big],
        0.6,
        ">= 0.60x",
    )
    for other, threshold in (("eager", 1.3), ("inductor", 1.15)):
        ratios = []
        for tokens in sorted({r["tokens"] for r in prefill_rows}):
            by = {r["variant"]: r for r in prefill_rows if r["tokens"] == tokens}
            if "moe_prefill" in by and other in by:
                ratios.append((by["moe_prefill"]["tokens_per_s"] / by[other]["tokens_per_s"], f"{tokens} tokens"))
        add(f"end-to-end moe_prefill >= {threshold}x {other}", ratios, threshold, f">= {threshold:.2f}x")
    return targets


def _gemm_where(r: dict) -> str:
    return f"{r['model']} {r['tokens']} tokens {r['routing']}"


# --- overlap from a profiler trace -------------------------------------------------------------------

#: CPU ops that count as compute in a CPU trace (a GPU trace uses the compute stream's kernels)
CPU_COMPUTE = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::linear"}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two unions of disjoint sorted intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def copy_overlap(events: list[dict]) -> dict[str, Any]:
    """How much expert-copy time overlaps compute, from Chrome-trace events (torch.profiler's export).

    GPU trace: copies are host-to-device memcpys (``cat == "gpu_memcpy"``, ``HtoD`` in the name); compute is the
    kernels of the compute stream (the stream with the most kernel time). Copies on other streams are the
    prefetches (``ahead``); copies on the compute stream are on demand and by construction overlap nothing there.
    CPU trace (no GPU events): copies are ``aten::copy_`` ops, compute the matmul ops, lanes are threads.
    Times in microseconds; fractions of the copy time (None when there was none).
    """
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    kernels = [e for e in complete if e.get("cat") == "kernel"]
    gpu = bool(kernels)
    if gpu:

        def lane(e: dict) -> Any:
            return (e.get("args") or {}).get("stream", e.get("tid"))

        compute_events = kernels
        copies = [e for e in complete if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    else:

        def lane(e: dict) -> Any:
            return (e.get("pid"), e.get("tid"))

        cpu_ops = [e for e in complete if e.get("cat") == "cpu_op"]
        compute_events = [e for e in cpu_ops if e.get("name") in CPU_COMPUTE]
        copies = [e for e in cpu_ops if e.get("name") == "aten::copy_"]
    busy: dict[Any, float] = {}
    for e in compute_events:
        busy[lane(e)] = busy.get(lane(e), 0.0) + float(e["dur"])
    compute_lane = max(busy, key=busy.get) if busy else None

    def span(e):
        return (float(e["ts"]), float(e["ts"]) + float(e["dur"]))

    compute = _union([span(e) for e in compute_events if lane(e) == compute_lane])
    ahead = _union([span(e) for e in copies if lane(e) != compute_lane])
    on_demand = _union([span(e) for e in copies if lane(e) == compute_lane])
    overlapped = _intersection(ahead, compute)
    copy_us = _length(ahead) + _length(on_demand)
    return {
        "trace_kind": "gpu" if gpu else "cpu",
        "compute_lane": str(compute_lane),
        "compute_us": _length(compute),
        "copy_us": copy_us,
        "copy_ahead_us": _length(ahead),
        "copy_on_demand_us": _length(on_demand),
        "overlapped_us": overlapped,
        "copy_overlap_fraction": overlapped / copy_us if copy_us else None,
        "ahead_overlap_fraction": overlapped / _length(ahead) if ahead else None,
        "copy_events": len(copies),
    }


# --- the sections (each runs in a child process) -----------------------------------------------------


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


def run_tests(s: Section) -> None:
    """pytest on the CUDA-only tests: in parallel shards of the collected ids on a GPU, one run on the smoke."""
    paths = SMOKE_TESTS if s.opts.cpu_smoke else CUDA_TESTS
    if s.opts.cpu_smoke:
        ids, chunks = None, [paths]  # every test skips: no collection pass, one process
    else:
        ids = _collect(paths)
        shards = max(1, min(8, (os.cpu_count() or 2) // 2, len(ids) // 8))
        chunks = [c for c in (ids[i::shards] for i in range(shards)) if c]
    s.result.update(paths=paths, collected=len(ids) if ids else None, shards=len(chunks))
    s.save()
    xml_dir = s.out / "tests"
    xml_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, chunk in enumerate(chunks):
        xml = xml_dir / f"shard{i}.xml"
        log = open(s.out / "logs" / f"tests-shard{i}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *chunk]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), xml, log))
    codes = []
    for proc, _, log in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, s.remaining())))
        except subprocess.TimeoutExpired:
            for p, _, _ in procs:
                p.kill()
            s.notes.append("out of time: shards killed; counts are from the shards that finished")
            codes.append(None)
        log.close()
    cases = [case for _, xml, _ in procs if xml.exists() for case in _junit_cases(xml)]
    if ids is None:
        s.result["collected"] = len(cases)
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    s.result.update(counts=counts, failures=[c for c in cases if c["outcome"] in ("failed", "error")])
    s.result["skipped_reasons"] = sorted({c["message"] for c in cases if c["outcome"] == "skipped"})[:10]
    bad = bool(counts["failed"] or counts["error"] or any(code not in (0, 5) for code in codes) or not cases)
    if ids is not None and len(cases) < len(ids):
        s.notes.append(f"{len(ids) - len(cases)} collected test(s) have no result")
        bad = True
    status = "failed" if bad else "ok"
    if status == "failed" and None in codes and not (counts["failed"] or counts["error"]):
        status = "timeout"
    s.save(status, error=f"{counts['failed']} failed, {counts['error']} errors" if bad else None)


def _collect(paths: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if proc.returncode not in (0, 5) or not ids:
        raise RuntimeError(f"pytest could not collect {paths} (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return ids


def _junit_cases(xml: Path) -> list[dict]:
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            child = case.find(kind)
            if child is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return cases


def _gemm_setup(s: Section):
    import grouped_gemm as gg
    import torch

    if s.opts.cpu_smoke:
        return gg, [gg.SMOKE], [16], "cpu", torch.float32
    return gg, [gg.MODELS[m] for m in sorted(gg.MODELS)], TOKENS, "cuda", torch.bfloat16


def run_gemm(s: Section) -> None:
    import torch

    gg, shapes, tokens, device, dtype = _gemm_setup(s)
    dtype_name = str(dtype).removeprefix("torch.")
    rows, mismatches = [], []
    s.result.update(dtype=dtype_name, rows=rows)
    plan = [(shape, T, routing) for shape in shapes for T in tokens for routing in ("uniform", "skewed")]
    for done, (shape, T, routing) in enumerate(plan):
        left = len(plan) - done
        if rows and s.remaining() < 1.5 * (s.result.get("seconds_per_row") or 0):
            s.notes.append(f"out of budget: {left} row(s) not measured")
            break
        start = time.time()
        torch.manual_seed(0)
        r = gg.bench_one(shape, T, routing, dtype, device)
        row = {
            "model": shape.name,
            "E": shape.E,
            "H": shape.H,
            "I": shape.I,
            "K": shape.K,
            "tokens": T,
            "routing": routing,
            **r,
        }
        rows.append(row)
        if not r["rel_err"] < GEMM_TOLERANCE[dtype_name]:
            mismatches.append(f"{_gemm_where(row)}: Triton vs grouped_mm relative error {r['rel_err']:.2e}")
        s.result["seconds_per_row"] = max(s.result.get("seconds_per_row") or 0, time.time() - start)
        print(
            f"gemm {_gemm_where(row)}: triton {r['triton_tflops']:.3g} grouped_mm {r['grouped_mm_tflops']:.3g} "
            f"dense {r['dense_tflops']:.3g} TFLOP/s, rel err {r['rel_err']:.1e}",
            flush=True,
        )
        s.save()
        if device == "cuda":
            torch.cuda.empty_cache()
    s.result["mismatches"] = mismatches
    status = "failed" if mismatches else ("partial" if len(rows) < len(plan) else "ok")
    s.save(status, error="; ".join(mismatches) or None)


def run_autotune(s: Section) -> None:
    """Autotune every gemm shape and token count (until the budget is spent) and write the table."""
    import torch
    import triton.testing

    from moe_compile.kernels import configs, fused_moe

    gg, shapes, tokens, device, dtype = _gemm_setup(s)
    if device != "cuda":
        s.notes.append("cpu-smoke: no autotune under the interpreter; the table is written from a fake timing")
    os.environ["MOE_COMPILE_AUTOTUNE"] = "1"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu smoke"
    done, skipped = [], []
    path = s.out / "tuned" / configs.tuned_file_name(device_name)
    provenance = {**_versions(), "written_by": "benchmarks/gpu_suite.py --autotune", "date": _now()}

    def write() -> None:
        table = configs.autotuned_table(device_name, dtype)
        configs.write_tuned(str(path), device_name, dtype, table, **provenance)
        s.result.update(file=str(path.relative_to(s.out)), shapes=len(table))
        if s.opts.install_tuned and device == "cuda":
            installed = Path(configs.TUNED_DIR) / path.name
            configs.write_tuned(str(installed), device_name, dtype, table, **provenance)
            s.result["installed"] = str(installed)

    for shape in shapes:
        for T in tokens:
            if done and s.remaining() < 1.5 * max(d["seconds"] for d in done):
                skipped.append(f"{shape.name} {T}")
                continue
            start = time.time()
            torch.manual_seed(0)
            args = gg.layer_inputs(shape, T, "uniform", dtype, device)
            if device == "cuda":

                def bench(c, args=args):
                    return triton.testing.do_bench(lambda: fused_moe(*args, config=c), warmup=5, rep=25)

                config = configs.select_config(shape.E, 2 * shape.I, shape.H, T, shape.K, dtype, args[0].device, bench)
            else:  # the interpreter would take minutes: record what the heuristic picks, as the autotune would
                config = configs.heuristic(shape.E, T, shape.K, dtype)
                bucket = 1 << max(T - 1, 0).bit_length()
                configs._AUTOTUNED[(device_name, (shape.E, 2 * shape.I, shape.H), bucket, shape.K, dtype)] = config
            done.append(
                {"model": shape.name, "tokens": T, "config": dataclasses.asdict(config), "seconds": time.time() - start}
            )
            print(f"autotune {shape.name} {T} tokens: {config} ({time.time() - start:.1f} s)", flush=True)
            del args
            write()  # after every shape: a timeout later still leaves a valid table
            s.result.update(done=done, skipped=skipped)
            s.save()
    if not done:
        raise RuntimeError("autotune: no shape was tuned within the budget")
    s.save("partial" if skipped else "ok")


def _prefill_layers(s: Section, config) -> tuple[int, str]:
    """As many layers as fit in half the free memory (at most --prefill-layers), and why that many."""
    import torch

    cap = s.opts.prefill_layers
    if s.opts.cpu_smoke:
        return min(cap, 2), "cpu-smoke: 2 layers of the tiny zoo model"
    H, E, I, V = config.hidden_size, config.num_experts, config.moe_intermediate_size, config.vocab_size
    d = config.head_dim
    per_layer = 2 * (3 * E * H * I + H * d * (config.num_attention_heads * 2 + 2 * config.num_key_value_heads) + E * H)
    fixed = 2 * 2 * V * H  # embedding and LM head, bf16
    free, _ = torch.cuda.mem_get_info()
    reserve = 30 * 2**30  # activations at 16k tokens, Inductor's buffers, the compiled copies' workspaces
    fit = int((free / 2 - fixed - reserve) // per_layer)
    layers = max(1, min(cap, fit))
    return layers, f"min(--prefill-layers {cap}, {fit} fit in half of {free / 2**30:.0f} GiB free)"


def run_prefill(s: Section) -> None:
    import prefill as pf
    import torch
    import transformers

    import moe_compile

    smoke = s.opts.cpu_smoke
    config = None if smoke else transformers.Qwen3MoeConfig(num_hidden_layers=1, **pf.QWEN3_30B_A3B)
    layers, why = _prefill_layers(s, config)
    model, seq = pf.build_model(layers, cpu=smoke)
    tokens = [256] if smoke else PREFILL_TOKENS
    dynamic = False  # one static compile per token count, as a prefill server with length buckets would do
    contenders = {
        "eager": model,
        "inductor": torch.compile(model, backend="eager" if smoke else "inductor", dynamic=dynamic),
        "moe_prefill": torch.compile(model, backend="moe_prefill", dynamic=dynamic),
    }
    rows: list[dict] = []
    s.result.update(
        model="tiny zoo qwen3_moe" if smoke else "Qwen3-30B-A3B layer shapes",
        layers=layers,
        layers_why=why,
        seq=seq,
        rows=rows,
        logits_to_keep=1,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    if smoke:
        s.notes.append(
            "cpu-smoke: the 'inductor' contender is Dynamo with the eager backend (Inductor's compile "
            "takes ~20 s on a CPU); tiny zoo model in fp32"
        )

    def on_row(row: dict) -> None:
        rows.append(row)
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] else ""
        print(f"prefill {row['tokens']} tokens {row['variant']}: {row['tokens_per_s']:.0f} tokens/s{mfu}", flush=True)
        if row["variant"] == "moe_prefill":
            report = moe_compile.last_report()
            if report is not None:
                s.result["moe_blocks"] = len(report.blocks)
                s.result["implementations"] = sorted({b.implementation for b in report.blocks})
                s.result["skipped_blocks"] = [f"{x.where}: {x.reason}" for x in report.skipped][:5]
        s.save()

    iters = 3 if smoke else 5
    pf.measure(model, contenders, tokens, seq, warmup=1 if smoke else 2, iters=iters, on_row=on_row, logits_to_keep=1)
    if not s.result.get("moe_blocks"):
        s.notes.append("moe_prefill rewrote no MoE block: its column is plain Inductor (see the backend's report)")
    s.save("ok")


def run_offload(s: Section) -> None:
    import prefill as pf
    import torch

    import moe_compile

    sys.path.insert(0, str(ROOT / "tests"))
    from predictor_helpers import random_predictors

    smoke = s.opts.cpu_smoke
    layers = 2 if smoke else min(4, s.opts.prefill_layers)
    model, seq = pf.build_model(layers, cpu=smoke)
    tokens = 256 if smoke else 4096
    device = next(model.parameters()).device
    input_ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // seq), min(seq, tokens)), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Path(tmp) / "random.safetensors"
        random_predictors(model, predictor)
        options = {"offload": "cpu", "predictor": str(predictor), "inductor": False}
        compiled = torch.compile(model, backend="moe_prefill", options=options)
        s.result.update(layers=layers, tokens=input_ids.numel(), options={**options, "predictor": "random weights"})
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.no_grad():
            compiled(input_ids, use_cache=False, logits_to_keep=1)  # compile, pin the host copies, warm up
            report = moe_compile.last_report()
            for store in report.offload:
                store.reset_stats()
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                compiled(input_ids, use_cache=False, logits_to_keep=1)
                sync()
            s.result["profiled_ms"] = (time.perf_counter() - start) * 1e3
    raw = s.out / "offload_trace.json"
    prof.export_chrome_trace(str(raw))
    doc = json.loads(raw.read_text())
    with gzip.open(s.out / TRACE, "wt") as f:
        json.dump(doc, f)
    raw.unlink()
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    s.result["overlap"] = copy_overlap(events)
    stats = [st for store in report.offload for st in store.stats()]
    s.result["bytes"] = {
        f: sum(getattr(st, f) for st in stats)
        for f in ("bytes_ahead", "bytes_ahead_used", "bytes_on_demand", "bytes_needed")
    }
    s.result["trace"] = TRACE
    o = s.result["overlap"]
    print(f"offload: {o['copy_overlap_fraction']} of {o['copy_us']:.0f} us copies overlap compute", flush=True)
    if not stats:
        raise RuntimeError("offload: the compiled model has no offload store (no MoE block was offloaded)")
    if device.type == "cuda" and o["trace_kind"] != "gpu":
        raise RuntimeError("offload: the trace has no GPU kernel events (is CUPTI available to torch.profiler?)")
    s.save("ok")


RUNNERS: dict[str, Callable[[Section], None]] = {
    "tests": run_tests,
    "autotune": run_autotune,
    "gemm": run_gemm,
    "prefill": run_prefill,
    "offload": run_offload,
}


def child(opts: argparse.Namespace) -> int:
    """Run one section in this process (the parent started it with --section)."""
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.path.insert(0, str(BENCHMARKS))
    s = Section(opts.section, opts, opts.deadline)
    s.save("running")
    try:
        RUNNERS[opts.section](s)
    except BaseException as err:  # noqa: BLE001 - reported, then the parent goes on with the next section
        s.save("failed", error=f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}")
        traceback.print_exc()
        return 1
    return 0


# --- the parent: plan, run the sections, write the report --------------------------------------------


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


def machine(smoke: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        **_versions(),
        "date": _now(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available() and not smoke:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["device"] = "cpu (smoke run)"
    return info


def _run_child(name: str, opts: argparse.Namespace, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run section ``name`` in a child process, its output echoed and logged; (exit code or None on timeout, s)."""
    deadline = time.time() + timeout - min(15.0, 0.1 * timeout)  # the child stops starting work before the kill
    cmd = [
        sys.executable,
        __file__,
        "--section",
        name,
        "--deadline",
        str(deadline),
        "--out",
        opts.out,
        "--prefill-layers",
        str(opts.prefill_layers),
    ]
    if opts.cpu_smoke:
        cmd.append("--cpu-smoke")
    if opts.install_tuned:
        cmd.append("--install-tuned")
    log_path = Path(opts.out) / "logs" / f"{name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(  # its own process group: a timeout also ends its pytest shards, compile workers
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                if not opts.quiet:
                    sys.stdout.write(f"[{name}] {line}")
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call created, by its id
            proc.wait()
            code = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the section left running (its group, by id)
        reader.join(timeout=10)
    return code, time.time() - start


def _section_result(out: Path, name: str, code: int | None, wall: float) -> dict[str, Any]:
    path = section_file(out, name)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        doc = {"status": "failed", "result": {}, "notes": [], "error": "the section wrote no result"}
    if code is None:
        doc["status"], doc["error"] = "timeout", f"killed after {wall:.0f} s (its budget); rows so far are kept"
    elif code != 0 and doc.get("status") in ("ok", "running"):
        doc["status"], doc["error"] = "failed", f"exit code {code} (see logs/{name}.log)"
    elif doc.get("status") == "running":
        doc["status"], doc["error"] = "failed", "the section ended without a result"
    doc["wall_s"] = round(wall, 1)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, summary.md, the trace, logs")
    parser.add_argument("--cpu-smoke", action="store_true", help="the plumbing on CPU: tiny shapes, interpreter")
    parser.add_argument("--budget-s", type=float, default=None, help="wall budget of all sections (420; smoke 110)")
    parser.add_argument("--sections", nargs="+", choices=[s for s in SECTIONS if s != "autotune"], default=None)
    parser.add_argument("--autotune", action="store_true", help="autotune and write DIR/tuned/<device>.json first")
    parser.add_argument("--autotune-budget-s", type=float, default=540, help="budget of --autotune (not in --budget-s)")
    parser.add_argument("--install-tuned", action="store_true", help="also write the table into the package")
    parser.add_argument("--prefill-layers", type=int, default=4, help="most decoder layers for prefill/offload")
    parser.add_argument("--quiet", action="store_true", help="only the summary, not the sections' output")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if opts.section:
        return child(opts)

    started = time.time()
    smoke = opts.cpu_smoke
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device; run with --cpu-smoke for the CPU check of the plumbing", file=sys.stderr)
            return 2
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_suite: missing modules {missing}: the sections that need them will fail; install them "
              "(pip install -e '.[test]') or carry their wheels to an offline machine", file=sys.stderr)  # fmt: skip
    caps = dict(SMOKE_CAPS if smoke else GPU_CAPS)
    budget = opts.budget_s if opts.budget_s is not None else (110.0 if smoke else 420.0)
    scale = budget / sum(caps.values())
    plan = [s for s in ("tests", "gemm", "prefill", "offload") if opts.sections is None or s in opts.sections]
    if opts.autotune:
        plan.insert(1 if "tests" in plan else 0, "autotune")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # before any kernel is defined, in every child
    for stale in (out / "sections").glob("*.json") if (out / "sections").exists() else []:
        stale.unlink()

    sections: dict[str, Any] = {}
    global_deadline = started + budget
    for i, name in enumerate(plan):
        if name == "autotune":
            timeout = opts.autotune_budget_s
        else:  # what is left, less the later sections' shares: time unused so far passes on
            later = sum(caps[n] for n in plan[i + 1 :] if n != "autotune") * scale
            timeout = max(20.0, global_deadline - time.time() - later)
        print(f"== {name} (budget {timeout:.0f} s)", flush=True)
        code, wall = _run_child(name, opts, timeout, env)
        sections[name] = _section_result(out, name, code, wall)
        print(f"== {name}: {sections[name]['status']} in {wall:.0f} s", flush=True)
        if name == "autotune":
            global_deadline += wall  # autotune has its own budget, not charged to the other sections
            if sections[name].get("result", {}).get("file"):  # a valid table, complete or not
                env["MOE_COMPILE_TUNED_DIR"] = str((out / "tuned").resolve())

    gemm_rows = sections.get("gemm", {}).get("result", {}).get("rows", [])
    prefill_rows = sections.get("prefill", {}).get("result", {}).get("rows", [])
    targets = evaluate_targets(gemm_rows, prefill_rows, smoke)
    failed = [n for n, d in sections.items() if d["status"] != "ok"]
    results = {
        "suite": "moe_compile benchmarks/gpu_suite.py",
        "format": 1,
        "mode": "cpu-smoke" if smoke else "gpu",
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(smoke),
        "budget_s": budget,
        "wall_s": round(time.time() - started, 1),
        "sections": sections,
        "targets": [dataclasses.asdict(t) for t in targets],
        "failed_sections": failed,
        "missing_modules": missing,
        "exit_code": 1 if failed else 0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    summary = render_summary(results)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    if failed:
        print(f"gpu_suite: FAILED sections: {', '.join(failed)} (see {out}/logs)", file=sys.stderr)
    return results["exit_code"]


# --- the markdown summary ----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["-" * max(3, len(h)) for h in header]
    rule = [(":" + r[1:]) if a == "l" else (r[:-1] + ":") for r, a in zip(rule, align)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def render_summary(res: dict[str, Any]) -> str:
    m, sec = res["machine"], res["sections"]
    smoke = res["mode"] == "cpu-smoke"
    title = "GPU suite (benchmarks/gpu_suite.py)" + (" — CPU smoke run, figures meaningless" if smoke else "")
    out = [f"## {title}", ""]
    device = m.get("device", "?") + (f", sm {m['capability']}, {m['memory_gib']} GiB" if "capability" in m else "")
    out += [
        f"- Machine: {device}; {m.get('cpu_count')} CPU cores.",
        f"- Date: {m['date']}.",
        (
            f"- Versions: torch {m.get('torch')}, triton {m.get('triton')}, transformers {m.get('transformers')}, "
            f"Python {m.get('python')}, CUDA {m.get('cuda', '-')}, moe_compile {m.get('moe_compile_commit', '?')}."
        ),
        f"- Command: `{res['command']}` ({res['wall_s']} s wall, budget {res['budget_s']:.0f} s).",
        *([f"- Missing modules: {', '.join(res['missing_modules'])}.", ""] if res.get("missing_modules") else [""]),
        "### Sections",
        "",
    ]
    rows = []
    for name, d in sec.items():
        note = "; ".join([*(d.get("notes") or []), *([d["error"].splitlines()[0]] if d.get("error") else [])])
        rows.append([name, d["status"], d.get("wall_s", "-"), note.replace("|", "/") or "-"])
    out += [_table(["section", "status", "wall s", "notes"], rows, "llrl"), ""]
    out += [
        "### Targets",
        "",
        _table(
            ["target", "measured", "threshold", "result", "detail"],
            [[t["name"], t["measured"], t["threshold"], t["status"], t["detail"] or "-"] for t in res["targets"]],
            "lrrll",
        ),
        "",
    ]

    if "tests" in sec:
        r = sec["tests"].get("result", {})
        c = r.get("counts", {})
        out += [
            "### CUDA-only tests",
            "",
            (
                f"`pytest {' '.join(r.get('paths', []))}` in {r.get('shards', '?')} shard(s): "
                f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
                f"{c.get('skipped', 0)} skipped of {r.get('collected', '?')} collected."
            ),
            "",
        ]
        for f in r.get("failures", [])[:20]:
            out.append(f"- FAILED `{f['id']}`: {f['message']}")
        out.append("")
    if "autotune" in sec:
        r = sec["autotune"].get("result", {})
        out += [
            "### Autotune",
            "",
            (
                f"Table written to `{r.get('file', '-')}` ({r.get('shapes', 0)} shapes); "
                f"not tuned (budget): {', '.join(r.get('skipped', [])) or 'none'}."
            ),
            "",
        ]
        rows = [
            [d["model"], d["tokens"], "/".join(str(v) for v in d["config"].values()), f"{d['seconds']:.0f}"]
            for d in r.get("done", [])
        ]
        out += [_table(["model", "tokens", "block m/n/k, group m, warps, stages", "s"], rows), ""]
    if "gemm" in sec:
        r = sec["gemm"].get("result", {})
        out += [
            "### Grouped GEMM (TFLOP/s, " + str(r.get("dtype", "?")) + ", SiLU-gated)",
            "",
            (
                "`triton`: moe_compile's fused MoE layer; `grouped_mm`: the same layer on torch._grouped_mm "
                "(moe_torch); `dense`: two matmuls of the same FLOPs, no routing."
            ),
            "",
        ]
        rows = [
            [
                g["model"],
                g["tokens"],
                g["routing"],
                _fmt(g["triton_tflops"]),
                _fmt(g["grouped_mm_tflops"]),
                _fmt(g["dense_tflops"]),
                _fmt(g["triton_tflops"] / g["grouped_mm_tflops"], ".2f"),
                _fmt(g["triton_tflops"] / g["dense_tflops"], ".2f"),
                _fmt(g["rel_err"], ".1e"),
            ]
            for g in r.get("rows", [])
        ]
        header = ["model", "tokens", "routing", "triton", "grouped_mm", "dense", "tri/grp", "tri/dense", "rel err"]
        out += [_table(header, rows, "lrlrrrrrr"), ""]
    if "prefill" in sec:
        r = sec["prefill"].get("result", {})
        out += [
            "### End-to-end prefill",
            "",
            (
                f"{r.get('model', '?')}, random weights, {r.get('dtype', '?')}, {r.get('layers', '?')} layers "
                f"({r.get('layers_why', '')}), sequences of {r.get('seq', '?')} tokens, last-token logits. "
                f"moe_prefill rewrote {r.get('moe_blocks', '?')} MoE block(s), implementations "
                f"{r.get('implementations', '?')}."
            ),
            "",
        ]
        rows = [
            [
                p["tokens"],
                p["variant"],
                _fmt(p["ms"], ".1f"),
                _fmt(p["tokens_per_s"], ".0f"),
                _fmt(p["vs_first"], ".2f") + "x",
                _fmt(p["mfu"], ".1%"),
            ]
            for p in r.get("rows", [])
        ]
        out += [_table(["tokens", "variant", "ms", "tokens/s", "vs eager", "MFU"], rows, "rlrrrr"), ""]
    if "offload" in sec:
        r = sec["offload"].get("result", {})
        o, b = r.get("overlap", {}), r.get("bytes", {})

        def mib(n):
            return "-" if n is None else f"{n / 2**20:.1f} MiB"

        out += [
            "### Offload overlap",
            "",
            (
                f'`offload="cpu"` with a random-weight predictor, {r.get("layers", "?")} layers, '
                f"{r.get('tokens', '?')} tokens, one profiled prefill ({_fmt(r.get('profiled_ms'), '.1f')} ms); "
                f"trace `{r.get('trace', '-')}`."
            ),
            "",
        ]
        rows = [
            ["expert-copy time overlapping compute", _fmt(o.get("copy_overlap_fraction"), ".1%")],
            ["of the prefetched (side-stream) copy time", _fmt(o.get("ahead_overlap_fraction"), ".1%")],
            [
                "copy time ahead / on demand (us)",
                f"{_fmt(o.get('copy_ahead_us'), '.0f')} / {_fmt(o.get('copy_on_demand_us'), '.0f')}",
            ],
            ["compute-stream busy time (us)", _fmt(o.get("compute_us"), ".0f")],
            [
                "bytes ahead (used) / on demand",
                f"{mib(b.get('bytes_ahead'))} ({mib(b.get('bytes_ahead_used'))}) / {mib(b.get('bytes_on_demand'))}",
            ],
        ]
        out += [_table(["metric", "value"], rows, "lr"), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
