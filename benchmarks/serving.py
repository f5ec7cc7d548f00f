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

    python benchmarks/serving.py [--threads 1] [--requests 64] [--tokens 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

import moe_compile
from moe_compile.serving import FlopsModel, PrefillEngine, Request, simulate
from moe_compile.serving.workload import synthetic_prompts

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SMALL_QWEN3_MOE)
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
            err = max(
                ((s - reference).norm() / reference.norm()).item() for s in (eager_scores, comp_scores)
            )  # fmt: skip
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


if __name__ == "__main__":
    main()
