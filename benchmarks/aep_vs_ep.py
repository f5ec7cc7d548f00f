"""Tokens/s of AEP vs EP vs one rank, side by side; and the planner's predictions for 8xH100 Qwen3-235B-A22B.

    torchrun --nproc-per-node 2 benchmarks/aep_vs_ep.py [--tokens-per-rank 4096] [--layers 4] ...

What is measured, in one run, on a random-weight Qwen3-MoE-shaped model:

- ``one rank``: rank 0 runs the whole model (compiled with ``moe_prefill``, no
  parallelism) on its batch; the other ranks wait;
- ``AEP`` (``prefetch_depth`` 1, and 0 for comparison) and ``EP``: every rank runs its
  own batch of the same size; the experts are sharded over the ranks;
- ``AEP + hot experts``: AEP at depth 1 with ``hot_experts=--hot-experts`` resident
  experts per layer, chosen from routing statistics every rank collects on the same
  sample batch (``moe_compile.collect_routing_stats``): only the other experts are gathered.

tokens/s = tokens of all working ranks / the step's wall time (the slowest rank),
median over ``--steps`` steps after two warm-up steps (the first compiles). Each
rank runs one thread, so a rank is a core. Every mode's logits are checked against
the eager model on the rank's batch. On CPU with gloo over loopback the numbers
are indicative only; on GPUs use NCCL (``moe_compile.runtime.init_distributed``
picks it when CUDA is available) and larger sizes.

Then rank 0 prints the planner's predictions (``moe_compile.planner``) for
Qwen3-235B-A22B on 8 H100s over NVLink (``benchmarks/configs/qwen3_235b_a22b.json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import moe_compile
from moe_compile import planner
from moe_compile.runtime import init_distributed
from moe_compile.verify import rel_err

QWEN3_235B = Path(__file__).parent / "configs" / "qwen3_235b_a22b.json"


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def measure(model, batch: torch.Tensor, options: dict | None, steps: int, working: bool) -> tuple[float, float]:
    """(median seconds of a step, over the slowest rank; relative error to eager on this rank's batch)."""
    err = 0.0
    with torch.no_grad():
        if working:
            expected = model(batch).logits  # before compiling: a parallel compile releases the experts
            compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False, **(options or {})})
            for _ in range(2):  # warm-up; the first call compiles
                got = compiled(batch).logits
            err = rel_err(got, expected)
        seconds = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            if working:
                compiled(batch)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
            seconds.append(elapsed.item())
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    return statistics.median(seconds), max(errors)


def gather_seconds(args: argparse.Namespace, world_size: int, repeats: int = 5) -> float:
    """Seconds of one layer's expert gather as AEP issues it (one coalesced all-gather of the shards)."""
    c10d = torch.ops._c10d_functional
    E_r = args.experts // world_size
    shards = [
        torch.randn(E_r, 2 * args.moe_intermediate, args.hidden),
        torch.randn(E_r, args.hidden, args.moe_intermediate),
    ]
    group = dist.group.WORLD.group_name
    seconds = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        for out in c10d.all_gather_into_tensor_coalesced(shards, world_size, group):
            c10d.wait_tensor(out)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256, help="tokens per request")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hot-experts", type=int, default=4, help="resident experts per layer in the hot run")
    args = parser.parse_args()

    world = init_distributed(timeout_s=600)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(world.rank)
    batch = torch.randint(0, 1024, (args.tokens_per_rank // args.seq, args.seq), generator=generator)

    # routing statistics for the hot run: the same sample batch (seed 1234) on every rank, so the same hot sets
    samples = torch.randint(0, 1024, (4, args.seq), generator=torch.Generator().manual_seed(1234))
    stats = moe_compile.collect_routing_stats(build(args), samples)
    stats_path = f"{tempfile.mkdtemp()}/routing-rank{world.rank}.safetensors"
    stats.save(stats_path)
    hot_share = statistics.mean(stats.hot_share(b, args.hot_experts) for b in stats.blocks)
    hot = {"parallel": "aep", "prefetch_depth": 1, "hot_experts": args.hot_experts, "routing_stats": stats_path}
    runs = [
        ("one rank", None, False),
        ("AEP, prefetch depth 1", {"parallel": "aep", "prefetch_depth": 1}, True),
        ("AEP, prefetch depth 0", {"parallel": "aep", "prefetch_depth": 0}, True),
        ("EP (AllToAll)", {"parallel": "ep"}, True),
        (f"AEP + {args.hot_experts} hot experts, depth 1", hot, True),
    ]
    rows = []
    for name, options, everyone in runs:
        torch._dynamo.reset()
        working = everyone or world.rank == 0
        seconds, err = measure(build(args), batch, options, args.steps, working)
        ranks = world.size if everyone else 1
        rows.append((name, ranks, ranks * batch.numel() / seconds, seconds, err))

    gather_s = gather_seconds(args, world.size)
    if world.rank == 0:
        per_layer = 3 * args.hidden * args.moe_intermediate * args.experts * 4 / 2**20
        print(
            f"# aep_vs_ep: {world.size} ranks (gloo, 1 thread each) on {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, moe_compile {moe_compile.__version__}\n"
            f"# model: Qwen3-MoE shape, {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
            f"{args.moe_intermediate}, top-{args.top_k}, fp32 ({per_layer:.1f} MiB of experts per layer); "
            f"{batch.numel()} tokens per rank ({batch.shape[0]} x {batch.shape[1]})\n"
        )
        print("| run | ranks | tokens/s | s/step | vs one rank | max rel err vs eager |")
        print("|---|---|---|---|---|---|")
        base = rows[0][2]
        for name, ranks, tps, seconds, err in rows:
            print(f"| {name} | {ranks} | {tps:,.0f} | {seconds:.3f} | {tps / base:.2f}x | {err:.1e} |")
        print(
            f"\n# hot experts: {args.hot_experts} of {args.experts} per layer resident (they take {hot_share:.0%} of "
            f"the sample's routed slots); each layer gathers {args.experts - args.hot_experts} experts instead of "
            f"{args.experts}"
        )
        print(
            f"\n# one layer: gather of its experts {gather_s * 1e3:.1f} ms (measured, gloo), compute about "
            f"{rows[0][3] / args.layers * 1e3:.1f} ms (one rank's step / layers): the gather "
            f"{'hides' if gather_s < rows[0][3] / args.layers else 'does not hide (link-bound)'}"
        )
        print("\n# planner: Qwen3-235B-A22B, 8 x H100 SXM, NVLink, 16384 tokens per GPU, context 2048\n")
        shape = planner.model_shape(transformers.AutoConfig.from_pretrained(str(QWEN3_235B)))
        for dtype in ("bf16", "fp8"):
            setting = planner.Setting(gpus=8, gpu="h100", link="nvlink", tokens_per_gpu=16384, dtype=dtype)
            print(planner.format_plan(planner.plan(shape, setting)) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
