"""The expert store: one compiled graph's ring of two device buffers, its prefetch / on-demand protocol, the registry.

See the package docstring (:mod:`moe_compile.runtime.expert_store`) for the protocol; the ops that
call a store by its handle are in :mod:`moe_compile.ops.expert_store`.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable

import torch

from .sources import ExpertSource, Fetch, HostSource
from .stats import LayerStats

__all__ = ["ExpertStore", "get_store", "new_store", "stores"]

#: handle -> store, weakly: the compiled graph owns its store (see the package docstring)
_STORES: weakref.WeakValueDictionary[int, ExpertStore] = weakref.WeakValueDictionary()
_handles = itertools.count()


@dataclasses.dataclass
class _Layer:
    layout: dict[str, tuple[torch.Size, torch.dtype]]  # role -> full [E, ...] shape, dtype
    stats: LayerStats

    @property
    def nbytes(self) -> int:
        return sum(shape.numel() * dtype.itemsize for shape, dtype in self.layout.values())


@dataclasses.dataclass
class _Buffer:
    tensors: dict[str, torch.Tensor]  # role -> [E, ...] on the device
    owner: tuple[int, int | None] | None = None  # (layer, prefetch sequence number) whose experts it holds
    resident: set[int] = dataclasses.field(default_factory=set)
    pending: Callable[[], None] | None = None  # finishes the prefetch (waits for its transfer)


class ExpertStore:
    """One compiled graph's off-device experts (through its source), its two device buffers and its counts."""

    def __init__(self, handle: int, device: torch.device, source: ExpertSource):
        self.handle = handle
        self.device = device
        self.source = source
        self.layers: dict[int, _Layer] = {}
        self._ring: list[_Buffer | None] = [None, None]
        self._sequence = itertools.count()

    def add_layer(self, layer: int, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Hand layer ``layer``'s expert tensors (role -> the source's form of ``[E, ...]``) to the source."""
        layout = self.source.add_layer(layer, tensors)
        per_expert = sum(shape[1:].numel() * dtype.itemsize for shape, dtype in layout.values())
        self.layers[layer] = _Layer(layout, LayerStats(layer, path, per_expert, self.source.name))

    @property
    def host_bytes(self) -> int:
        """Bytes of expert tensors the source holds off the ring (host copies, or this rank's shards)."""
        return self.source.held_bytes

    @property
    def buffer_bytes(self) -> int:
        """Device memory of the ring: the two largest layers of opposite parity."""
        sizes = {p: max((l.nbytes for i, l in self.layers.items() if i % 2 == p), default=0) for p in (0, 1)}
        return sizes[0] + sizes[1]

    def stats(self) -> list[LayerStats]:
        return [self.layers[i].stats for i in sorted(self.layers)]

    def reset_stats(self) -> None:
        for layer in self.layers.values():
            s = layer.stats
            layer.stats = LayerStats(s.layer, s.path, s.expert_bytes, s.kind)

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.stats())

    # --- what the ops call ------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Claim layer ``layer``'s buffer and start bringing ``experts`` into it; the prefetch's sequence number."""
        seq = next(self._sequence)
        buffer = self._claim(layer, seq)
        fetch = self.source.fetch(layer, buffer.tensors, experts, ahead=True)
        buffer.pending = fetch.finish
        buffer.resident.update(fetch.experts)
        self._count(layer, "bytes_ahead", fetch)
        return seq

    def experts(self, layer: int, seq: int | None, routed: list[int]) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s buffer with every ``routed`` expert resident (bringing the missing ones now)."""
        if seq is None:
            buffer = self._claim(layer, None)
        else:
            buffer = self._ring[layer % 2]
            if buffer is None or buffer.owner != (layer, seq):
                raise RuntimeError(
                    f"offload: layer {layer}'s prefetch {seq} was overwritten before its MoE ran "
                    f"(buffer now holds {buffer.owner if buffer else None}); the graph order breaks the ring of 2"
                )
            if buffer.pending is not None:
                buffer.pending, finish = None, buffer.pending
                finish()
        missing = [e for e in routed if e not in buffer.resident]
        fetch = self.source.fetch(layer, buffer.tensors, missing, ahead=False)  # RanksSource: always a collective
        if fetch.finish is not None:
            fetch.finish()
        buffer.resident.update(fetch.experts)
        stats = self._count(layer, "bytes_on_demand", fetch)
        stats.calls += 1
        stats.bytes_on_demand_used += len(missing) * stats.expert_bytes
        stats.bytes_ahead_used += (len(routed) - len(missing)) * stats.expert_bytes
        return buffer.tensors

    def _count(self, layer: int, field: str, fetch: Fetch) -> LayerStats:
        stats = self.layers[layer].stats
        setattr(stats, field, getattr(stats, field) + len(fetch.experts) * stats.expert_bytes)
        stats.bytes_padding += fetch.padding_rows * stats.expert_bytes
        stats.transfers += fetch.transfers
        stats.fetches += 1 if fetch.transfers else 0
        return stats

    def _claim(self, layer: int, seq: int | None) -> _Buffer:
        """Layer ``layer``'s ring slot, emptied for it (allocated, or re-allocated for other shapes)."""
        layout = self.layers[layer].layout
        buffer = self._ring[layer % 2]
        if buffer is None or any(
            role not in buffer.tensors or buffer.tensors[role].shape != shape or buffer.tensors[role].dtype != dtype
            for role, (shape, dtype) in layout.items()
        ):
            buffer = _Buffer(
                {role: torch.empty(shape, dtype=dtype, device=self.device) for role, (shape, dtype) in layout.items()}
            )
            self._ring[layer % 2] = buffer
        buffer.owner, buffer.resident, buffer.pending = (layer, seq), set(), None
        return buffer


def new_store(device: torch.device, source: ExpertSource | None = None) -> ExpertStore:
    """A new store for one compiled graph computing on ``device`` (default source: host memory).

    The registry keeps only a weak reference: whoever compiles the graph must keep the store alive
    as long as the graph (the passes add it to ``PassContext.stores``, which the backend's compiled callable holds).
    """
    device = torch.device(device)
    store = ExpertStore(next(_handles), device, source if source is not None else HostSource(device))
    _STORES[store.handle] = store
    return store


def get_store(handle: int) -> ExpertStore:
    store = _STORES.get(handle)
    if store is None:
        raise RuntimeError(
            f"moe_compile: expert store {handle} is gone: the compiled graph that owned it was freed "
            "(torch._dynamo.reset() or the compiled model dropped); compile the model again"
        )
    return store


def stores() -> list[ExpertStore]:
    """The live stores (one per compiled graph still alive that uses one), oldest first."""
    return [_STORES[h] for h in sorted(_STORES.keys())]
