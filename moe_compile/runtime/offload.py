"""Experts kept off the device, brought into a ring of two device buffers ahead or on demand.

Legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden size, ``W`` ranks.

Each compiled graph gets one :class:`OffloadStore`. Per MoE layer (the ``i``-th call in graph
order) it keeps, per layer parity, one device buffer shaped like a whole layer::

    ring[layer % 2][role]  [E, ...]   device; rows of the experts resident for its current layer

Where the experts come from is the store's *source*; the ring, the prefetch / on-demand protocol
and the byte counts are the store's and the same for both:

- :class:`HostSource` (``offload="cpu"``, :mod:`moe_compile.passes.offload_experts`): every expert
  tensor in host memory (pinned copies on CUDA; on CPU the parameters themselves), copied row by row;
- :class:`moe_compile.runtime.predicted_gather.RanksSource` (``parallel="aep"`` with a predictor,
  :mod:`moe_compile.passes.predicted_gather`): each rank keeps its shard of every layer; the union
  over ranks of the wanted experts is all-gathered (a collective: every rank takes part in every fetch).

Experts keep their ids in the buffer (row ``e`` is expert ``e``), so the canonical
:func:`moe_compile.ops.moe_torch` runs on it unchanged; rows of experts not brought in for this layer
are stale and never read, since only routed experts are read.

Two ops, both custom ops with fakes, put in the graph by the passes above and
:mod:`moe_compile.passes.insert_predictors`::

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

Every fetch is counted per layer (:class:`LayerStats`): bytes brought ahead (and how many of those the
router used), bytes brought on demand. ``moe_compile.last_report().offload`` holds the live stores.

Lifetime: a store lives as long as the compiled graph that calls it (the backend's compiled callable
holds it, :func:`moe_compile.backend._wrapped`); the registry that the ops look handles up in holds
weak references only, so dropping the compiled model and ``torch._dynamo.reset()`` free the store,
its device buffers and (for ``RanksSource``) its shards.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..ops import moe_torch
from ..spec import ExpertSpec

__all__ = ["ExpertSource", "HostSource", "LayerStats", "OffloadStore", "get_store", "new_store", "stores"]

#: device tensor -> its pinned host copy (CUDA only; shared by recompiles of the same model)
_PINNED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: handle -> store, weakly: the compiled graph owns its store (see the module docstring)
_STORES: weakref.WeakValueDictionary[int, OffloadStore] = weakref.WeakValueDictionary()
_handles = itertools.count()


@dataclasses.dataclass
class LayerStats:
    """What one MoE layer's fetches brought into the device buffer, summed over calls."""

    layer: int
    path: str
    expert_bytes: int  # bytes of one expert (all its tensors)
    kind: str = "offload"  # the source's name, for the report line
    calls: int = 0
    bytes_ahead: int = 0  # brought by offload_prefetch
    bytes_ahead_used: int = 0  # of those, experts the router then picked
    bytes_on_demand: int = 0  # brought by moe_offload: not resident when the layer's MoE ran
    bytes_on_demand_used: int = 0  # of those, experts this router picked (less under RanksSource: other ranks' too)
    bytes_padding: int = 0  # RanksSource: padding rows of uneven gathers (moved, never resident)

    @property
    def bytes_needed(self) -> int:
        """Bytes of the experts the router picked (each once per call)."""
        return self.bytes_ahead_used + self.bytes_on_demand_used

    @property
    def share_ahead(self) -> float:
        """Share of the needed bytes that were already on the device when the layer's MoE ran."""
        return self.bytes_ahead_used / self.bytes_needed if self.bytes_needed else 0.0

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:.2f} MiB" if n >= 2**20 or not n else f"{n / 2**10:.1f} KiB"
        padding = f", padding {mib(self.bytes_padding)}" if self.bytes_padding else ""
        return (
            f"{self.kind} layer {self.layer} ({self.path}): ahead {mib(self.bytes_ahead)} "
            f"(used {mib(self.bytes_ahead_used)}), on demand {mib(self.bytes_on_demand)}{padding}, "
            f"{self.share_ahead:.0%} of needed bytes ahead, {self.calls} call(s)"
        )


@dataclasses.dataclass(frozen=True)
class Fetch:
    """What a source's fetch did: the experts it makes resident, and what finishes it."""

    experts: list[int]  # resident once ``finish`` ran (may be more than asked for: other ranks' wants)
    finish: Callable[[], None] | None = None  # waits for the transfer (and places the rows); None: done
    padding_rows: int = 0  # rows moved that hold no expert (uneven gathers)


class ExpertSource(Protocol):
    """How experts reach a device buffer; one per store."""

    name: str  # for the report ("offload", "aep gather")

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Take layer ``layer``'s expert tensors; the full ``[E, ...]`` shape and dtype of each role."""

    def fetch(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int], ahead: bool) -> Fetch:
        """Start bringing ``experts`` of ``layer`` into ``buffer`` (role -> ``[E, ...]``)."""

    @property
    def held_bytes(self) -> int:
        """Bytes of expert tensors the source holds (host copies, or this rank's shards)."""


class HostSource:
    """Every expert in host memory (pinned on CUDA), copied row by row; prefetches on a side stream on CUDA."""

    name = "offload"

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[int, dict[str, torch.Tensor]] = {}  # layer -> role -> [E, ...] host memory
        self._side_stream: torch.cuda.Stream | None = None

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
        self.host[layer] = {role: _host_copy(t, self.device) for role, t in tensors.items()}
        return {role: (t.shape, t.dtype) for role, t in self.host[layer].items()}

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.host.values() for t in layer.values())

    def fetch(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int], ahead: bool) -> Fetch:
        if not (ahead and self.device.type == "cuda"):
            self._copy(layer, buffer, experts)
            return Fetch(experts)
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream(self.device))  # layer-2's compute read this buffer
        with torch.cuda.stream(side):
            self._copy(layer, buffer, experts)
            ready = torch.cuda.Event()
            ready.record(side)
        return Fetch(experts, lambda: torch.cuda.current_stream(self.device).wait_event(ready))

    def _copy(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int]) -> None:
        for e in experts:
            for role, t in self.host[layer].items():
                buffer[role][e].copy_(t[e], non_blocking=True)  # [...] one expert, pinned -> device

    def _stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream


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


class OffloadStore:
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


def _host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in host memory: pinned (copied once per tensor) for a CUDA device, else itself."""
    tensor = tensor.detach()
    if device.type != "cuda":
        return tensor  # the parameter already lives in host memory
    if tensor.is_cpu and tensor.is_pinned():
        return tensor
    if tensor not in _PINNED:
        _PINNED[tensor] = tensor.to("cpu").pin_memory()
    return _PINNED[tensor]


def new_store(device: torch.device, source: ExpertSource | None = None) -> OffloadStore:
    """A new store for one compiled graph computing on ``device`` (default source: host memory).

    The registry keeps only a weak reference: whoever compiles the graph must keep the store alive
    as long as the graph (the passes hand it to ``ctx.state["keep_alive"]``).
    """
    device = torch.device(device)
    store = OffloadStore(next(_handles), device, source if source is not None else HostSource(device))
    _STORES[store.handle] = store
    return store


def get_store(handle: int) -> OffloadStore:
    store = _STORES.get(handle)
    if store is None:
        raise RuntimeError(
            f"moe_compile: expert store {handle} is gone: the compiled graph that owned it was freed "
            "(torch._dynamo.reset() or the compiled model dropped); compile the model again"
        )
    return store


def stores() -> list[OffloadStore]:
    """The live stores (one per compiled graph still alive that uses one), oldest first."""
    return [_STORES[h] for h in sorted(_STORES.keys())]


# --- the ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("moe_compile::offload_prefetch", mutates_args=())
def offload_prefetch(predicted_ids: torch.Tensor, store: int, layer: int) -> torch.Tensor:
    """Start bringing the predicted experts (``[T, K]``, union over tokens) into ``layer``'s buffer.

    Returns a token ``int64 [1]`` (the prefetch's sequence number) for ``moe_offload``.
    """
    # NOTE: host sync: the predicted ids are read on the host to choose what to bring.
    # NOTE: collective (RanksSource): the union over ranks, then an async all-gather waited on in moe_offload.
    experts = torch.unique(predicted_ids).tolist()
    seq = get_store(store).prefetch(layer, experts)
    return torch.tensor([seq], dtype=torch.int64)  # [1] on the host: reading it later needs no sync


@offload_prefetch.register_fake
def _offload_prefetch_fake(predicted_ids, store, layer):
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("moe_compile::moe_offload", mutates_args=())
def moe_offload(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    token: torch.Tensor | None,
    store: int,
    layer: int,
    spec: str,
) -> torch.Tensor:
    """The canonical MoE op (``[T, H] -> [T, H]``) on ``layer``'s experts, fetched ahead or on demand."""
    seq = int(token[0]) if token is not None else None  # a host tensor: no sync
    # NOTE: host sync: the routed expert ids are read on the host to bring those not prefetched.
    # NOTE: collective (RanksSource): every rank takes part in the on-demand union and gather, even needing nothing.
    routed = torch.unique(topk_ids).tolist()
    w = get_store(store).experts(layer, seq, routed)  # role -> [E, ...] device buffer
    return moe_torch(
        hidden, topk_ids, topk_weights, w["w_up"], w["w_down"], w.get("b_up"), w.get("b_down"), ExpertSpec.decode(spec)
    )  # [T, H]


@moe_offload.register_fake
def _moe_offload_fake(hidden, topk_ids, topk_weights, token, store, layer, spec):
    torch._check(hidden.dim() == 2, lambda: f"moe_offload: hidden must be [T, H], got {tuple(hidden.shape)}")
    torch._check(topk_weights.shape == topk_ids.shape, lambda: "moe_offload: topk_weights and topk_ids differ in shape")
    return hidden.new_empty(hidden.shape)
