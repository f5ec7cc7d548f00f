"""Accuracy of pre-attention expert predictors vs the baselines, per layer, on held-out text.

Trains (or loads, with ``--predictor``) the pre-attention predictors and the cross-layer baseline of a
model on the standard library's train files, then prints, on its held-out files:

- the per-layer table of ``moe-compile eval-predictor`` (exact match of the top-k set, recall) for
  the pre-attention predictor, the cross-layer predictor, the layer's router on the pre-attention
  activation and the hot-experts (frequency) baseline;
- why the pre-attention predictor misses what it misses: per layer, the size of attention's update
  relative to the residual stream it is added to (the router sees both, the predictor only the
  latter), and a ceiling for the first layer: its pre-attention activation is the token embedding,
  so no predictor beats the best map from token id to top-k set; fitted on the evaluation tokens
  themselves, that map's exact match bounds any pre-attention predictor's on that layer (only when
  the first MoE layer is decoder layer 0: after a dense first layer its input carries context);
- offload mode (``offload="cpu"``): per prompt length, the expert bytes copied ahead and on demand per
  prefill, and the prefill time, for the pre-attention predictor, no predictor (all on demand) and all
  experts resident (no offload), compiled side by side. On a CPU the "device" is the CPU: the copies
  and counts are real, the times only indicative (no transfer to hide);
- AEP with a predictor (``parallel="aep"``, ``--aep-ranks W``): ``W`` gloo ranks on this machine, each
  with its own held-out prompt per length; per prefill, the expert bytes gathered into a rank ahead
  (the union over ranks of the predicted experts), on demand and as padding, against plain AEP (every
  expert of every layer), and the prefill time (the slowest rank; loopback gloo: indicative only).

::

    python benchmarks/predictor.py                       # shipped tiny MoE, default sizes (~2 min on CPU)
    python benchmarks/predictor.py --predictor p.safetensors --eval-tokens 65536
    python benchmarks/predictor.py --predictor p.safetensors --offload-only --lengths 16 128 1024
    python benchmarks/predictor.py --predictor p.safetensors --aep-only --aep-ranks 2 --lengths 1 4 16 128
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_compile.backend import collect_reports
from moe_compile.predictor import (
    TINY_MOE_DIR,
    TrainConfig,
    collect_routing,
    evaluate,
    format_table,
    load_bundle,
    load_model,
    mean_accuracy,
    moe_layers,
    save_bundle,
    text_chunks,
    train_predictors,
)
from moe_compile.predictor.cli import DEFAULT_EVAL_TOKENS, DEFAULT_TRAIN_TOKENS

OFFLOAD_MODES = {
    "pre-attention predictor": lambda path: {"offload": "cpu", "predictor": str(path)},
    "no predictor (on demand)": lambda path: {"offload": "cpu"},
    "all experts resident": lambda path: {},
}


@torch.no_grad()
def attention_update_ratio(model: torch.nn.Module, chunks: torch.Tensor) -> dict[int, float]:
    """Per MoE layer, mean over tokens of ``|attention output| / |residual entering the layer|`` on ``chunks``."""
    residual: dict[int, torch.Tensor] = {}  # layer -> [B, S]
    attention: dict[int, torch.Tensor] = {}  # layer -> [B, S]

    def on_layer(index: int):
        def hook(module, args, kwargs):
            residual[index] = (args[0] if args else kwargs["hidden_states"]).norm(dim=-1)

        return hook

    def on_attention(index: int):
        def hook(module, args, output):
            attention[index] = output[0].norm(dim=-1)

        return hook

    handles = []
    for moe in moe_layers(model):
        handles.append(moe.layer.register_forward_pre_hook(on_layer(moe.index), with_kwargs=True))
        handles.append(moe.layer.self_attn.register_forward_hook(on_attention(moe.index)))
    try:
        model(input_ids=chunks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (attention[layer] / residual[layer]).mean().item() for layer in residual}


def first_layer_ceiling(model: torch.nn.Module, chunks: torch.Tensor) -> float:
    """Exact match of the best token-id -> top-k-set map for the first MoE layer, fitted on ``chunks`` ``[B, S]``."""
    data = collect_routing(model, chunks, progress=False)
    layer = data.layers[0]
    sets = torch.zeros(data.num_tokens, data.num_experts, dtype=torch.bool).scatter(1, data.topk[layer], True)  # [N, E]
    codes = (sets.long() << torch.arange(data.num_experts)).sum(-1)  # [N]: the set as a bitmask
    tokens = chunks.reshape(-1)  # [N]
    pairs = tokens * (1 << data.num_experts) + codes  # [N]: (token, set) as one integer
    counts = torch.bincount(pairs, minlength=int(tokens.max() + 1) << data.num_experts)
    best_per_token = counts.view(-1, 1 << data.num_experts).max(-1).values  # [V]
    return best_per_token.sum().item() / data.num_tokens


def _timed_prefills(compiled, prompt: torch.Tensor, repeats: int, distributed: bool = False):
    """Compile and warm up, zero the offload counts, then time ``repeats`` prefills: (report, seconds each).

    ``distributed``: the ranks start each prefill together and it lasts until the slowest rank ends.
    """
    with collect_reports() as report:
        compiled(prompt)  # compile and warm up
    for store in report.offload:
        store.reset_stats()
    times = []
    for _ in range(repeats):
        if distributed:
            dist.barrier()
        started = time.perf_counter()
        compiled(prompt)
        elapsed = torch.tensor([time.perf_counter() - started])
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends with the slowest rank
        times.append(elapsed.item())
    return report, times


@torch.no_grad()
def offload_table(model: torch.nn.Module, predictor: Path, lengths: list[int], repeats: int) -> str:
    """Per prompt length and mode: MiB copied ahead (used) / on demand per prefill, share ahead, median prefill ms."""
    lines = [f"{'tokens':>6}  {'mode':<26}{'ahead MiB (used)':>18}{'on demand MiB':>15}{'ahead':>7}{'prefill ms':>12}"]
    for length in lengths:
        prompt = text_chunks(None, "heldout", length, length)  # [1, length]
        for mode, options in OFFLOAD_MODES.items():
            torch._dynamo.reset()
            # a copy: offload releases the compiled model's expert tensors (the resident mode needs them)
            compiled = torch.compile(
                copy.deepcopy(model), backend="moe_prefill", options={"inductor": False, **options(predictor)}
            )
            report, times = _timed_prefills(compiled, prompt, repeats)
            stats = [s for store in report.offload for s in store.stats()]
            ahead, used, demand, needed = (
                sum(getattr(s, f) for s in stats) / repeats / 2**20
                for f in ("bytes_ahead", "bytes_ahead_used", "bytes_on_demand", "bytes_needed")
            )
            share = f"{used / needed:.0%}" if needed else "-"
            moved = f"{ahead:.2f} ({used:.2f})" if stats else "-"
            on_demand = f"{demand:.2f}" if stats else "-"
            ms = statistics.median(times) * 1e3
            lines.append(f"{length:>6}  {mode:<26}{moved:>18}{on_demand:>15}{share:>7}{ms:>12.1f}")
    return "\n".join(lines)


AEP_MODES = {
    "aep + pre-attention predictor": lambda path: {"parallel": "aep", "predictor": str(path)},
    "aep, all experts": lambda path: {"parallel": "aep"},
}


def aep_table(model_dir: str, predictor: Path, lengths: list[int], repeats: int, ranks: int) -> str:
    """Per prompt length and mode, on ``ranks`` gloo ranks: KiB gathered into rank 0 per prefill, and the time."""
    with tempfile.TemporaryDirectory() as out:
        port = 29500 + os.getpid() % 1000
        mp.start_processes(
            _aep_rank,
            (ranks, port, model_dir, str(predictor), lengths, repeats, out),
            nprocs=ranks,
            start_method="spawn",
        )
        with open(Path(out) / "rank0.json") as f:
            rows = json.load(f)
    header = f"{'tokens/rank':>11}  {'mode':<30}{'ahead KiB (used)':>18}{'on demand':>11}{'padding':>9}{'total':>8}"
    lines = [header + f"{'prefill ms':>12}"]
    for r in rows:
        if r["all"] is None:
            moved = f"{r['ahead'] / 1024:.0f} ({r['used'] / 1024:.0f})"
            demand, padding = f"{r['on_demand'] / 1024:.0f}", f"{r['padding'] / 1024:.0f}"
            total = r["ahead"] + r["on_demand"] + r["padding"]
        else:
            moved, demand, padding, total = "-", "-", "-", r["all"]
        lines.append(
            f"{r['length']:>11}  {r['mode']:<30}{moved:>18}{demand:>11}{padding:>9}{total / 1024:>8.0f}{r['ms']:>12.1f}"
        )
    return "\n".join(lines)


@torch.no_grad()
def _aep_rank(rank, ranks, port, model_dir, predictor, lengths, repeats, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rows = []
    try:
        for length in lengths:
            prompt = text_chunks(None, "heldout", length, length * ranks)[rank : rank + 1]  # [1, length], this rank's
            for mode, make_options in AEP_MODES.items():
                torch._dynamo.reset()
                model = load_model(model_dir)  # a fresh copy: AEP releases the full expert weights it compiled
                options = {"inductor": False, **make_options(predictor)}
                compiled = torch.compile(model, backend="moe_prefill", options=options)
                report, times = _timed_prefills(compiled, prompt, repeats, distributed=True)
                stats = [s for store in report.offload for s in store.stats()]
                sums = {f: sum(getattr(s, f) for s in stats) / repeats for f in
                        ("bytes_ahead", "bytes_ahead_used", "bytes_on_demand", "bytes_padding")}  # fmt: skip
                every = sum(b.schedule["gather_bytes"] for b in report.blocks if b.schedule) if not stats else None
                rows.append({"length": length, "mode": mode, "ms": statistics.median(times) * 1e3, "all": every,
                             "ahead": sums["bytes_ahead"], "used": sums["bytes_ahead_used"],
                             "on_demand": sums["bytes_on_demand"], "padding": sums["bytes_padding"]})  # fmt: skip
        if rank == 0:
            with open(Path(out) / "rank0.json", "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TINY_MOE_DIR))
    parser.add_argument("--predictor", default=None, help="predictor file to evaluate (default: train one now)")
    parser.add_argument("--train-tokens", type=int, default=DEFAULT_TRAIN_TOKENS)
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--offload-only", action="store_true", help="skip the accuracy table (needs --predictor)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 1024], help="offload: prompt lengths")
    parser.add_argument("--repeats", type=int, default=5, help="offload: timed prefills per mode (median)")
    parser.add_argument("--aep-ranks", type=int, default=0, help="AEP with the predictor on this many gloo ranks")
    parser.add_argument("--aep-only", action="store_true", help="only the AEP table (needs --predictor, --aep-ranks)")
    args = parser.parse_args()
    if (args.offload_only or args.aep_only) and not args.predictor:
        parser.error("--offload-only and --aep-only need --predictor")
    if args.aep_only and not args.aep_ranks:
        parser.error("--aep-only needs --aep-ranks")

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s); torch {torch.__version__}; Python {platform.python_version()}")  # fmt: skip
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.predictor) if args.predictor else Path(tmp) / "predictors.safetensors"
        if args.predictor:
            print(f"predictors: {args.predictor}")
        else:
            started = time.perf_counter()
            train = text_chunks(None, "train", 128, args.train_tokens)
            bundle = train_predictors(model, train, TrainConfig(epochs=args.epochs))
            print(f"trained on {train.numel()} tokens, {args.epochs} epochs, in {time.perf_counter() - started:.0f} s")
            save_bundle(bundle, path)  # the file round trip is part of what is measured
        if not (args.offload_only or args.aep_only):
            accuracy(model, load_bundle(path, model), args.eval_tokens)
        if not args.aep_only:
            print(f"offload='cpu', one prompt per length, median of {args.repeats} prefills (first call excluded):")
            print(offload_table(model, path, args.lengths, args.repeats))
        if args.aep_ranks:
            print(f"parallel='aep' on {args.aep_ranks} gloo ranks (one thread each), one prompt per rank and "
                  f"length, KiB gathered into rank 0 per prefill, median of {args.repeats} prefills "
                  "(slowest rank):")  # fmt: skip
            print(aep_table(args.model, path, args.lengths, args.repeats, args.aep_ranks))
    return 0


def accuracy(model: torch.nn.Module, bundle, eval_tokens: int) -> None:
    """The accuracy table and the diagnostics, on ``eval_tokens`` held-out tokens."""
    heldout = text_chunks(None, "heldout", 128, eval_tokens)  # [B, S]
    table = evaluate(model, bundle, heldout)
    print(format_table(table))
    ours, cross = mean_accuracy(table, "pre-attention"), mean_accuracy(table, "cross-layer")
    later = sorted(table["pre-attention"])[1:]
    ours_later = mean_accuracy(table, "pre-attention", later)
    gain = ours_later.exact - cross.exact
    print(f"pre-attention mean exact match {ours.exact:.1%} (target 90%); on the layers cross-layer covers: "
          f"{ours_later.exact:.1%} vs cross-layer {cross.exact:.1%} ({gain:+.1%})")  # fmt: skip
    ratios = attention_update_ratio(model, heldout[:16])
    print("|attention update| / |residual| per layer: " + ", ".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    first = moe_layers(model)[0].index
    if first != 0:  # its input has been through attention and dense layers: no token-id ceiling
        print(f"first MoE layer is decoder layer {first} (dense before it): no token-id ceiling")
        return
    ceiling = first_layer_ceiling(model, heldout)
    print(f"first MoE layer ceiling (best map from token id to top-k set, fitted on the evaluation tokens): "
          f"{ceiling:.1%} exact")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
