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
- ``2 AEP ranks, inductor`` (``--aep-inductor``): the same with ``--inductor on``.

Printed per launch: launch-to-ready seconds, the warm-up's own seconds and its compile counts (the
server's "warm-up done" line: graphs compiled, cache hits, misses and bypasses), the load average
at launch; per configuration the ratio second / first. Every process gets ``OMP_NUM_THREADS=1``.

    python benchmarks/cold_start.py                      # the three configurations (10-20 min on 2 loaded cores)
    python benchmarks/cold_start.py --configs 1rank-inductor --json out.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["1rank", "1rank-inductor", "aep"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a launch may take to get ready")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the cache directories and logs (printed)")
    args = parser.parse_args()

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
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
