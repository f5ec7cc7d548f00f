"""Rank functions of tests/test_loading_dist.py (spawned by dist_workers.spawn, so importable by the ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_compile.backend import collect_reports
from moe_compile.loading import CheckpointError, expert_parameters, load_model
from moe_compile.runtime import shards


def batch_of(rank: int, vocab: int, seed: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + rank)
    return torch.randint(0, vocab, (2, 9), generator=gen)  # [B, S]: this rank's own requests, fresh


def sharded_parity_worker(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    """Per case ``(path, parallel, hot, stats)``: eager logits of a whole load on this rank's batch, then
    the sharded load compiled with ``parallel`` on the same batch; what the rank kept."""
    out = []
    for path, parallel, hot, stats in cases:
        whole = load_model(path, device="cpu")
        x = batch_of(rank, whole.config.vocab_size)
        with torch.no_grad():
            ref = whole(x).logits
        del whole
        model = load_model(path, device="cpu", parallel=parallel, hot_experts=hot, routing_stats=stats)
        experts = expert_parameters(model)
        facts = {
            "info": model.moe_compile_load,
            # the [E, ...] parameters hold no storage: the full expert set is never resident
            "full_storage_bytes": sum(model.get_parameter(n).untyped_storage().nbytes() for n in experts),
            "registered": {
                n: sorted(tuple(t.shape) for t in shards.registered(model.get_parameter(n))) for n in experts
            },
            "shapes": {n: tuple(model.get_parameter(n).shape) for n in experts},
        }
        from moe_compile.serving import PrefillEngine
        from moe_compile.serving.memory import memory_accounting

        engine = PrefillEngine(model, options={"parallel": parallel, "inductor": False}, prefix_cache_tokens=64)
        facts["memory"] = memory_accounting(engine, prefetch_depth=1)
        facts["cache_off"] = engine.prefix_cache_off
        options = {"parallel": parallel, "inductor": False}
        if hot:
            options.update(hot_experts=hot, routing_stats=stats)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="moe_prefill", options=options)
        with torch.no_grad(), collect_reports() as report:
            got = fast(x).logits
        facts["err"] = ((got - ref).abs().max() / ref.abs().max()).item()
        facts["notes"] = list(report.notes)
        facts["verified"] = [b.verified for b in report.blocks]
        facts["released_bytes"] = report.released_bytes
        out.append(facts)
    return out


def load_error_worker(rank: int, world_size: int, paths: list[str], parallel: str = "aep") -> str:
    """The error this rank raises loading ``paths[rank]`` (the ranks may be given different copies)."""
    try:
        load_model(paths[rank], device="cpu", parallel=parallel)
    except (CheckpointError, ValueError) as exc:
        dist.barrier()  # every rank got here: none waits on a failed peer
        return f"{type(exc).__name__}: {exc}"
    return "loaded"
