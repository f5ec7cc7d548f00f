"""Peak host memory (RSS) of ``moe-compile score``: one process vs AEP on W = 2 and W = 4 gloo ranks.

Writes a 16-layer Qwen3-MoE checkpoint with random fp32 weights (``--experts-mib`` of experts,
about 600 MiB by default) and a request file, then runs, one after the other in one run:

- ``1 proc, from_pretrained``: ``moe-compile score`` with the model loaded as before this
  loader, ``AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`` (the reference "today");
- ``1 proc``: ``moe-compile score`` (``moe_compile.loading.load_model``: the whole checkpoint);
- ``AEP W=2``, ``AEP W=4``: ``torchrun --nproc-per-node W ... moe-compile score --parallel aep``
  (every rank reads only its 1/W of the experts).

Every process runs the CLI through this file's ``--rank-run`` wrapper, which samples its own
``/proc/self/status`` every 5 ms (VmRSS, RssAnon, RssFile) in a thread and writes per process:
RSS after imports, peak RSS while loading (and the file-backed pages at that sample: memory-mapped
safetensors pages count in RSS), the tensor bytes the load kept, and the peak RSS of the whole run.
The ideal per rank is ``after imports + dense + experts/W + ring``, the ring being the gathered
experts of ``depth + 1 = 2`` layers (``2/L`` of the experts). The scores of every run are compared
with the single process's (max abs difference of the log-probs).

    python benchmarks/load_memory.py              # about 10 minutes on 2 cores
    python benchmarks/load_memory.py --smoke      # 4 layers, 40 MiB of experts: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak VmRSS (and its RssAnon / RssFile at that sample) since :meth:`mark`."""

    def __init__(self, period_s: float = 0.005):
        super().__init__(daemon=True)
        self.period_s, self.peak, self.lock = period_s, {"VmRSS": 0}, threading.Lock()

    def mark(self) -> dict[str, int]:
        with self.lock:
            peak, self.peak = self.peak, {"VmRSS": 0}
        return peak

    def run(self) -> None:
        while True:
            s = _status()
            with self.lock:
                if s["VmRSS"] > self.peak["VmRSS"]:
                    self.peak = s
            time.sleep(self.period_s)


def rank_run(out_dir: str, loader: str, argv: list[str]) -> int:
    """Run ``moe-compile argv`` in this process, recording its memory (the ``--rank-run`` mode)."""
    import torch  # noqa: F401 -- the imports a run pays before loading
    import transformers  # noqa: F401

    import moe_compile.loading as loading
    from moe_compile.cli import main

    sampler = Sampler()
    sampler.start()
    after_imports = _status()["VmRSS"]
    sampler.mark()
    record: dict = {"after_imports": after_imports, "rank": int(os.environ.get("RANK", "0"))}
    real = loading.load_model

    def measured(path, **kwargs):
        sampler.mark()
        if loader == "from_pretrained":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            dense = sum(p.nbytes for n, p in model.named_parameters() if ".experts." not in n)
            experts = sum(p.nbytes for n, p in model.named_parameters() if ".experts." in n)
        else:
            model = real(path, **kwargs)
            dense, experts = model.moe_compile_load.dense_bytes, model.moe_compile_load.expert_bytes
        peak = sampler.mark()
        record.update(load_peak=peak["VmRSS"], load_peak_file=peak.get("RssFile", 0),
                      after_load=_status()["VmRSS"], dense_bytes=dense, expert_bytes=experts)  # fmt: skip
        return model

    loading.load_model = measured
    try:
        code = main(argv)
    finally:
        record["run_peak"] = max(record.get("load_peak", 0), sampler.mark()["VmRSS"], _status()["VmRSS"])
        import resource

        record["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(out_dir, f"rank{record['rank']}.json").write_text(json.dumps(record))
    return code


def write_checkpoint(path: Path, layers: int, experts_mib: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    E, H, I = 32, 512, 0  # noqa: E741
    I = max(16, int(experts_mib * MIB / (layers * E * 3 * H * 4)) // 16 * 16)  # noqa: E741
    config = Qwen3MoeConfig(
        vocab_size=2048, hidden_size=H, intermediate_size=4 * H, moe_intermediate_size=I, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=E, num_experts_per_tok=4,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(path)  # per-expert tensors, as Qwen3-MoE ships
    experts = sum(p.nbytes for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.nbytes for n, p in model.named_parameters() if ".experts." not in n)
    return {"layers": layers, "E": E, "H": H, "I": I, "expert_bytes": experts, "dense_bytes": dense}


def run(label: str, world: int, model: Path, requests: Path, work: Path, loader: str = "load_model") -> dict:
    out_dir = work / label.replace(" ", "_").replace(",", "")
    out_dir.mkdir()
    output = out_dir / "scores.jsonl"
    cli = ["score", "--model", str(model), "--input", str(requests), "--output", str(output), "--quiet",
           "--token-budget", "256", "--chunk", "16", "--dist-timeout", "600"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [os.path.abspath(__file__), "--rank-run", str(out_dir), "--loader", loader, "--"]
    if world == 1:
        cmd = [sys.executable, *me, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *me,
               *cli, "--parallel", "aep"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    scores = {r["id"]: r["logprobs"] for r in map(json.loads, output.read_text().splitlines()) if "id" in r}
    return {"label": label, "world": world, "ranks": ranks, "scores": scores, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts-mib", type=float, default=600)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="4 layers, 40 MiB of experts, W=2 only")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.experts_mib, args.requests = 4, 40, 8
    import random

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = write_checkpoint(work / "model", args.layers, args.experts_mib)
        rng = random.Random(0)
        lines = [
            json.dumps(
                {
                    "id": f"r{i}",
                    "tokens": [rng.randrange(2048) for _ in range(rng.randrange(16, 120))],
                    "labels": [rng.randrange(2048) for _ in range(2)],
                }
            )  # fmt: skip
            for i in range(args.requests)
        ]
        (work / "requests.jsonl").write_text("\n".join(lines) + "\n")
        runs = [
            run("1 proc, from_pretrained", 1, work / "model", work / "requests.jsonl", work, loader="from_pretrained"),
            run("1 proc", 1, work / "model", work / "requests.jsonl", work),
        ]
        for world in (2,) if args.smoke else (2, 4):
            runs.append(run(f"AEP W={world}", world, work / "model", work / "requests.jsonl", work))
    report(shape, runs, args)


def _max_abs_diff(a, b) -> float:
    if isinstance(a, list):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b) if a is not None and b is not None else 0.0


def report(shape: dict, runs: list[dict], args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "runs": runs}, default=str))
    experts, L = shape["expert_bytes"], shape["layers"]
    print(f"checkpoint: Qwen3-MoE, {L} layers, E={shape['E']}, hidden {shape['H']}, expert intermediate "
          f"{shape['I']}, fp32: {experts / MIB:.0f} MiB of experts, {shape['dense_bytes'] / MIB:.0f} MiB dense; "
          f"{args.requests} requests")  # fmt: skip
    single = next(r for r in runs if r["label"] == "1 proc")
    base_peak = single["ranks"][0]["run_peak"]
    print()
    print(
        "| run | rank | after imports | load peak (file pages) | kept by the load | run peak | ideal | "
        "saving vs 1 proc (share of experts) | max abs diff of log-probs vs 1 proc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        diff = max((_max_abs_diff(r["scores"][k], single["scores"][k]) for k in single["scores"]), default=0.0)
        for rank in r["ranks"]:
            W = r["world"]
            ring = 0 if W == 1 else experts * 2 / L
            ideal = rank["after_imports"] + rank["dense_bytes"] + experts / W + ring
            saving = base_peak - rank["run_peak"]
            print(
                f"| {r['label']} | {rank['rank']} | {rank['after_imports'] / MIB:.0f} | "
                f"{rank['load_peak'] / MIB:.0f} ({rank['load_peak_file'] / MIB:.0f}) | "
                f"{(rank['dense_bytes'] + rank['expert_bytes']) / MIB:.0f} | {rank['run_peak'] / MIB:.0f} | "
                f"{ideal / MIB:.0f} | {saving / MIB:+.0f} MiB ({saving / experts:+.0%}) | {diff:.1e} |"
            )
    print("\nMiB; ideal = after imports + dense + experts/W + ring (2 of L layers' experts gathered at once, W > 1)")
    print("load peak vs kept: the load's peak RSS above 'after imports', over the tensor bytes it keeps")
    for r in runs:
        for rank in r["ranks"][:1]:
            kept = rank["dense_bytes"] + rank["expert_bytes"]
            rise = rank["load_peak"] - rank["after_imports"]
            print(f"  {r['label']}: rank 0 rises {rise / MIB:.0f} MiB for {kept / MIB:.0f} MiB kept "
                  f"({rise / kept:.2f}x), {rank['load_peak_file'] / MIB:.0f} MiB of it file-backed pages")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-run":
        out, loader_flag, loader, sep, *rest = sys.argv[2:]
        assert loader_flag == "--loader" and sep == "--", sys.argv
        raise SystemExit(rank_run(out, loader, rest))
    main()
