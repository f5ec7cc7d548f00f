"""Prefill scoring throughput: PrefillEngine vs a loop of plain Hugging Face eager forwards.

Workload: ``--requests`` label-scoring requests of ``--tokens`` tokens each (log-probs of
two label tokens at the last position). A fraction of every prompt (0%, 50%, 90%) is a
prefix shared with the other prompts of its family (``--families`` families, Zipf
popularity: ``moe_compile.serving.workload``); the rest is a random suffix.

Columns, measured side by side on one model in one run:

- ``HF loop``: ``model(input_ids).logits[0, -1]`` per request, then ``log_softmax``;
- ``engine eager``: ``PrefillEngine(compile=False)``: batching, prefix cache, reading
  only the needed logits, no compile;
- ``engine``: ``PrefillEngine()`` (compiled with ``moe_prefill``, ``inductor=False`` on CPU).

A second table compares routing policies over W data-parallel ranks on a synthetic
workload (1000 prompts, 8 prefix families of 64-512 tokens with Zipf popularity, suffixes
of 8-256 tokens, log-uniform): computed FLOPs (all ranks) and the makespan model
(max per-rank FLOPs at equal throughput), both relative to prefix-aware routing; costs
from this model's :class:`~moe_compile.serving.FlopsModel`.

Every engine starts with an empty prefix cache; its compile is warmed up beforehand on
prompts that share nothing with the measured ones. A time is the median of ``--repeats``
runs (the engine gets a fresh cache each run). Scores are checked against the HF loop.

The model is a small random-weight Qwen3-MoE (hidden 256, 4 layers, 16 experts, top-2,
4 heads of 64, vocab 4096) in fp32, small enough for a CPU.

A third table (``--ranks 2``, gloo on 127.0.0.1, spawned processes) serves the same kind of
workload from rank 0 over 2 ranks three ways, one after the other in one run, on copies of
one model: ``replicas`` (every rank holds the full model; ``score_routed``), ``aep`` (every
rank holds 1/W of the experts and gathers the rest ahead of use, lockstep behind rank 0:
:mod:`moe_compile.serving.aep`) and ``ep`` (``parallel="ep"``: experts sharded, tokens moved
by AllToAll, the same lockstep), at 0/50/90% shared prefixes: requests/s and tokens/s on
rank 0 (calls of ``--chunk`` requests, after a warm-up that compiles every batch kind, each
level starting with empty prefix caches), the ratio to ``replicas``, expert bytes held per
rank (full tensors plus shards), the prefix cache hit rate, and per rank the requests
scored, tokens computed and padding batches run (prefix-aware routing). Every mode's scores
are compared with the others' and with the HF loop. ``--smoke`` runs it on a 2-layer model
and 8 short requests (a few minutes at most, mostly compiles); ``--json`` writes the results.

    python benchmarks/serving.py [--threads 1] [--requests 64] [--tokens 256]
    python benchmarks/serving.py --ranks 2 --requests 48 --tokens 96 [--json out.json]
    python benchmarks/serving.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
import transformers

import moe_compile
from moe_compile.serving import FlopsModel, PrefillEngine, Request, simulate
from moe_compile.serving.workload import synthetic_prompts
from moe_compile.verify import rel_err

SMALL_QWEN3_MOE = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
LABELS = (5, 9)


def hf_loop(model, prompts: list[list[int]]) -> torch.Tensor:
    """Label log-probs ``[n, 2]`` from one plain eager forward per prompt."""
    out = []
    for prompt in prompts:
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()  # [V]
        out.append(torch.log_softmax(logits, dim=-1)[list(LABELS)])
    return torch.stack(out)


def engine_run(engine: PrefillEngine, prompts: list[list[int]]) -> tuple[torch.Tensor, float]:
    """Label log-probs ``[n, 2]`` from ``engine`` with an empty prefix cache, and its prefix-cache hit rate."""
    engine.reset()  # empty prefix cache, same (compiled) decoder
    scores = engine.score([Request(id=i, tokens=tuple(p), labels=LABELS) for i, p in enumerate(prompts)])
    return torch.cat([s.value for s in scores]), engine.stats.hit_rate


def median_time(repeats: int, fn, *args):
    """Median wall time of ``fn(*args)`` over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--families", type=int, default=4, help="distinct shared prefixes")
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=0, help="W > 1: only the replicas / aep / ep table on W ranks")
    parser.add_argument("--chunk", type=int, default=16, help="requests per call (--ranks)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    parser.add_argument("--block-size", type=int, default=16, help="prefix cache block (--ranks)")
    parser.add_argument("--dist-timeout", type=float, default=600, help="gloo collective timeout, s (--ranks)")
    parser.add_argument("--json", default=None, help="also write the --ranks results here")
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: --ranks 2 on a tiny workload")
    args = parser.parse_args()
    if args.smoke:
        args.ranks = args.ranks if args.ranks > 1 else 2
        args.requests, args.tokens, args.families, args.chunk, args.layers, args.block_size = 8, 32, 2, 4, 2, 8
    torch.set_num_threads(args.threads)
    if args.ranks > 1:
        ranks_table(args)
        return

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**{**SMALL_QWEN3_MOE, "num_hidden_layers": args.layers})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    compiled = PrefillEngine(model, token_budget=args.token_budget)
    eager = PrefillEngine(model, token_budget=args.token_budget, compile=False)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, moe_compile {moe_compile.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")  # fmt: skip
    print(f"{args.requests} requests x {args.tokens} tokens, {args.families} prefix families, "
          f"token budget {args.token_budget}, median of {args.repeats}\n")  # fmt: skip
    with torch.no_grad():
        half = (args.tokens // 2,) * 2
        warm = synthetic_prompts(
            args.requests // 2, config.vocab_size, families=2, prefix_len=half, suffix_len=half, seed=99
        )
        compiled.score([Request(id=i, tokens=tuple(p), labels=LABELS) for i, p in enumerate(warm)])  # compile
        warm_solo = [Request(id="solo", tokens=tuple(warm[0][: args.tokens - 1]), labels=LABELS)]
        compiled.score(warm_solo)  # a batch of one compiles its own graph
        rows = []
        for shared in (0.0, 0.5, 0.9):
            prefix = round(shared * args.tokens)
            prompts = synthetic_prompts(args.requests, config.vocab_size, families=args.families,
                                        prefix_len=(prefix, prefix), suffix_len=(args.tokens - prefix,) * 2,
                                        seed=1)  # fmt: skip
            t_hf, reference = median_time(args.repeats, hf_loop, model, prompts)
            t_eager, (eager_scores, hit) = median_time(args.repeats, engine_run, eager, prompts)
            t_comp, (comp_scores, _) = median_time(args.repeats, engine_run, compiled, prompts)
            err = max(rel_err(s, reference) for s in (eager_scores, comp_scores))
            rows.append((shared, hit, t_hf, t_eager, t_comp, err))
    n, tokens = args.requests, args.requests * args.tokens
    print("| shared prefix | cache hit | HF loop req/s | engine eager req/s | engine req/s | engine tok/s "
          "| engine / HF | max rel err |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shared, hit, t_hf, t_eager, t_comp, err in rows:
        print(f"| {shared:.0%} | {hit:.0%} | {n / t_hf:.1f} | {n / t_eager:.1f} | {n / t_comp:.1f} "
              f"| {tokens / t_comp:.0f} | {t_hf / t_comp:.2f}x | {err:.1e} |")  # fmt: skip

    routing_table(FlopsModel.from_model(model), config.vocab_size)


def routing_table(flops: FlopsModel, vocab_size: int) -> None:
    """Computed FLOPs and makespan of the routing policies, relative to prefix-aware routing."""
    prompts = synthetic_prompts(1000, vocab_size, families=8, prefix_len=(64, 512), suffix_len=(8, 256), seed=0)
    print("\n| ranks | policy | computed TFLOP | vs prefix_flops | makespan TFLOP | vs prefix_flops | cached tokens |")
    print("|---:|:---|---:|---:|---:|---:|---:|")
    for world_size in (2, 4, 8):
        results = {p: simulate(prompts, flops, world_size, p) for p in ("prefix_flops", "round_robin", "tokens")}
        ours = results["prefix_flops"]
        for policy, r in results.items():
            cached = sum(r.cached_tokens) / sum(r.tokens)
            print(f"| {world_size} | {policy} | {r.computed_flops / 1e12:.3f} "
                  f"| {r.computed_flops / ours.computed_flops:.2f}x | {r.makespan() / 1e12:.3f} "
                  f"| {r.makespan() / ours.makespan():.2f}x | {cached:.0%} |")  # fmt: skip


def ranks_table(args) -> dict:
    """replicas vs aep vs ep on ``args.ranks`` gloo ranks (see the module docstring); prints it, returns it."""
    import datetime
    import json
    import os

    import torch.distributed as dist
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # the rendezvous store is hosted here (as torchrun's agent does), on a port the kernel picks
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [ctx.Process(target=_rank_entry, args=(r, args, store.port, queue)) for r in range(args.ranks)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        while len(results) < args.ranks:
            try:
                rank, value = queue.get(timeout=5.0)
            except Exception:  # noqa: BLE001  (queue.Empty: check that nobody died without reporting)
                dead = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode is not None and r not in results}
                if dead:
                    raise SystemExit(f"ranks exited without a result (rank: exit code): {dead}") from None
                continue
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        del store
    failed = {r: v for r, v in results.items() if isinstance(v, str)}
    if failed:
        raise SystemExit("ranks failed:\n" + "\n".join(f"rank {r}:\n{v}" for r, v in sorted(failed.items())))
    W, rows, ref = args.ranks, results[0]["rows"], results[0]["reference"]
    for row in rows:  # every rank's engine counters over this row's calls
        row["engines"] = [results[r]["engines"][row["mode"]][row["level"]] for r in range(W)]
        row["expert_bytes"] = [results[r]["bytes"][row["mode"]] for r in range(W)]
    agreement = []
    for level, shared in enumerate(SHARED):
        scores = {row["mode"]: torch.tensor(row["scores"]) for row in rows if row["level"] == level}
        expected = torch.tensor(ref[level])
        entry = {"shared": shared, "vs_hf": {m: rel_err(s, expected) for m, s in scores.items()}}
        entry["between_modes"] = {f"{a} vs {b}": rel_err(scores[a], scores[b]) for a, b in
                                  (("aep", "replicas"), ("ep", "replicas"), ("aep", "ep"))}  # fmt: skip
        agreement.append(entry)

    model = results[0]["model"]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, moe_compile {moe_compile.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"{W} gloo ranks on 127.0.0.1 (spawned processes), {args.threads} thread(s) per rank; {model}")
    print(f"{args.requests} requests x {args.tokens} tokens, {args.families} prefix families, calls of {args.chunk} "
          f"requests, token budget {args.token_budget}, block {args.block_size}; rank 0's wall time per level, "
          f"after warm-up (compile)\n")  # fmt: skip
    print("| shared prefix | mode | req/s | tok/s | vs replicas | expert MiB per rank | prefix hit "
          "| requests per rank | tokens computed per rank | padding batches per rank "
          "| max rel err vs HF |")  # fmt: skip
    print("|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {row["level"]: row["rps"] for row in rows if row["mode"] == "replicas"}
    for row in rows:
        mib = " / ".join(f"{b / 2**20:.2f}" for b in row["expert_bytes"])
        engines = row["engines"]
        print(f"| {row['shared']:.0%} | {row['mode']} | {row['rps']:.1f} | {row['tps']:.0f} "
              f"| {row['rps'] / base[row['level']]:.2f}x | {mib} | {row['hit']:.0%} "
              f"| {' / '.join(map(str, row['requests']))} "
              f"| {' / '.join(str(e['computed_tokens']) for e in engines)} "
              f"| {' / '.join(str(e['padding_batches']) for e in engines)} "
              f"| {agreement[row['level']]['vs_hf'][row['mode']]:.1e} |")  # fmt: skip
    print("\n| shared prefix | " + " | ".join(agreement[0]["between_modes"]) + " |")
    print("|---:|" + "---:|" * len(agreement[0]["between_modes"]))
    for entry in agreement:
        print(f"| {entry['shared']:.0%} | " + " | ".join(f"{v:.1e}" for v in entry["between_modes"].values()) + " |")
    full = sum(rows[0]["expert_bytes"]) / W  # replicas: every rank holds every expert
    for mode in ("aep", "ep"):
        held = max(next(r["expert_bytes"] for r in rows if r["mode"] == mode))
        rps = [r["rps"] / base[r["level"]] for r in rows if r["mode"] == mode]
        print(
            f"\n{mode}: {held / full:.2f}x the expert bytes per rank of replicas; req/s "
            f"{' / '.join(f'{x:.2f}x' for x in rps)} of replicas at {' / '.join(f'{s:.0%}' for s in SHARED)} shared"
        )
    print(f"\nwhole run (spawn, build, compile, warm-up, measure, reference): {time.perf_counter() - started:.0f} s")
    out = {"args": vars(args), "model": model, "rows": rows, "agreement": agreement,
           "wall_s": time.perf_counter() - started}  # fmt: skip
    for row in rows:
        row.pop("scores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda o: dataclasses.asdict(o))
    return out


SHARED = (0.0, 0.5, 0.9)
MODES = ("replicas", "aep", "ep")


def _rank_entry(rank: int, args, port: int, queue) -> None:
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.ranks))
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True")  # the store at MASTER_PORT is the parent's: join it
    torch.set_num_threads(args.threads)
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
        queue.put((rank, _rank_run(rank, args)))
    except BaseException:  # noqa: BLE001  (reported by the parent)
        queue.put((rank, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        if dist.is_initialized():
            dist.destroy_process_group()


def _expert_bytes(model) -> int:
    """Bytes of expert weights this rank holds: full tensors not released, plus the shards built from them."""
    from moe_compile.runtime import shards

    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            total += p.untyped_storage().nbytes()  # 0 once a parallel compile released it
            total += sum(t.untyped_storage().nbytes() for t in shards._SHARDS.get(p, {}).values())
    return total


def _rank_run(rank: int, args) -> dict:
    import copy

    import torch.distributed as dist

    from moe_compile.serving import Router
    from moe_compile.serving.aep import LockstepScorer
    from moe_compile.serving.distributed import score_routed

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**{**SMALL_QWEN3_MOE, "num_hidden_layers": args.layers})
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    flops = FlopsModel.from_model(reference)
    levels = []
    for shared in SHARED:
        prefix = round(shared * args.tokens)
        prompts = synthetic_prompts(args.requests, config.vocab_size, families=args.families,
                                    prefix_len=(prefix, prefix), suffix_len=(args.tokens - prefix,) * 2,
                                    seed=1)  # fmt: skip
        levels.append([Request(id=i, tokens=tuple(p), labels=LABELS) for i, p in enumerate(prompts)])
    rows, held, engines = [], {}, {}
    for mode in MODES:
        torch._dynamo.reset()
        model = copy.deepcopy(reference)  # same weights on every rank and in every mode
        options = {"inductor": False} if mode == "replicas" else {"parallel": mode, "inductor": False}
        engine = PrefillEngine(model, token_budget=args.token_budget, block_size=args.block_size, options=options)
        router = Router(args.ranks, flops, block_size=args.block_size)
        snapshots: list = []  # the engine's counters at each reset: one entry per measured level
        lockstep = None
        if mode != "replicas":
            lockstep = LockstepScorer(engine, router)
            real_step = lockstep._run_step

            def run_step(message, real_step=real_step, engine=engine, snapshots=snapshots):
                if message[0] == "reset":
                    snapshots.append(dataclasses.replace(engine.stats))
                return real_step(message)

            lockstep._run_step = run_step
            if rank != 0:
                lockstep.serve_worker()  # until rank 0 stops: warm-up, then a reset and the calls per level
                snapshots.append(dataclasses.replace(engine.stats))
                held[mode], engines[mode] = _expert_bytes(model), snapshots[1:]
                continue
            lockstep.start()
            lockstep.warmup()  # compiles every batch kind on every rank together
        else:
            engine.warmup()
            dist.barrier()
        held[mode] = _expert_bytes(model)
        for level, requests in enumerate(levels):
            if lockstep is not None:
                lockstep.reset()  # every rank: empty prefix cache, zero counters; a fresh router
            else:
                snapshots.append(dataclasses.replace(engine.stats))
                engine.reset()
                router = Router(args.ranks, flops, block_size=args.block_size)
                dist.barrier()
            start = time.perf_counter()
            scores = []
            for lo in range(0, len(requests), args.chunk):
                chunk = requests[lo : lo + args.chunk]
                scores += lockstep.score(chunk) if lockstep is not None else score_routed(engine, chunk, router)
            wall = time.perf_counter() - start
            if rank != 0:
                continue
            errors = [s.error for s in scores if s.error is not None]
            if errors:
                raise RuntimeError(f"{mode}: {len(errors)} requests failed, e.g. {errors[0]}")
            ranks = [s.rank for s in scores]
            rows.append({
                "level": level, "shared": SHARED[level], "mode": mode, "wall_s": wall,
                "rps": len(scores) / wall, "tps": sum(s.tokens for s in scores) / wall,
                "hit": sum(s.cached_tokens for s in scores) / sum(s.tokens for s in scores),
                "requests": [ranks.count(r) for r in range(args.ranks)],
                "tokens": [sum(s.tokens for s in scores if s.rank == r) for r in range(args.ranks)],
                "scores": torch.cat([s.value for s in scores]).tolist(),
            })  # fmt: skip
        if lockstep is not None:
            lockstep.stop()
        else:
            dist.barrier()
        snapshots.append(dataclasses.replace(engine.stats))
        engines[mode] = snapshots[1:]
    out = {"bytes": held, "engines": {m: [dataclasses.asdict(s) for s in v] for m, v in engines.items()}}
    if rank == 0:
        with torch.no_grad():
            out["reference"] = [hf_loop(reference, [list(r.tokens) for r in reqs]).tolist() for reqs in levels]
        experts = f"{config.num_experts} experts top-{config.num_experts_per_tok}"
        out["model"] = (f"random-weight Qwen3-MoE, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                        f"{experts}, vocab {config.vocab_size}, fp32")  # fmt: skip
        out["rows"] = rows
    return out


if __name__ == "__main__":
    main()
