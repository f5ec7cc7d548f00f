"""Single-device expert offload (``offload="cpu"``): experts in host memory, a ring of two device buffers.

Legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden size.

Each compiled graph gets one :class:`OffloadStore`. Per MoE layer (the ``i``-th canonical call in
graph order) it owns the expert tensors in host memory (pinned copies on CUDA; on CPU the
parameters themselves), and per layer parity one device buffer shaped like a whole layer::

    host[layer][role]      [E, ...]   host memory, read only
    ring[layer % 2][role]  [E, ...]   device; rows of the experts resident for its current layer

Experts keep their ids in the buffer (row ``e`` is expert ``e``), so the canonical
:func:`moe_compile.ops.moe_torch` runs on it unchanged; rows of experts not copied for this layer
are stale and never read, since only routed experts are read.

Two ops, both custom ops with fakes, put in the graph by :mod:`moe_compile.passes.offload_experts`
and :mod:`moe_compile.passes.insert_predictors`::

    token = moe_compile.offload_prefetch(predicted_ids [T, K], store, layer)    # int64 [1], on the host
    out   = moe_compile.moe_offload(x [T, H], ids [T, K], weights [T, K], token?, store, layer, spec)

``offload_prefetch`` (at the start of the layer, before attention) claims the layer's buffer and copies
the predicted experts (their union over tokens) into it, on a side stream on CUDA (directly on
CPU); the token carries the prefetch's sequence number. ``moe_offload`` waits for that prefetch,
copies the routed experts that were not prefetched (on demand) and computes. Without a token
(no predictor) it claims the buffer itself and copies every routed expert on demand. The token is a
data dependency: it keeps the prefetch before the compute and stops dead-code elimination; the
graph's data flow (layer ``i``'s residual depends on layer ``i-1``'s MoE output) keeps layer
``i+2``'s prefetch after layer ``i``'s compute, so two buffers suffice.

Every copy is counted per layer (:class:`LayerStats`): bytes copied ahead (and how many of those the
router used), bytes copied on demand. ``moe_compile.last_report().offload`` holds the live stores.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..ops import moe_torch
from ..spec import ExpertSpec

__all__ = ["LayerStats", "OffloadStore", "get_store", "new_store", "stores"]

#: device tensor -> its pinned host copy (CUDA only; shared by recompiles of the same model)
_PINNED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_STORES: dict[int, OffloadStore] = {}
_handles = itertools.count()


@dataclasses.dataclass
class LayerStats:
    """Copies into the device buffer for one MoE layer, summed over calls."""

    layer: int
    path: str
    expert_bytes: int  # bytes of one expert (all its tensors)
    calls: int = 0
    bytes_ahead: int = 0  # copied by offload_prefetch
    bytes_ahead_used: int = 0  # of those, experts the router then picked
    bytes_on_demand: int = 0  # copied by moe_offload: routed but not prefetched

    @property
    def bytes_needed(self) -> int:
        """Bytes of the experts the router picked (each once per call)."""
        return self.bytes_ahead_used + self.bytes_on_demand

    @property
    def share_ahead(self) -> float:
        """Share of the needed bytes that were already on the device when the layer's MoE ran."""
        return self.bytes_ahead_used / self.bytes_needed if self.bytes_needed else 0.0

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:.2f} MiB"
        return (
            f"offload layer {self.layer} ({self.path}): ahead {mib(self.bytes_ahead)} "
            f"(used {mib(self.bytes_ahead_used)}), on demand {mib(self.bytes_on_demand)}, "
            f"{self.share_ahead:.0%} of needed bytes ahead, {self.calls} call(s)"
        )


@dataclasses.dataclass
class _Layer:
    host: dict[str, torch.Tensor]  # role -> [E, ...] in host memory
    stats: LayerStats


@dataclasses.dataclass
class _Buffer:
    tensors: dict[str, torch.Tensor]  # role -> [E, ...] on the device
    owner: tuple[int, int | None] | None = None  # (layer, prefetch sequence number) whose experts it holds
    resident: set[int] = dataclasses.field(default_factory=set)
    ready: torch.cuda.Event | None = None  # CUDA: recorded on the side stream after the prefetch copies


class OffloadStore:
    """Host-resident experts of one compiled graph, its two device buffers and its copy counts."""

    def __init__(self, handle: int, device: torch.device):
        self.handle = handle
        self.device = device
        self.layers: dict[int, _Layer] = {}
        self._ring: list[_Buffer | None] = [None, None]
        self._sequence = itertools.count()
        self._side_stream: torch.cuda.Stream | None = None

    def add_layer(self, layer: int, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Own layer ``layer``'s expert tensors (role -> ``[E, ...]``) in host memory."""
        host = {role: _host_copy(t, self.device) for role, t in tensors.items()}
        per_expert = sum(t[0].numel() * t.element_size() for t in host.values())
        self.layers[layer] = _Layer(host, LayerStats(layer, path, per_expert))

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer.host.values())

    @property
    def buffer_bytes(self) -> int:
        """Device memory of the ring: the two largest layers of opposite parity."""
        sizes = {p: max((sum(t.numel() * t.element_size() for t in l.host.values())
                         for i, l in self.layers.items() if i % 2 == p), default=0) for p in (0, 1)}  # fmt: skip
        return sizes[0] + sizes[1]

    def stats(self) -> list[LayerStats]:
        return [self.layers[i].stats for i in sorted(self.layers)]

    def reset_stats(self) -> None:
        for layer in self.layers.values():
            layer.stats = LayerStats(layer.stats.layer, layer.stats.path, layer.stats.expert_bytes)

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.stats())

    # --- what the ops call ------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Claim layer ``layer``'s buffer and start copying ``experts`` into it; the prefetch's sequence number."""
        seq = next(self._sequence)
        buffer = self._claim(layer, seq)
        if self.device.type == "cuda":
            side = self._stream()
            side.wait_stream(torch.cuda.current_stream(self.device))  # layer-2's compute read this buffer
            with torch.cuda.stream(side):
                self._copy(buffer, layer, experts)
                buffer.ready = torch.cuda.Event()
                buffer.ready.record(side)
        else:
            self._copy(buffer, layer, experts)
        self.layers[layer].stats.bytes_ahead += len(experts) * self.layers[layer].stats.expert_bytes
        return seq

    def experts(self, layer: int, seq: int | None, routed: list[int]) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s buffer with every ``routed`` expert resident (copying the missing ones now)."""
        if seq is None:
            buffer = self._claim(layer, None)
        else:
            buffer = self._ring[layer % 2]
            if buffer is None or buffer.owner != (layer, seq):
                raise RuntimeError(
                    f"offload: layer {layer}'s prefetch {seq} was overwritten before its MoE ran "
                    f"(buffer now holds {buffer.owner if buffer else None}); the graph order breaks the ring of 2"
                )
            if buffer.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(buffer.ready)
        missing = [e for e in routed if e not in buffer.resident]
        self._copy(buffer, layer, missing)
        stats = self.layers[layer].stats
        stats.calls += 1
        stats.bytes_on_demand += len(missing) * stats.expert_bytes
        stats.bytes_ahead_used += (len(routed) - len(missing)) * stats.expert_bytes
        return buffer.tensors

    def _claim(self, layer: int, seq: int | None) -> _Buffer:
        """Layer ``layer``'s ring slot, emptied for it (allocated, or re-allocated for other shapes)."""
        host = self.layers[layer].host
        buffer = self._ring[layer % 2]
        if buffer is None or any(
            role not in buffer.tensors or buffer.tensors[role].shape != t.shape or buffer.tensors[role].dtype != t.dtype
            for role, t in host.items()
        ):
            buffer = _Buffer(
                {role: torch.empty(t.shape, dtype=t.dtype, device=self.device) for role, t in host.items()}
            )
            self._ring[layer % 2] = buffer
        buffer.owner, buffer.resident, buffer.ready = (layer, seq), set(), None
        return buffer

    def _copy(self, buffer: _Buffer, layer: int, experts: list[int]) -> None:
        host = self.layers[layer].host
        for e in experts:
            for role, t in host.items():
                buffer.tensors[role][e].copy_(t[e], non_blocking=True)  # [...] one expert, pinned -> device
        buffer.resident.update(experts)

    def _stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream


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


def new_store(device: torch.device) -> OffloadStore:
    """A new store for one compiled graph computing on ``device``."""
    store = OffloadStore(next(_handles), torch.device(device))
    _STORES[store.handle] = store
    return store


def get_store(handle: int) -> OffloadStore:
    return _STORES[handle]


def stores() -> list[OffloadStore]:
    """Every store made in this process (one per graph compiled with ``offload``), oldest first."""
    return list(_STORES.values())


# --- the ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("moe_compile::offload_prefetch", mutates_args=())
def offload_prefetch(predicted_ids: torch.Tensor, store: int, layer: int) -> torch.Tensor:
    """Copy the predicted experts (``[T, K]``, union over tokens) into ``layer``'s buffer; a token ``int64 [1]``."""
    # NOTE: host sync: the predicted ids are read on the host to choose what to copy.
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
    # NOTE: host sync: the routed expert ids are read on the host to copy those not prefetched.
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
