"""Where an expert store's experts come from: the :class:`ExpertSource` protocol and :class:`HostSource`.

A source takes each layer's expert tensors once (:meth:`ExpertSource.add_layer`) and brings the
experts asked for into a device buffer (:meth:`ExpertSource.fetch`), returning a :class:`Fetch`.
:class:`HostSource` keeps them in host memory (``offload="cpu"``); :class:`~.ranks.RanksSource`
keeps this rank's shards and all-gathers (``parallel="aep"`` with a predictor).

:class:`HostSource` owns its host copies (:func:`host_copy`: pinned on CUDA, a plain copy on CPU),
cached weakly by the model's tensor, so that :mod:`moe_compile.passes.offload_experts` can release
the model's tensor (its storage resized to 0 bytes) and a recompile still finds the experts. One
fetch moves the asked-for experts of a layer in one transfer per weight role::

    rows_NX  = host[role].index_select(0, ids_N)       # host gather, into pinned staging on CUDA
    buffer[role].index_copy_(0, ids_N, rows_NX.to(device, non_blocking=True))  # one H2D copy, rows placed
    # every expert asked for (N == E): buffer[role].copy_(host[role]), straight
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["ExpertSource", "Fetch", "HostSource"]

#: model tensor -> the host copy a HostSource owns (pinned on CUDA; shared by recompiles of the same model)
_HOST: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Fetch:
    """What a source's fetch did: the experts it makes resident, and what finishes it."""

    experts: list[int]  # resident once ``finish`` ran (may be more than asked for: other ranks' wants)
    finish: Callable[[], None] | None = None  # waits for the transfer (and places the rows); None: done
    padding_rows: int = 0  # rows moved that hold no expert (uneven gathers)
    transfers: int = 0  # copies / collectives issued (HostSource: one per weight role, 0 when nothing is asked)


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
    """Every expert in host memory (pinned on CUDA), one transfer per weight role and fetch; prefetches on a side stream
    on CUDA."""

    name = "offload"

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[int, dict[str, torch.Tensor]] = {}  # layer -> role -> [E, ...] host memory
        self._side_stream: torch.cuda.Stream | None = None

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
        self.host[layer] = {role: host_copy(t, self.device) for role, t in tensors.items()}
        return {role: (t.shape, t.dtype) for role, t in self.host[layer].items()}

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.host.values() for t in layer.values())

    def fetch(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int], ahead: bool) -> Fetch:
        if not experts:
            return Fetch([])
        if not (ahead and self.device.type == "cuda"):
            return Fetch(experts, transfers=self._copy(layer, buffer, experts))
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream(self.device))  # layer-2's compute read this buffer
        with torch.cuda.stream(side):
            transfers = self._copy(layer, buffer, experts)
            ready = torch.cuda.Event()
            ready.record(side)
        return Fetch(experts, lambda: torch.cuda.current_stream(self.device).wait_event(ready), transfers=transfers)

    def _copy(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int]) -> int:
        """Copy ``experts`` of every role into ``buffer``: one host-to-device transfer per role; how many."""
        host = self.host[layer]
        E = next(iter(host.values())).shape[0]
        if len(experts) == E and sorted(experts) == list(range(E)):
            for role, t in host.items():
                buffer[role].copy_(t, non_blocking=True)  # [E, ...] the whole layer, host -> device
            return len(host)
        pinned = self.device.type == "cuda"
        ids_N = torch.tensor(experts, dtype=torch.long)  # [N]
        ids_dev = ids_N.pin_memory().to(self.device, non_blocking=True) if pinned else ids_N
        for role, t in host.items():
            # pinned staging from the caching host allocator: not reused before its async copy completes
            rows = torch.empty((len(experts), *t.shape[1:]), dtype=t.dtype, pin_memory=pinned)  # [N, ...]
            torch.index_select(t, 0, ids_N, out=rows)  # host gather of the rows
            buffer[role].index_copy_(0, ids_dev, rows.to(self.device, non_blocking=True))  # one transfer, rows placed
        return len(host)

    def _stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream


def host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor``'s values in host memory the store owns (pinned for a CUDA device), copied once per tensor.

    Cached weakly by ``tensor``: the offload pass then releases ``tensor`` (:func:`moe_compile.runtime.shards.release`)
    and a recompile of the same model finds the copy here. A tensor already released with no copy made is an error.
    """
    from ..shards import is_released

    if tensor in _HOST:
        return _HOST[tensor]
    if is_released(tensor):
        raise RuntimeError(
            f"offload: an expert tensor of shape {tuple(tensor.shape)} was released (storage resized to 0) and no "
            "host copy was kept; rebuild the model (or load its weights again) and compile it"
        )
    with torch.no_grad():
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=device.type == "cuda")  # contiguous
        copy.copy_(tensor.detach())
    _HOST[tensor] = copy
    return copy
