"""What a serving rank holds, in tensor bytes: dense weights, expert weights, the AEP gather ring, the prefix cache.

:func:`memory_accounting` is what ``/health`` (``"memory"``) and ``moe-compile score``'s summary report.
Tensor bytes, not RSS: memory-mapped checkpoint pages, allocator slack and activations are not in it
(``benchmarks/load_memory.py`` measures RSS beside it). Every rank of an AEP group holds the same
shares (equal shards, the same ring and cache sizes), so rank 0's figures are every rank's.
"""

from __future__ import annotations

from typing import Any

from ..loading.checkpoint import expert_parameters
from ..runtime import shards


def memory_accounting(engine: Any, prefetch_depth: int | None = None) -> dict[str, int | str]:
    """Tensor bytes this rank holds for ``engine`` (a :class:`~moe_compile.serving.PrefillEngine`).

    - ``dense_bytes``: parameters and buffers other than expert tensors (tied weights once);
    - ``expert_bytes``: expert tensors resident on this rank: whole, or this rank's shards and the
      hot experts of a sharded load (:mod:`moe_compile.loading`);
    - ``ring_bytes``: AEP's gathered experts alive at once, ``(depth + 1)`` times the largest
      layer's gather (0 without sharding); ``prefetch_depth``: default, the depth of the last
      compile's report, else 1 (the CPU's and the usual GPU choice);
    - ``prefix_cache_bytes``: the prefix cache's capacity in keys and values (``capacity tokens x
      per-token K/V bytes of every layer``), what it holds when full.
    """
    model = engine.model
    experts = expert_parameters(model)
    seen: set[int] = set()
    dense = expert = 0
    blocks: dict[str, int] = {}
    world = getattr(getattr(model, "moe_compile_load", None), "world_size", 1)
    for name, param in model.named_parameters():
        if name in experts:
            if shards.is_released(param):
                kept = shards.registered(param)
                expert += sum(t.nbytes for t in kept)
                block = name.rsplit(".", 2)[0]
                rows = param.shape[0] - shards.resident_count(param)  # the E - R experts gathered
                gathered = param.nbytes // param.shape[0] * rows if world > 1 else 0
                blocks[block] = blocks.get(block, 0) + gathered
            else:
                expert += param.nbytes
            continue
        key = param.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            dense += param.nbytes
    dense += sum(b.nbytes for b in model.buffers())
    depth = prefetch_depth if prefetch_depth is not None else _compiled_depth()
    ring = (depth + 1) * max(blocks.values(), default=0)
    cache = 0
    if engine.cache is not None and engine._kv_template is not None:
        cache = engine.cache.capacity_tokens * kv_bytes_per_token(engine)
    return {
        "dense_bytes": dense,
        "expert_bytes": expert,
        "ring_bytes": ring,
        "prefix_cache_bytes": cache,
        "total_bytes": dense + expert + ring + cache,
        "prefetch_depth": depth if blocks else 0,
    }


def kv_bytes_per_token(engine: Any) -> int:
    """Bytes of keys and values one token takes in the prefix cache, every layer (0 without a cache template)."""
    template = engine._kv_template or ()
    return sum(k.shape[0] * k.shape[2] * k.element_size() + v.shape[0] * v.shape[2] * v.element_size()
               for k, v in template)  # fmt: skip


def _compiled_depth() -> int:
    from ..backend import last_report

    report = last_report()
    for block in report.blocks if report is not None else ():
        depth = block.schedule.get("prefetch_depth")
        if isinstance(depth, int):
            return depth
    return 1


def describe(memory: dict) -> str:
    """One line: the figures in MiB."""
    mib = {k: v / 2**20 for k, v in memory.items() if k.endswith("_bytes")}
    return (f"memory per rank (tensor bytes): dense {mib['dense_bytes']:.2f} MiB, experts {mib['expert_bytes']:.2f} "
            f"MiB, gather ring {mib['ring_bytes']:.2f} MiB (depth {memory['prefetch_depth']}), prefix cache "
            f"{mib['prefix_cache_bytes']:.2f} MiB: {mib['total_bytes']:.2f} MiB")  # fmt: skip
