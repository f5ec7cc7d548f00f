"""Cold start of ``moe-compile serve``: launch to ready, first launch and second launch, side by side.

Each configuration serves the shipped tiny MoE (``moe_compile/assets/tiny_moe``: Qwen3-MoE, 10
layers, 8 experts, float32 on the CPU) on a free loopback port, polls ``GET /ready`` every 0.2 s
until it answers 200, records the seconds from launch to that answer, and stops the server with
SIGTERM (all of its processes: torchrun's workers too). Each configuration is launched twice with
the same fresh ``TORCHINDUCTOR_CACHE_DIR`` (empty on the first launch): the second launch is what
a restart costs. Configurations:

- ``1 rank``: ``moe-compile serve`` with its defaults (``--inductor auto``: on the CPU the
  compiled graphs run eagerly, nothing goes through Inductor, so nothing is cached);
- ``1 rank, inductor``: ``--inductor on`` (Inductor's FX graph cache and AOTAutograd's cache
  serve the second launch: the moe_prefill passes have a stable identity, moe_compile/inductor_cache.py);
- ``2 AEP ranks``: ``torchrun --nproc-per-node 2 -m moe_compile.cli serve --parallel aep`` (gloo;
  ``parallel`` graphs are never cached, see docs/benchmarks.md "Cold start");
- ``2 AEP ranks, inductor`` (``aep-inductor``): the same with ``--inductor on``.

``--trace-once`` also measures, in this process, what one compile of the engine's decoder costs with
and without Dynamo's ``specialize_float`` (the engine's default since this benchmark; without it
AOTAutograd restarts each frame's analysis to make the model's float attributes constants, so each
graph is traced twice): a fresh engine on the tiny model, one batch of three prompts, compiled from
scratch (``torch._dynamo.reset()``), alternating the two ``--repeat`` times; minimum of each.

Printed per launch: launch-to-ready seconds, the warm-up's own seconds and its compile counts (the
server's "warm-up done" line: graphs compiled, cache hits, misses and bypasses), the load average
at launch; per configuration the ratio second / first. Every process gets ``OMP_NUM_THREADS=1``.

    python benchmarks/cold_start.py                      # the three configurations (10-20 min on 2 loaded cores)
    python benchmarks/cold_start.py --configs 1rank-inductor --json out.json
    python benchmarks/cold_start.py --configs --trace-once         # only the in-process compile comparison
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "moe_compile" / "assets" / "tiny_moe"
CONFIGS = {
    "1rank": ("1 rank", 1, []),
    "1rank-inductor": ("1 rank, inductor", 1, ["--inductor", "on"]),
    "aep": ("2 AEP ranks", 2, ["--parallel", "aep"]),
    "aep-inductor": ("2 AEP ranks, inductor", 2, ["--parallel", "aep", "--inductor", "on"]),
}
WARM_LINE = re.compile(r"warm-up done in ([\d.]+) s: ready \((.*)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def launch(ranks: int, extra: list[str], cache_dir: Path, log: Path, timeout: float) -> dict:
    """One launch: seconds from the process start to ``/ready`` answering 200, then SIGTERM."""
    port = free_port()
    serve = ["serve", "--model", str(MODEL), "--port", str(port), *extra]
    if ranks == 1:
        argv = [sys.executable, "-m", "moe_compile.cli", *serve]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        argv = [str(torchrun), "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "moe_compile.cli", *serve]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    load = os.getloadavg()
    with open(log, "wb") as out:
        start = time.perf_counter()
        # its own session: SIGTERM reaches torchrun and its workers, and only them
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while not ready(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} before ready; see {log}")
                if time.perf_counter() - start > timeout:
                    raise RuntimeError(f"not ready after {timeout:.0f} s; see {log}")
                time.sleep(0.2)
            seconds = time.perf_counter() - start
        finally:
            stop(proc)
    match = WARM_LINE.search(log.read_text(errors="replace"))
    return {
        "ready_s": seconds,
        "warmup_s": float(match.group(1)) if match else None,
        "compiles": match.group(2) if match else "?",
        "load": [round(x, 2) for x in load],
    }


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def trace_once(repeat: int) -> dict:
    """Seconds of one decoder compile (first call) with and without ``specialize_float``, alternated."""
    import torch
    from torch._dynamo.utils import counters

    from moe_compile.loading import load_model
    from moe_compile.serving import PrefillEngine, Request

    torch.set_num_threads(1)
    model = load_model(str(MODEL), device=torch.device("cpu"), dtype=None)
    requests = [Request(id=i, tokens=tuple(range(3, 23 + 5 * i)), labels=(5, 6)) for i in range(3)]
    times: dict[str, list[float]] = {"traced twice (before)": [], "traced once (specialize_float)": []}
    traces: dict[str, int] = {}
    for _ in range(repeat):
        for name in times:
            torch._dynamo.reset()
            counters.clear()
            with torch.no_grad():
                engine = PrefillEngine(model, prefix_cache_tokens=0)
            if name.startswith("traced twice"):
                engine._decoder = engine._decoder.compiled  # the compiled decoder without the patch
            start = time.perf_counter()
            engine.score(requests)
            times[name].append(time.perf_counter() - start)
            traces[name] = counters["aot_autograd"]["total"]
            print(f"  {name:<32} {times[name][-1]:6.1f} s  (AOTAutograd traces: {traces[name]}; load "
                  f"{[round(x, 2) for x in os.getloadavg()]})", flush=True)  # fmt: skip
    return {name: {"min_s": min(t), "aot_traces": traces[name]} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", choices=tuple(CONFIGS), default=["1rank", "1rank-inductor", "aep"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a launch may take to get ready")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the cache directories and logs (printed)")
    parser.add_argument(
        "--trace-once",
        action="store_true",
        help="also time one decoder compile with and without specialize_float (in this process)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="--trace-once: compiles of each kind (default 2)")
    args = parser.parse_args()

    once = None
    if args.trace_once:
        print("one compile of the engine's decoder (tiny model, a batch of 3 prompts):", flush=True)
        once = trace_once(args.repeat)
    results = []
    with tempfile.TemporaryDirectory(prefix="cold_start_") as tmp:
        work = Path(tempfile.mkdtemp(prefix="cold_start_")) if args.keep else Path(tmp)
        for name in args.configs:
            label, ranks, extra = CONFIGS[name]
            cache_dir = work / f"{name}-inductor-cache"  # fresh per configuration, shared by its two launches
            row = {"config": label}
            for which in ("first", "second"):
                got = launch(ranks, extra, cache_dir, work / f"{name}-{which}.log", args.timeout)
                row[which] = got
                print(f"{label:<24} {which:<6} ready in {got['ready_s']:7.1f} s  (warm-up {got['warmup_s']} s; "
                      f"{got['compiles']}; load {got['load']})", flush=True)  # fmt: skip
            row["ratio"] = row["second"]["ready_s"] / row["first"]["ready_s"]
            results.append(row)
        if args.keep:
            print(f"logs and caches kept in {work}")

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}")  # fmt: skip
    import torch

    print(f"torch {torch.__version__}; date {datetime.date.today().isoformat()}; load average now {os.getloadavg()}")
    print()
    print(f"{'configuration':<24} {'first launch':>13} {'second launch':>14} {'second/first':>13}")
    for row in results:
        print(f"{row['config']:<24} {row['first']['ready_s']:>11.1f} s {row['second']['ready_s']:>12.1f} s "
              f"{row['ratio']:>13.2f}")  # fmt: skip
    if once is not None:
        before, after = once.values()
        print(f"\none decoder compile: {before['min_s']:.1f} s traced twice, {after['min_s']:.1f} s traced once "
              f"(specialize_float): {after['min_s'] / before['min_s']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"launches": results, "trace_once": once}, indent=2))


if __name__ == "__main__":
    main()
