"""Moved: the expert store is :mod:`moe_compile.runtime.expert_store` (its ops: :mod:`moe_compile.ops.expert_store`).

Re-exported here for code that imports the old names; ``OffloadStore`` is :class:`ExpertStore`.
"""

from __future__ import annotations

from .expert_store import ExpertSource, ExpertStore, Fetch, HostSource, LayerStats, get_store, new_store, stores

OffloadStore = ExpertStore

__all__ = [
    "ExpertSource",
    "ExpertStore",
    "Fetch",
    "HostSource",
    "LayerStats",
    "OffloadStore",
    "get_store",
    "new_store",
    "stores",
]
