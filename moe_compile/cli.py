"""The ``moe-compile`` command line.

``moe-compile inspect --config PATH_OR_DIR`` builds the model of a checkpoint
directory or config file with random weights (on the meta device when it is
large), compiles it with ``moe_prefill`` and prints the report.

``moe-compile plan --config PATH_OR_DIR --gpus W --gpu h100 --link nvlink
--tokens-per-gpu N --dtype bf16`` predicts, per MoE layer, whether AEP's expert
gather hides behind compute, and the throughput of TP, EP and AEP
(:mod:`moe_compile.planner`); ``--hot-experts R`` shows AEP's smaller gather with ``R``
resident experts per layer.

``moe-compile coverage`` checks every mixture-of-experts family of the installed
transformers (tiny random configs, fp32, compiled vs eager) and prints one row a family:
exact, skipped with the reason, missed, or not built with the reason
(:mod:`moe_compile.testing.coverage`); it exits 1 when a family is neither exact nor a
known gap.

``moe-compile routing-stats --model DIR --out FILE`` counts, per MoE layer, how often
each expert is picked on sample text (the routing statistics ``hot_experts`` needs,
:mod:`moe_compile.routing_stats`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: above this many parameters `inspect` traces on the meta device (no memory, no verification)
META_THRESHOLD = 500_000_000


def _load_config(path: str):
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"moe-compile: no such config file or directory: {path}")
    if p.is_dir() and not (p / "config.json").exists():
        raise SystemExit(f"moe-compile: {path} has no config.json")
    return AutoConfig.from_pretrained(str(p))


def _build(config, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    if device == "auto":
        n = sum(p.numel() for p in meta_model.parameters())
        device = "meta" if n > META_THRESHOLD else "cpu"
    if device == "meta":
        return meta_model.eval()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import moe_compile

    config = _load_config(args.config)
    text = config.get_text_config()
    layers = getattr(text, "num_hidden_layers", None)
    if args.layers is not None and layers is not None and args.layers > layers:
        args.parser.error(f"argument --layers: the model has {layers} decoder layers; use 1..{layers}")
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and args.seq > positions:
        args.parser.error(
            f"argument --seq: {args.seq} tokens, but the model takes at most {positions} "
            f"(max_position_embeddings); use 1..{positions}"
        )
    if args.layers is not None:
        config.num_hidden_layers = args.layers
        for key in ("layer_types", "mlp_layer_types"):
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[: args.layers])
    model = moe_compile.prepare(_build(config, args.device))
    device = next(model.parameters()).device
    input_ids = torch.randint(0, config.vocab_size, (1, args.seq), device=device)
    # no KV cache: prefill only, and a cache would allocate real tensors on the meta device
    report = moe_compile.explain(model, input_ids, use_cache=False, options={"inductor": False})
    print(report)
    if device.type == "meta":
        print("note: built on the meta device (no weights): block shapes and kinds are exact, "
              "but the rewrites were not verified on probe inputs")  # fmt: skip
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from . import planner

    shape = planner.model_shape(_load_config(args.config))
    _check_sharding(args, shape)
    setting = planner.Setting(
        gpus=args.gpus,
        gpu=args.gpu,
        link=args.link,
        tokens_per_gpu=args.tokens_per_gpu,
        dtype=args.dtype,
        seq_len=args.seq_len,
        mfu=args.mfu,
        ep_imbalance=args.ep_imbalance,
        hot_experts=args.hot_experts,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    print(planner.format_plan(planner.plan(shape, setting)))
    return 0


def _check_sharding(args: argparse.Namespace, shape) -> None:
    """argparse errors for a --gpus / --hot-experts the compile would refuse: the gathered experts must shard evenly."""
    W, R = args.gpus, args.hot_experts
    for E in sorted({layer.experts for layer in shape.layers if layer.moe}):
        if R >= E or (E - R) % W == 0:
            continue
        if R == 0:
            valid = [str(w) for w in range(1, E + 1) if E % w == 0]
            args.parser.error(
                f"argument --gpus: {W} GPUs do not divide the {E} experts of a MoE layer (AEP and EP shard each "
                f"layer's experts over the GPUs); use --gpus {', '.join(valid[:-1])} or {valid[-1]}"
                if len(valid) > 1
                else f"argument --gpus: a MoE layer has {E} expert; use --gpus 1"
            )
        valid = [str(r) for r in range(E + 1) if (E - r) % W == 0]
        shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
        args.parser.error(
            f"argument --hot-experts: E - R = {E - R} experts do not divide over {W} GPUs (E = {E}; the compile "
            f"would refuse it); valid R with {W} GPUs: {shown}"
        )


def cmd_routing_stats(args: argparse.Namespace) -> int:
    import torch

    from .predictor.cli import chunks_or_exit
    from .predictor.tiny_moe import load_model
    from .routing_stats import collect_routing_stats

    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise SystemExit(f"moe-compile: cannot load the model at {args.model}: {err}") from err
    chunks = chunks_or_exit(args.texts, "train", args.max_tokens, args.seq_len)  # [B, S] byte tokens
    try:
        stats = collect_routing_stats(model, chunks.split(args.batch_size))
    except ValueError as err:
        raise SystemExit(f"moe-compile: {args.model}: {err}") from err
    stats.save(args.out)
    print(f"wrote {args.out}: {len(stats.blocks)} MoE block(s), {stats.samples['tokens']} tokens")
    for block in stats.blocks:
        counts = stats.counts[block]
        share = stats.hot_share(block, args.show_hot)
        print(f"  {block}: E={len(counts)}, top {args.show_hot} experts {list(stats.hot(block, args.show_hot))} "
              f"take {share:.1%} of the routed slots")  # fmt: skip
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from .testing import coverage

    if args.list:
        for name, cls in sorted(coverage.moe_families().items()):
            print(f"{name}  {cls}")
        return 0
    if args.from_json:
        rows = coverage.read_json(args.from_json)
    else:

        def progress(row):
            if args.json:  # one JSON line per finished family, so that an interrupted run keeps its rows
                import dataclasses
                import json

                with open(args.json + ".partial", "a") as f:
                    f.write(json.dumps(dataclasses.asdict(row)) + "\n")
            if args.verbose:
                print(f"  {row.family}: {row.status} ({row.seconds:.0f} s)", file=sys.stderr, flush=True)

        rows = coverage.run_coverage(args.families or None, workers=args.workers, timeout=args.timeout,
                                     progress=progress)  # fmt: skip
    if args.json:
        coverage.write_json(rows, args.json)
    print(coverage.format_table(rows, markdown=args.markdown))
    print()
    print(coverage.summary(rows))
    if args.update_docs:
        for path in coverage.update_docs(rows):
            print(f"updated {path}")
    problems = coverage.check_rows(rows) if not args.families else [
        p for p in coverage.check_rows(rows) if p.split(":")[0] in args.families]  # fmt: skip
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    from .serving.cli import at_least

    parser = argparse.ArgumentParser(prog="moe-compile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the MoE blocks the backend finds in a checkpoint or config")
    p.add_argument("--config", required=True, help="checkpoint directory or config.json")
    p.add_argument("--layers", type=at_least(int, 1), default=None, help="keep only the first N decoder layers")
    p.add_argument("--seq", type=at_least(int, 1), default=8,
                   help="tokens in the random input (default 8; at most the model's positions)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "meta"), default="auto",
                   help="where to build the random-weight model (auto: meta when large)")  # fmt: skip
    p.set_defaults(func=cmd_inspect, parser=p)
    p = sub.add_parser("plan", help="predict whether AEP's expert gathers hide, and TP/EP/AEP throughput")
    p.add_argument("--config", required=True, help="checkpoint directory or config.json")
    p.add_argument("--gpus", type=_positive(int), required=True, help="GPUs (ranks) W")
    p.add_argument("--gpu", choices=("h100", "h200"), required=True)
    p.add_argument("--link", choices=("nvlink", "pcie"), required=True)
    p.add_argument("--tokens-per-gpu", type=_positive(int), required=True, help="prefill tokens per GPU per step")
    p.add_argument("--dtype", choices=("bf16", "fp8"), required=True, help="weights and compute")
    p.add_argument("--seq-len", type=_positive(int), default=2048, help="tokens per request (attention context)")
    p.add_argument("--mfu", type=_positive(float), default=0.4, help="model FLOPs utilisation of the compute")
    p.add_argument("--ep-imbalance", type=_positive(float), default=1.25,
                   help="EP: the busiest rank's expert work over the mean")  # fmt: skip
    p.add_argument("--prefix-cache-tokens", type=at_least(int, 0), default=65536,
                   help="the serving prefix cache per GPU, counted in memory (default 65536, serving's)")  # fmt: skip
    p.add_argument("--hot-experts", type=at_least(int, 0), default=0, metavar="R",
                   help="AEP: R experts per layer resident on every GPU, only the rest gathered")  # fmt: skip
    p.set_defaults(func=cmd_plan, parser=p)
    p = sub.add_parser("routing-stats", help="count how often each expert is picked, for hot_experts")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="routing statistics file to write (safetensors)")
    p.add_argument("--texts", nargs="+", default=None, metavar="PATH",
                   help="text files or directories, read as bytes (default: the Python standard library)")  # fmt: skip
    p.add_argument("--max-tokens", type=_positive(int), default=16384, help="tokens to run (default 16384)")
    p.add_argument("--seq-len", type=_positive(int), default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=_positive(int), default=16, help="sequences per forward (default 16)")
    p.add_argument("--show-hot", type=_positive(int), default=2, metavar="R", help="hot experts to print")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch CPU threads (default 1)")
    p.set_defaults(func=cmd_routing_stats)
    p = sub.add_parser("coverage", help="every MoE family of the installed transformers: found, exact, or why not")
    p.add_argument("families", nargs="*", help="model types to check (default: every MoE family)")
    p.add_argument("--workers", type=_positive(int), default=2, help="processes (default 2)")
    p.add_argument("--timeout", type=_positive(float), default=300.0, help="seconds per family (default 300)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--from-json", metavar="PATH", help="print (and check) the rows of an earlier --json run")
    p.add_argument("--update-docs", action="store_true",
                   help="write the summary into README.md and the table into docs/coverage.md")  # fmt: skip
    p.add_argument("--list", action="store_true", help="only list the MoE families found in the registry")
    p.add_argument("-v", "--verbose", action="store_true", help="print each family as it finishes")
    p.set_defaults(func=cmd_coverage)
    from .predictor.cli import add_subcommands as add_predictor_subcommands

    add_predictor_subcommands(sub)
    from .serving.cli import add_subcommands as add_serving_subcommands

    add_serving_subcommands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
