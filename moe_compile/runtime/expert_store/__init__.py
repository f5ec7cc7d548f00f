"""The expert store: experts kept off the device, brought into a ring of two device buffers ahead or on demand.

Legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden size, ``W`` ranks.

Each compiled graph that offloads its experts, or gathers them by prediction, gets one
:class:`ExpertStore`. Per MoE layer (the ``i``-th call in graph order) it keeps, per layer
parity, one device buffer shaped like a whole layer::

    ring[layer % 2][role]  [E, ...]   device; rows of the experts resident for its current layer

Where the experts come from is the store's *source*; the ring, the prefetch / on-demand protocol
and the byte counts are the store's and the same for both:

- :class:`~.sources.HostSource` (``offload="cpu"``, :mod:`moe_compile.passes.offload_experts`): every expert
  tensor in host copies it owns (pinned on CUDA), the model's tensors released; one transfer per weight role;
- :class:`~.ranks.RanksSource` (``parallel="aep"`` with a predictor,
  :mod:`moe_compile.passes.predicted_gather`): each rank keeps its shard of every layer; the union
  over ranks of the wanted experts is all-gathered (a collective: every rank takes part in every fetch).

Experts keep their ids in the buffer (row ``e`` is expert ``e``), so the canonical
:func:`moe_compile.ops.moe_torch` runs on it unchanged; rows of experts not brought in for this layer
are stale and never read, since only routed experts are read.

Two ops, both custom ops with fakes (:mod:`moe_compile.ops.expert_store`), put in the graph by the
passes above and :mod:`moe_compile.passes.insert_predictors`::

    token = moe_compile.offload_prefetch(predicted_ids [T, K], store, layer)    # int64 [1], on the host
    out   = moe_compile.moe_offload(x [T, H], ids [T, K], weights [T, K], token?, store, layer, spec)

``offload_prefetch`` (at the start of the layer, before attention) claims the layer's buffer and has
the source start bringing the predicted experts (their union over tokens) into it, asynchronously
where it can (a side stream on CUDA, an ``async_op`` collective); the token carries the prefetch's
sequence number. ``moe_offload`` waits for that prefetch, has the source bring the routed experts
that are not resident (on demand) and computes. Without a token (no predictor) it claims the
buffer itself and brings every routed expert on demand. The token is a data dependency: it keeps
the prefetch before the compute and stops dead-code elimination; the graph's data flow (layer
``i``'s residual depends on layer ``i-1``'s MoE output) keeps layer ``i+2``'s prefetch after layer
``i``'s compute, so two buffers suffice.

Every fetch is counted per layer (:class:`~.stats.LayerStats`): bytes brought ahead (and how many of those the
router used), bytes brought on demand. ``moe_compile.last_report().offload`` holds the live stores.

Lifetime: a store lives as long as the compiled graph that calls it (the backend's compiled callable
holds it, :func:`moe_compile.backend._wrapped`); the registry that the ops look handles up in holds
weak references only, so dropping the compiled model and ``torch._dynamo.reset()`` free the store,
its device buffers and (for ``RanksSource``) its shards.

Modules: :mod:`.store` (the store, its ring and the registry of live stores), :mod:`.sources` (the
source protocol and :class:`~.sources.HostSource`), :mod:`.ranks` (:class:`~.ranks.RanksSource`),
:mod:`.stats` (the per-layer counts).
"""

from __future__ import annotations

from .ranks import RanksSource
from .sources import ExpertSource, Fetch, HostSource
from .stats import LayerStats
from .store import ExpertStore, get_store, new_store, stores

__all__ = [
    "ExpertSource",
    "ExpertStore",
    "Fetch",
    "HostSource",
    "LayerStats",
    "RanksSource",
    "get_store",
    "new_store",
    "stores",
]
