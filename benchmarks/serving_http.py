"""``moe-compile serve`` on loopback under 1, 8 and 64 concurrent clients vs the same calls one at a time.

Two models, each served by its own ``moe-compile serve`` process on 127.0.0.1 (float32,
compiled with ``moe_prefill`` and warmed up before timing):

- ``tiny``: the shipped tiny MoE (``moe_compile/assets/tiny_moe``);
- ``mid``: a random-weight Qwen3-MoE (hidden 256, 4 layers, 16 experts, top-2, vocab 4096), saved
  to a temporary directory.

Workload: ``--calls`` calls of ``POST /score``, each one label-scoring request (the shape of
online rerank traffic: many small calls); every prompt is ``--prefix`` tokens shared with its
family (4 families) plus ``--suffix`` tokens of its own. Each level runs on prompts no earlier
level has seen (fresh suffixes), so every level meets the same prefix-cache state: the four
family prefixes cached, nothing else.

Levels, one after the other against the same server:

- ``one at a time``: one client, each call sent after the previous answer (what the server did
  before the batching queue, whatever the number of clients);
- ``C clients`` for C in 1, 8, 64: C threads take calls from a shared list until it is empty.

Reported per level: requests/s, p50 and p99 latency (call sent to answer read), the ratio to
the one-at-a-time level, lost calls (no 200 answer) and duplicated answers (an id answered
twice). Afterwards every level's prompts are scored again one at a time and compared: the
maximum relative error of the label log-probabilities (they must agree in float32).

    OMP_NUM_THREADS=1 python benchmarks/serving_http.py [--calls 256] [--json out.json]
    python benchmarks/serving_http.py --smoke    # tiny model only, 32 calls, 1 and 8 clients
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID_QWEN3_MOE = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
LABELS = [5, 9]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``moe-compile serve`` process on 127.0.0.1; ready once ``/ready`` answers 200."""

    def __init__(self, model_dir: str, extra: list[str], log: Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "moe_compile.cli", "serve", "--model", model_dir, "--port", str(self.port),
                "--max-concurrent-requests", "1024", *extra]  # fmt: skip
        self.log = open(log, "wb")  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 900
        while True:
            try:
                if get(self.port, "/ready")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not get ready; see {log}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    conn.request("POST", "/score", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def prompts(rng: random.Random, families: list[list[int]], n: int, suffix: int, vocab: int) -> list[list[int]]:
    return [families[i % len(families)] + [rng.randrange(3, vocab) for _ in range(suffix)] for i in range(n)]


def run_level(port: int, level: str, calls: list[list[int]], clients: int) -> dict:
    """Send every call (one request each) with ``clients`` threads (0: one at a time); timings and answers."""
    todo = list(enumerate(calls))
    lock = threading.Lock()
    answers: dict[int, list] = {}
    latencies: list[float] = []
    lost = [0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i, tokens = todo.pop(0)
                start = time.perf_counter()
                try:
                    status, body = post(conn, {"requests": [{"id": f"{level}-{i}", "tokens": tokens,
                                                             "labels": LABELS}]})  # fmt: skip
                except OSError:
                    status, body = 0, {}
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                    if status != 200:
                        lost[0] += 1
                        continue
                    for record in body["scores"]:
                        answers.setdefault(int(record["id"].rsplit("-", 1)[1]), []).append(record["logprobs"])
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(max(1, clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    missing = sum(1 for i in range(len(calls)) if i not in answers)
    return {"level": level, "clients": clients, "calls": len(calls), "rps": len(calls) / wall, "wall_s": wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "lost": missing, "non_200": lost[0],
            "duplicated": sum(len(v) - 1 for v in answers.values()),
            "answers": {i: v[0] for i, v in answers.items()}}  # fmt: skip


def rel_err(a: list, b: list) -> float:
    num = sum((x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)) ** 0.5
    den = sum(y**2 for rb in b for y in rb) ** 0.5
    return num / den if den else num


def bench_model(name: str, model_dir: str, vocab: int, args, log_dir: Path) -> list[dict]:
    rng = random.Random(0)
    families = [[rng.randrange(3, vocab) for _ in range(args.prefix)] for _ in range(4)]
    levels = [("one at a time", 0)] + [(f"{c} clients", c) for c in args.clients]
    sets = [prompts(rng, families, args.calls, args.suffix, vocab) for _ in levels]
    extra = ["--no-compile"] if args.no_compile else []
    server = Server(model_dir, extra, log_dir / f"{name}.log")
    rows = []
    try:
        run_level(server.port, "prime", [f + [3] for f in families], 0)  # the four prefixes cached
        for (level, clients), calls in zip(levels, sets, strict=True):
            rows.append(run_level(server.port, level, calls, clients))
            print(f"  {name}: {level}: {rows[-1]['rps']:.1f} req/s", file=sys.stderr)
        for row, calls in zip(rows, sets, strict=True):  # exactness: the same prompts again, one at a time
            check = run_level(server.port, "check", calls, 0)
            row["max_rel_err"] = max(rel_err(row["answers"][i], check["answers"][i]) for i in row["answers"])
    finally:
        server.stop()
    base = rows[0]["rps"]
    for row in rows:
        row["model"] = name
        row["speedup"] = row["rps"] / base
        del row["answers"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=256, help="calls per level (default 256)")
    p.add_argument("--prefix", type=int, default=48, help="shared prefix tokens per prompt (default 48)")
    p.add_argument("--suffix", type=int, default=16, help="own tokens per prompt (default 16)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid"))
    p.add_argument("--no-compile", action="store_true", help="serve eagerly (no moe_prefill compile)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 32 calls, 1 and 8 clients")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    if args.smoke:
        args.calls, args.clients, args.models = 32, [1, 8], ["tiny"]
    from moe_compile.predictor import TINY_MOE_DIR

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            if name == "tiny":
                model_dir, vocab = str(TINY_MOE_DIR), 256
            else:
                import torch
                from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

                torch.manual_seed(0)
                model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MID_QWEN3_MOE)).eval()
                model_dir, vocab = str(tmp / "mid"), MID_QWEN3_MOE["vocab_size"]
                model.save_pretrained(model_dir)
            rows += bench_model(name, model_dir, vocab, args, tmp)
    import torch
    import transformers

    import moe_compile

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, moe_compile {moe_compile.__version__}")  # fmt: skip
    print(f"calls per level: {args.calls} (1 request each, {args.prefix} shared + {args.suffix} own tokens)")
    print()
    print("| model | level | req/s | vs one at a time | p50 ms | p99 ms | lost | duplicated | max rel err |")
    print("|:---|:---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['level']} | {r['rps']:.1f} | {r['speedup']:.2f}x | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['lost']} | {r['duplicated']} | {r['max_rel_err']:.1e} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
