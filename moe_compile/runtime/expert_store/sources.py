"""Where an expert store's experts come from: the :class:`ExpertSource` protocol and :class:`HostSource`.

A source takes each layer's expert tensors once (:meth:`ExpertSource.add_layer`) and brings the
experts asked for into a device buffer (:meth:`ExpertSource.fetch`), returning a :class:`Fetch`.
:class:`HostSource` keeps them in host memory (``offload="cpu"``); :class:`~.ranks.RanksSource`
keeps this rank's shards and all-gathers (``parallel="aep"`` with a predictor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["ExpertSource", "Fetch", "HostSource"]

#: device tensor -> its pinned host copy (CUDA only; shared by recompiles of the same model)
_PINNED: WeakIdKeyDictionary = WeakIdKeyDictionary()


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
