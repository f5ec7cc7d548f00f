"""``moe-compile score`` and ``moe-compile serve``: batch scoring of a JSON-lines file, and an HTTP endpoint.

::

    moe-compile score --model DIR --input requests.jsonl --output scores.jsonl
    moe-compile serve --model DIR --port 8000

``score`` writes one line per request (in chunks, each made durable before the next),
shows a progress bar and ends with a summary: requests/s, tokens/s, prefix-cache hit rate,
and per-rank load. Malformed input lines are reported on stderr with their line numbers
and skipped (the exit status is then 1). Rerunning with the same output resumes: ids
already in it are not scored again. The output is checked and locked before the model
loads: never the input, only a scores file of this tool, one run at a time
(:class:`~moe_compile.serving.jsonl.ScoresOutput`). The model runs on ``--device`` (auto:
``cuda:LOCAL_RANK`` where CUDA is, else the CPU) in ``--dtype`` (on CUDA the checkpoint's own by
default; on the CPU float32, where scores do not depend on batching), loaded by
:func:`moe_compile.loading.load_model`. Launched by ``torchrun --nproc-per-node W``, every
process is one data-parallel rank (NCCL on CUDA, gloo on the CPU): requests are routed by
prefix and true FLOPs, and rank 0 writes the output; with ``--parallel aep`` each rank reads
only its 1/W of the experts from the checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from .sizing import DEFAULT_PREFIX_CACHE_TOKENS, DEFAULT_TOKEN_BUDGET, GPU_MEMORY_UTILIZATION

#: requests per chunk: scored, then written, before the next chunk is read
CHUNK = 256


#: --inductor choices -> the backend's ``inductor`` option
INDUCTOR = {"auto": "auto", "on": True, "off": False}

#: --dtype choices; the default, float32, gives scores that do not depend on batching (docs/serving.md)
DTYPES = ("float32", "bfloat16", "float16", "auto")


def at_least(kind: type, low: float, high: float | None = None):
    """An argparse ``type``: ``kind(text)`` within ``[low, high]``, else argparse's error naming the range."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if math.isnan(value) or value < low or (high is not None and value > high):  # NaN too
            shown = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {noun} {shown}, got {text}")
        return value

    return parse


def or_auto(parse):
    """An argparse ``type``: ``"auto"``, else ``parse(text)`` (its error naming both)."""

    def parse_or_auto(text: str):
        if text == "auto":
            return "auto"
        try:
            return parse(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or auto)") from None

    return parse_or_auto


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score`` and ``serve`` to the ``moe-compile`` parser's subcommands."""
    p = subparsers.add_parser("score", help="score a JSON-lines file of prefill requests")
    _engine_args(p)
    p.add_argument("--input", required=True, help="requests, one JSON object per line")
    p.add_argument("--output", required=True,
                   help="scores, one JSON object per line (appended to: resumes; never the input)")  # fmt: skip
    p.add_argument("--chunk", type=at_least(int, 1), default=CHUNK,
                   help=f"requests scored per write (default {CHUNK})")  # fmt: skip
    p.add_argument("--policy", default="prefix_flops", choices=("prefix_flops", "round_robin", "tokens"),
                   help="routing over ranks (default prefix_flops)")  # fmt: skip
    p.add_argument("--slack", type=at_least(float, 0), default=0.25,
                   help="routing: tolerated load excess of the prefix rank (>= 0, default 0.25)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    p.set_defaults(func=cmd_score, parser=p)
    p = subparsers.add_parser("serve", help="serve prefill scoring over HTTP (needs the serve extra)")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=at_least(int, 0, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready at once; compile on the first calls instead of before")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model name of the rerank/score APIs (default: the --model directory's name); "
                   "a call naming another model gets 404")  # fmt: skip
    p.add_argument("--rerank-template", default=None,
                   help="prompt of the rerank/score APIs, with {query} and {document} (default: "
                   "$MOE_COMPILE_RERANK_TEMPLATE, else "
                   "'Query: {query}\\nDocument: {document}\\nRelevant:')")  # fmt: skip
    p.add_argument("--rerank-positive", default=None,
                   help="label whose probability after the template is the relevance (default: $"
                   "MOE_COMPILE_RERANK_POSITIVE, else ' yes')")  # fmt: skip
    p.add_argument("--rerank-negative", default=None,
                   help="label it is weighed against: relevance = p(pos) / (p(pos) + p(neg)); '' for p(pos) alone "
                   "(default: $MOE_COMPILE_RERANK_NEGATIVE, else ' no')")  # fmt: skip
    _front_args(p)
    p.set_defaults(func=cmd_serve, parser=p)


def _front_args(p: argparse.ArgumentParser) -> None:
    """The HTTP front end's limits (``moe-compile serve``)."""
    p.add_argument("--max-concurrent-requests", type=at_least(int, 1), default=512,
                   help="scoring calls in flight at once; one more is answered 429 (default 512)")  # fmt: skip
    p.add_argument("--request-timeout", type=at_least(float, 0.001), default=None,
                   help="seconds a call may wait and run; past it 504, and its requests not yet started are "
                   "dropped (default: no limit)")  # fmt: skip
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every path but /health, /ready and /metrics (401 "
                   "otherwise; default: $MOE_COMPILE_API_KEY, else none)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=at_least(int, 1), default=2_000_000,
                   help="longest request body in bytes; a longer one is answered 413 (default 2000000)")  # fmt: skip
    p.add_argument("--classify-labels", default=None,
                   help="the classes of /classify, a JSON list of strings (default: $MOE_COMPILE_CLASSIFY_LABELS, "
                   "else '[\" yes\", \" no\"]')")  # fmt: skip


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a transformers checkpoint directory (causal LM)")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda:LOCAL_RANK where CUDA is, else cpu), cpu, cuda (cuda:LOCAL_RANK) "
                   "or cuda:N")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and compute (default: auto on CUDA, the checkpoint's own dtype; float32 on the "
                   "CPU, where scores do not depend on batching; bfloat16/float16/auto are faster but "
                   "batch-dependent, see docs/serving.md)")  # fmt: skip
    p.add_argument("--token-budget", type=or_auto(at_least(int, 1)), default=DEFAULT_TOKEN_BUDGET,
                   help="padded tokens per forward pass (default 2048); auto: sized from free CUDA memory after "
                   "the model loads (the CPU keeps 2048)")  # fmt: skip
    p.add_argument("--prefix-cache-tokens", type=or_auto(at_least(int, 0)), default=DEFAULT_PREFIX_CACHE_TOKENS,
                   help="prefix cache capacity (default 65536; 0: off); auto: the free CUDA memory left after the "
                   "weights and a batch of --token-budget (the CPU keeps 65536)")  # fmt: skip
    p.add_argument("--gpu-memory-utilization", type=at_least(float, 0.01, 1.0), default=GPU_MEMORY_UTILIZATION,
                   help="fraction of each GPU's total memory a rank may fill, weights included, when a size is "
                   "auto (vLLM's flag; default 0.9)")  # fmt: skip
    p.add_argument("--block-size", type=at_least(int, 1), default=16,
                   help="prefix cache block size in tokens (default 16)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly (no moe_prefill compile)")
    p.add_argument("--inductor", choices=tuple(INDUCTOR), default="auto",
                   help="run the compiled graphs through Inductor: auto (default: on CUDA only), on, off; with "
                   "Inductor its caches (TORCHINDUCTOR_CACHE_DIR) make a second launch faster, see "
                   "docs/serving.md")  # fmt: skip
    p.add_argument("--parallel", choices=("none", "aep"), default="none",
                   help="none (default): every torchrun rank is a full replica; aep: every rank holds 1/W of the "
                   "experts and gathers them ahead of use, all ranks step in lockstep behind rank 0 "
                   "(start with torchrun --nproc-per-node W --no-python moe-compile ...)")  # fmt: skip
    p.add_argument("--dist-timeout", type=at_least(float, 1), default=60.0,
                   help="seconds a collective waits for the other ranks before the run (or server) fails "
                   "(default 60)")  # fmt: skip


def _check_model_dir(args: argparse.Namespace) -> Path:
    path = Path(args.model)
    if not (path / "config.json").is_file():
        args.parser.error(f"argument --model: {args.model} is not a checkpoint directory (no config.json)")
    return path


def _device(args: argparse.Namespace):
    """``--device`` resolved (:func:`moe_compile.runtime.dist.resolve_device`), or argparse's one-line error."""
    from ..runtime.dist import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        args.parser.error(f"argument --device: {e}")


def _engine(args: argparse.Namespace):
    import dataclasses

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..loading import CheckpointError, load_model
    from .engine import PrefillEngine

    path = _check_model_dir(args)
    device = _device(args)
    parallel = "aep" if getattr(args, "parallel", "none") == "aep" else None
    if parallel and args.no_compile:
        args.parser.error("argument --parallel aep: the experts are sharded by the compile; drop --no-compile")
    if args.no_compile and args.inductor != "auto":
        args.parser.error(f"argument --inductor {args.inductor}: nothing is compiled with --no-compile; drop one")
    restore = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if restore:
        hf_logging.disable_progress_bar()  # a log file gets no "Loading weights" bar
    try:
        from ..quant.loading import is_fp8_checkpoint, load_fp8_model

        if is_fp8_checkpoint(path):  # [fp8] experts and dense layers kept in fp8, prepared (never dequantized)
            from ..runtime.dist import DTYPES

            compute = torch.bfloat16 if args.dtype in (None, "auto") else DTYPES[args.dtype]
            try:  # aep: this rank reads only its 1/W of the fp8 experts and their scales
                model = load_fp8_model(path, compute, parallel=parallel, device=device)
            except ValueError as why:
                args.parser.error(f"argument --model: {why}")
        else:  # aep: this rank reads only its 1/W of the experts (moe_compile.loading)
            model = load_model(path, device=device, dtype=args.dtype, parallel=parallel)
    except CheckpointError as e:
        raise SystemExit(f"moe-compile {args.func.__name__.removeprefix('cmd_')}: {e}") from None
    except ValueError as e:
        args.parser.error(f"argument --dtype: {e}" if str(e).startswith("dtype") else str(e))
    finally:
        if restore:
            hf_logging.enable_progress_bar()
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None
    options = {"inductor": INDUCTOR[args.inductor]}  # auto: Inductor on CUDA, the graphs run eagerly on the CPU
    if parallel:
        options["parallel"] = "aep"
    from .sizing import resolve

    auto_budget, auto_cache = args.token_budget == "auto", args.prefix_cache_tokens == "auto"
    with torch.no_grad():
        engine = PrefillEngine(
            model,
            tokenizer=tokenizer,
            token_budget=DEFAULT_TOKEN_BUDGET if auto_budget else args.token_budget,
            compile=not args.no_compile,
            options=options,
            prefix_cache_tokens=DEFAULT_PREFIX_CACHE_TOKENS if auto_cache else args.prefix_cache_tokens,
            block_size=args.block_size,
        )
    command = f"moe-compile {args.func.__name__.removeprefix('cmd_')}"
    problem = None
    try:  # auto: sized from the free device memory now that the weights are loaded (serving/sizing.py)
        sizing = resolve(engine, args.token_budget, args.prefix_cache_tokens, args.gpu_memory_utilization)
    except ValueError as e:
        sizing, problem = None, str(e)
    if (auto_budget or auto_cache) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ..runtime.dist import control_group

        mine = problem if sizing is None else (sizing.token_budget, sizing.prefix_cache_tokens)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=control_group())  # NOTE: every rank reports before any stops
        failed = [(r, p) for r, p in enumerate(every) if isinstance(p, str)]
        if failed:
            raise SystemExit(f"{command}: rank {failed[0][0]} of {len(every)}: {failed[0][1]}")
        budget, cache = min(t for t, _ in every), min(c for _, c in every)  # the smallest rank's, on every rank
        if (budget, cache) != mine:
            engine.resize(budget, cache)
            sizing = dataclasses.replace(sizing, token_budget=budget, prefix_cache_tokens=cache,
                                         how=sizing.how + "; the smallest rank's figures")  # fmt: skip
            engine.sizing = sizing.to_json()
    if problem is not None:
        raise SystemExit(f"{command}: {problem}")
    if sizing is not None:  # the router and the front end read the resolved figures from args
        args.token_budget, args.prefix_cache_tokens = sizing.token_budget, sizing.prefix_cache_tokens
        print(f"--token-budget {sizing.token_budget}, --prefix-cache-tokens {sizing.prefix_cache_tokens} "
              f"({sizing.how})", file=sys.stderr)  # fmt: skip
    return engine


def _init_ranks(args: argparse.Namespace) -> tuple[int, int]:
    """Join torchrun's group (NCCL on CUDA, gloo on the CPU) with ``--dist-timeout``; ``(world_size, rank)``."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel == "aep" and world_size < 2:
        args.parser.error("argument --parallel aep: needs 2 or more ranks: start with torchrun --nproc-per-node W "
                          "--no-python moe-compile ...")  # fmt: skip
    if world_size > 1 and not dist.is_initialized():
        from ..runtime.dist import init_distributed

        # NCCL on CUDA, gloo on the CPU (runtime.dist.backend_for); torchrun sets the rendezvous variables
        init_distributed(timeout_s=args.dist_timeout, device=_device(args))
    return world_size, (dist.get_rank() if world_size > 1 else 0)


def cmd_score(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .jsonl import OutputError, ScoresOutput

    if not Path(args.input).is_file():
        args.parser.error(f"argument --input: no such input file: {args.input}")
    _check_model_dir(args)
    world_size, rank = _init_ranks(args)
    output, problem = None, None
    if rank == 0:  # checked and locked before the model loads: a bad --output stops the run at once
        try:
            output = ScoresOutput(args.output, args.input)
        except OutputError as e:
            problem = str(e)
    done = output.done if output is not None else set()
    if world_size > 1:
        shared = [done, problem]
        from ..runtime.dist import control_group

        dist.broadcast_object_list(shared, src=0, group=control_group())  # NOTE: rank 0 read the output first
        done, problem = shared
    if problem is not None:
        if world_size > 1:
            dist.destroy_process_group()
        args.parser.error(f"argument --output: {problem}")
    try:
        return _score(args, rank, world_size, output, done)
    finally:
        if output is not None:
            output.close()


def _score(args: argparse.Namespace, rank: int, world_size: int, output, done: set) -> int:
    """Score the input's requests not in ``done``; rank 0 appends them to ``output`` (a ScoresOutput)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from .distributed import score_routed
    from .flops import FlopsModel
    from .jsonl import read_requests
    from .openai_batch import is_batch_file
    from .routing import Router

    batch_file = is_batch_file(args.input)
    if batch_file and world_size > 1 and args.parallel != "aep":
        args.parser.error("argument --input: an OpenAI batch file runs on one process or under --parallel aep")
    engine = _engine(args)
    router = Router(
        world_size,
        FlopsModel.from_model(engine.model),
        policy=args.policy,
        slack=args.slack,
        block_size=args.block_size,
        cache_tokens=args.prefix_cache_tokens,
    )
    lockstep = None
    if args.parallel == "aep":
        from .aep import LockstepScorer, ServingFailed

        lockstep = LockstepScorer(engine, router)
        if rank != 0:  # follows rank 0's steps; rank 0 reads the input and writes the output
            try:
                lockstep.serve_worker()
            finally:
                dist.destroy_process_group()
            return 0
        lockstep.start()
        lockstep.warmup()  # every rank compiles the same graphs at the same time
    if batch_file:  # OpenAI batch lines: calls to the HTTP endpoints, through the same app (openai_batch.py)
        from .openai_batch import score_batch_file

        try:
            return score_batch_file(args, engine, lockstep, output, done)
        finally:
            if lockstep is not None:
                lockstep.stop()
                dist.destroy_process_group()
    todo, malformed, skipped = [], 0, 0
    for number, request in read_requests(args.input):
        if isinstance(request, str):
            malformed += 1
            if rank == 0:
                print(f"{args.input}:{number}: skipped malformed line: {request}", file=sys.stderr)
        elif request.id in done:
            skipped += 1
        else:
            todo.append(request)
    start = time.perf_counter()
    scored = errors = tokens = cached = 0
    # disable=None: tqdm's own rule, no bar when stderr is not a terminal (a log file gets no bar updates)
    disable = True if args.quiet or rank != 0 else None
    with tqdm(total=len(todo), unit="req", disable=disable, file=sys.stderr) as bar:
        for lo in range(0, len(todo), args.chunk):
            chunk = todo[lo : lo + args.chunk]
            if lockstep is not None:
                try:
                    scores = lockstep.score(chunk)
                except ServingFailed as e:  # a rank died or hung: the chunks written so far stay
                    print(f"moe-compile score: {e}", file=sys.stderr)
                    return 2
            else:
                scores = score_routed(engine, chunk, router)
            if rank == 0:
                output.append(scores)
            scored += len(scores)
            errors += sum(s.error is not None for s in scores)
            tokens += sum(s.tokens for s in scores)
            cached += sum(s.cached_tokens for s in scores)
            bar.update(len(scores))
    wall = time.perf_counter() - start
    if lockstep is not None:
        lockstep.stop()
    if rank == 0:
        _summary(scored, errors, tokens, cached, wall, skipped, malformed, router)
        from .memory import describe, memory_accounting

        print(describe(memory_accounting(engine)))
    if world_size > 1:
        dist.destroy_process_group()
    return 1 if malformed else 0


def _summary(scored, errors, tokens, cached, wall, skipped, malformed, router) -> None:
    rate = f"{scored / wall:.1f} requests/s, {tokens / wall:.0f} tokens/s" if wall > 0 else "no time"
    print(f"scored {scored} requests ({errors} with errors) in {wall:.2f} s: {rate}")
    print(f"skipped {skipped} already in the output, {malformed} malformed line(s)")
    hit = cached / tokens if tokens else 0.0
    print(f"prefix cache: {hit:.1%} of prompt tokens reused ({cached} of {tokens})")
    result = router.result()
    print(f"per-rank load ({router.policy} routing):")
    print("  rank  requests   tokens   GFLOP (true FLOPs of the uncached tokens)")
    for r in range(router.world_size):
        print(f"  {r:>4}  {result.requests[r]:>8}  {result.tokens[r]:>7}  {result.flops[r] / 1e9:>6.3f}")


def _front_kwargs(args: argparse.Namespace) -> dict:
    """``create_app``'s front-end keyword arguments from ``_front_args``' flags."""
    from .classify import DEFAULT_LABELS, labels_from_env

    try:
        labels = labels_from_env(args.classify_labels, DEFAULT_LABELS)
    except ValueError as e:
        args.parser.error(f"argument --classify-labels: {e}")
    return {"max_concurrent_requests": args.max_concurrent_requests, "request_timeout": args.request_timeout,
            "api_key": args.api_key or os.environ.get("MOE_COMPILE_API_KEY") or None,
            "max_body_bytes": args.max_body_bytes, "classify_labels": labels}  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from .http import serve
    from .relevance import RelevanceTemplate

    if args.parallel == "aep" and args.no_warmup:
        args.parser.error("argument --no-warmup: AEP ranks warm up together before serving")
    world_size, rank = _init_ranks(args) if args.parallel == "aep" else (1, 0)

    try:
        relevance = RelevanceTemplate.from_env(args.rerank_template, args.rerank_positive, args.rerank_negative)
    except ValueError as e:
        args.parser.error(str(e))
    model_name = args.served_model_name or Path(args.model).resolve().name
    front = _front_kwargs(args)  # flag errors before the model loads
    engine = _engine(args)
    runner = None
    if args.parallel == "aep":
        import torch.distributed as dist

        from .aep import LockstepScorer
        from .flops import FlopsModel
        from .routing import Router

        router = Router(world_size, FlopsModel.from_model(engine.model), block_size=args.block_size,
                        cache_tokens=args.prefix_cache_tokens)  # fmt: skip
        runner = LockstepScorer(engine, router)
        if rank != 0:  # rank 0 takes the requests; this rank follows its steps
            try:
                runner.serve_worker()
            finally:
                dist.destroy_process_group()
            return 0
        runner.start()
    print(f"serving {model_name} on http://{args.host}:{args.port} "
          "(POST /score, /rerank, /v1/rerank, /v2/rerank, /v1/score, /classify, /v1/embeddings; "
          "GET /health, /ready, /metrics, /v1/models)", file=sys.stderr)  # fmt: skip
    if not args.no_warmup:
        print("warming up: compiling the batch shapes serving runs; GET /ready answers 503 until ready",
              file=sys.stderr)  # fmt: skip
    try:
        serve(engine, args.host, args.port, warmup=not args.no_warmup, relevance=relevance, model_name=model_name,
              runner=runner, **front)  # fmt: skip
    finally:
        if runner is not None:
            runner.stop()
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
