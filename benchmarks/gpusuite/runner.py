"""The parent: plan the sections within the budget, run each in a child process, write ``results.json``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import BENCHMARKS, GPU_CAPS, NEEDED, ROOT, SECTIONS, SMOKE_CAPS, _now, _versions, section_file
from .sections import child
from .summary import render_summary
from .targets import evaluate_fp8_targets, evaluate_targets


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
        str(BENCHMARKS / "gpu_suite.py"),
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
    parser.add_argument("--budget-s", type=float, default=None, help="wall budget of all sections (530; smoke 160)")
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
    budget = opts.budget_s if opts.budget_s is not None else (160.0 if smoke else 530.0)
    scale = budget / sum(caps.values())
    plan = [s for s in SECTIONS if s != "autotune" and (opts.sections is None or s in opts.sections)]
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
    targets += evaluate_fp8_targets(sections.get("fp8", {}).get("result", {}).get("rows", []), smoke)
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
