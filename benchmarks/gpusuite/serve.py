"""The ``serve`` section (issue #21): ``moe-compile score`` on a checkpoint written to disk, against HF eager.

A Qwen3-30B-A3B-shaped checkpoint with random bf16 weights (as many layers as fit in half the free GPU memory, at
most :data:`MAX_LAYERS`; on ``--cpu-smoke`` the tiny zoo Qwen3-MoE, 2 layers, float32) is written with
``save_pretrained``; ``moe-compile score --device cuda`` (``cpu`` on the smoke, ``--no-compile`` there: the
prefill section covers the CPU compile) scores a JSON-lines file of label requests in a subprocess, as a user
would run it; the same requests then run through a plain HF eager forward of the same checkpoint, one at a time.
Recorded: exactness (the largest |log-prob difference| over every request and label), requests/s and tokens/s
(the tool's own summary: scoring time, model load excluded), and the seconds from launching the tool to its first
answer on disk (interpreter start, imports, load, compile, the first chunk of :data:`CHUNK` requests).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import ROOT, Section

MAX_LAYERS = 4
#: requests per written chunk (``--chunk``): the first answer lands after this many
CHUNK = 8
#: (requests, shortest, longest prompt) of the GPU run and of the smoke
GPU_REQUESTS, SMOKE_REQUESTS = (256, 256, 2048), (16, 12, 60)
LABELS = [5, 6]
#: the summary line of ``moe-compile score`` (serving/cli.py::_summary)
SUMMARY = r"scored (\d+) requests \((\d+) with errors\) in ([\d.]+) s: ([\d.]+) requests/s, (\d+) tokens/s"
#: bf16 scores differ from an eager bf16 forward by the dtype's rounding (docs/serving.md, "Which dtype")
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5}


def _layers(config) -> tuple[int, str]:
    import torch

    H, E, I, V = config.hidden_size, config.num_experts, config.moe_intermediate_size, config.vocab_size
    d = config.head_dim
    per_layer = 2 * (3 * E * H * I + H * d * (config.num_attention_heads * 2 + 2 * config.num_key_value_heads) + E * H)
    fixed = 2 * 2 * V * H  # embedding and LM head, bf16
    free, _ = torch.cuda.mem_get_info()
    reserve = 16 * 2**30  # activations, the compile's workspaces
    fit = int((free / 2 - fixed - reserve) // per_layer)
    return max(1, min(MAX_LAYERS, fit)), f"min({MAX_LAYERS}, {fit} fit in half of {free / 2**30:.0f} GiB free)"


def _write_checkpoint(path: Path, smoke: bool) -> dict:
    import prefill as pf
    import torch
    import transformers

    from moe_compile.testing import zoo

    torch.manual_seed(0)
    if smoke:
        model = zoo.build("qwen3_moe", num_layers=2)
        info = {"model": "tiny zoo qwen3_moe", "layers": 2, "layers_why": "cpu-smoke", "dtype": "float32"}
    else:
        layers, why = _layers(transformers.Qwen3MoeConfig(num_hidden_layers=1, **pf.QWEN3_30B_A3B))
        config = transformers.Qwen3MoeConfig(num_hidden_layers=layers, **pf.QWEN3_30B_A3B)
        with torch.device("cuda"):
            model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
        info = {"model": "Qwen3-30B-A3B shapes", "layers": layers, "layers_why": why, "dtype": "bfloat16"}
    model.save_pretrained(path)
    info["vocab"] = model.config.vocab_size
    del model
    if not smoke:
        torch.cuda.empty_cache()
    return info


def _requests(path: Path, vocab: int, smoke: bool) -> list[dict]:
    n, low, high = SMOKE_REQUESTS if smoke else GPU_REQUESTS
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(low // 2)]  # half of them share a prefix, as real traffic does
    requests = []
    for i in range(n):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randrange(low, high + 1))]
        requests.append({"id": f"r{i}", "tokens": (shared + tail)[:high] if i % 2 else tail, "labels": LABELS})
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return requests


def _score(s: Section, model_dir: Path, inputs: Path, output: Path, smoke: bool) -> dict:
    """Run ``moe-compile score`` in a subprocess; its figures and the seconds to the first answer on disk."""
    cmd = [sys.executable, "-m", "moe_compile.cli", "score", "--model", str(model_dir), "--input", str(inputs),
           "--output", str(output), "--chunk", str(CHUNK), "--quiet", "--device", "cpu" if smoke else "cuda",
           "--dtype", "float32" if smoke else "bfloat16"]  # fmt: skip
    if smoke:
        cmd.append("--no-compile")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    with tempfile.TemporaryFile("w+") as log:
        pump = threading.Thread(target=lambda: log.writelines(proc.stdout), daemon=True)
        pump.start()
        while proc.poll() is None:
            if first is None and output.exists() and output.stat().st_size > 0:
                first = time.time() - start
            if s.remaining() < 5:
                proc.kill()
                break
            time.sleep(0.05)
        proc.wait()
        pump.join(10)
        log.seek(0)
        text = log.read()
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"moe-compile score exited {proc.returncode} after {wall:.0f} s: {text[-3000:]}")
    m = re.search(SUMMARY, text)
    if m is None:
        raise RuntimeError(f"moe-compile score printed no summary: {text[-3000:]}")
    if first is None:
        first = wall
    return {"command": " ".join(cmd[1:]), "scored": int(m[1]), "errors": int(m[2]), "score_s": float(m[3]),
            "requests_per_s": float(m[4]), "tokens_per_s": float(m[5]), "first_answer_s": first,
            "wall_s": wall, "log_tail": text[-1500:]}  # fmt: skip


def _eager_max_diff(model_dir: Path, requests: list[dict], output: Path, smoke: bool) -> tuple[float, int]:
    """The largest |log-prob difference| of the tool's answers vs HF eager, request by request; and the count."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if smoke else torch.bfloat16
    device = "cpu" if smoke else "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    answers = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    worst, compared = 0.0, 0
    with torch.no_grad():
        for r in requests:
            got = answers.get(r["id"])
            if got is None or "logprobs" not in got:
                raise RuntimeError(f"request {r['id']}: no scores in the output ({got})")
            ids = torch.tensor([r["tokens"]], device=device)
            logits = model(input_ids=ids).logits[0, -1].float()  # [V]
            expected = torch.log_softmax(logits, dim=-1)[LABELS].cpu()  # [L]
            worst = max(worst, (torch.tensor(got["logprobs"][0]) - expected).abs().max().item())
            compared += 1
    del model
    if not smoke:
        torch.cuda.empty_cache()
    return worst, compared


def run_serve(s: Section) -> None:
    smoke = s.opts.cpu_smoke
    with tempfile.TemporaryDirectory(prefix="moe-serve-") as tmp:
        tmp = Path(tmp)
        model_dir, inputs, output = tmp / "checkpoint", tmp / "requests.jsonl", tmp / "scores.jsonl"
        start = time.time()
        info = _write_checkpoint(model_dir, smoke)
        s.result.update(info, write_s=time.time() - start, device="cpu" if smoke else "cuda")
        requests = _requests(inputs, info["vocab"], smoke)
        s.result.update(requests=len(requests), prompt_tokens=sum(len(r["tokens"]) for r in requests), chunk=CHUNK)
        s.save()
        run = _score(s, model_dir, inputs, output, smoke)
        s.result.update(run)
        print(f"serve: {run['scored']} requests, {run['requests_per_s']:.1f} requests/s, {run['tokens_per_s']:.0f} "
              f"tokens/s, first answer after {run['first_answer_s']:.1f} s", flush=True)  # fmt: skip
        s.save()
        if s.remaining() < 10:
            s.notes.append("out of budget: the answers were not compared with HF eager")
            s.save("partial")
            return
        worst, compared = _eager_max_diff(model_dir, requests, output, smoke)
        tolerance = TOLERANCE[info["dtype"]]
        s.result.update(max_abs_logprob_diff=worst, compared=compared, tolerance=tolerance, exact=worst <= tolerance)
        print(f"serve: max |log-prob diff| vs HF eager {worst:.2e} over {compared} requests", flush=True)
    if run["errors"] or not s.result["exact"]:
        s.save("failed", error=f"{run['errors']} request(s) answered with errors; max |log-prob diff| {worst:.2e} "
               f"(tolerance {tolerance:g})")  # fmt: skip
        return
    s.save("ok")
