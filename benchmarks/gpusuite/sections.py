"""The sections, each run in a child process: tests, autotune, gemm, fp8 (its own module), prefill, offload,
serve (its own module) (:data:`RUNNERS`)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from .common import (
    BENCHMARKS,
    CUDA_TESTS,
    GEMM_SLACK,
    PREFILL_TOKENS,
    ROOT,
    SMOKE_TESTS,
    TOKENS,
    TRACE,
    Section,
    _now,
    _versions,
)
from .fp8 import run_fp8
from .serve import run_serve
from .targets import _gemm_where
from .trace import copy_overlap


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

    from moe_compile import verify

    gg, shapes, tokens, device, dtype = _gemm_setup(s)
    dtype_name = str(dtype).removeprefix("torch.")
    tolerance = verify.tolerance(dtype) * GEMM_SLACK.get(dtype_name, 1.0)
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
        if not r["rel_err"] < tolerance:
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
    "fp8": run_fp8,
    "prefill": run_prefill,
    "offload": run_offload,
    "serve": run_serve,
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
