"""Rank functions of tests/test_loading_dist.py (spawned by dist_workers.spawn, so importable by the ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_compile.loading import CheckpointError, expert_parameters, load_model
from moe_compile.runtime import shards


def batch_of(rank: int, vocab: int, seed: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + rank)
    return torch.randint(0, vocab, (2, 9), generator=gen)  # [B, S]: this rank's own requests


def sharded_parity_worker(
    rank: int, world_size: int, path: str, parallel: str, hot: int = 0, stats: str | None = None
) -> dict:
    """Eager logits of a whole load on this rank's batch, then the sharded load compiled with ``parallel``."""
    whole = load_model(path, device="cpu")
    x = batch_of(rank, whole.config.vocab_size)
    with torch.no_grad():
        ref = whole(x).logits
    del whole
    model = load_model(path, device="cpu", parallel=parallel, hot_experts=hot, routing_stats=stats)
    facts = {"info": model.moe_compile_load}
    experts = expert_parameters(model)
    facts["full_storage_bytes"] = sum(
        model.get_parameter(n).untyped_storage().nbytes() for n in experts
    )  # the [E, ...] parameters hold nothing
    facts["registered"] = {n: [tuple(t.shape) for t in shards.registered(model.get_parameter(n))] for n in experts}
    options = {"parallel": parallel, "inductor": False}
    if hot:
        options.update(hot_experts=hot, routing_stats=stats)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="moe_prefill", options=options)
    with torch.no_grad():
        got = fast(x).logits
    facts["err"] = ((got - ref).abs().max() / ref.abs().max()).item()
    facts["report"] = (
        "\n".join(__import__("moe_compile").last_report().notes)
        if hasattr(__import__("moe_compile"), "last_report")
        else ""
    )
    return facts


def load_error_worker(rank: int, world_size: int, path: str, parallel: str = "aep") -> str:
    """The error every rank raises on a checkpoint that cannot load (and that none hangs)."""
    try:
        load_model(path, device="cpu", parallel=parallel)
    except (CheckpointError, ValueError) as exc:
        dist.barrier()  # every rank got here: none waits on a failed peer
        return f"{type(exc).__name__}: {exc}"
    return "loaded"
