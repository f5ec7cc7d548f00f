"""What the backend found and did, per compiled graph, as a printable report.

A :class:`Report` holds one :class:`BlockReport` per rewritten MoE block and one
:class:`Skipped` per candidate left untouched (with the reason). Reports of the
graphs of one compile are merged by :func:`moe_compile.explain`; the latest one is
also kept for :func:`moe_compile.last_report`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any


@dataclasses.dataclass
class BlockReport:
    path: str  # module path, e.g. "model.layers.3.mlp"
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str  # e.g. "SiLU-gated", "clamped SwiGLU (alpha=1.702, limit=7)"
    layout: str  # e.g. "fused 3D [E,2I,H]/[E,H,I]"
    router: str  # e.g. "softmax -> top-k -> renormalise"
    shared_experts: bool
    implementation: str = "torch"  # which implementation of the canonical op runs
    verified: str = "no"  # how the rewrite was checked, e.g. "probe rel err 3e-08"
    rewrites: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> parameter name
    #: parallel="aep": when this block's expert gather is issued and waited on (issued_after,
    #: waited_before: node names; prefetch_depth; gather_bytes; window_moe_layers; window_flops)
    schedule: dict[str, object] = dataclasses.field(default_factory=dict)
    #: predictor=PATH: the layer's predictor node and what it reads, e.g. "pre-attention of model.layers.3: ..."
    predictor: str = "-"
    #: [fp8] the experts' weight quantization, e.g. "fp8 e4m3 W8A8, 128x128 weight blocks, float32 scales"
    quantization: str = "-"

    def row(self) -> list[str]:
        shared = "yes (dense)" if self.shared_experts else "-"
        return [
            self.path,
            str(self.num_experts),
            str(self.top_k),
            f"{self.hidden_size}/{self.intermediate_size}",
            self.activation,
            self.layout,
            self.router,
            shared,
            self.implementation,
            ", ".join(self.rewrites),
            self.predictor,
        ]


@dataclasses.dataclass
class Skipped:
    where: str  # module path or node name
    reason: str


@dataclasses.dataclass
class Report:
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    graphs: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    #: pass name -> seconds spent in it, in pipeline order, summed over graphs (and over merged reports)
    pass_times: dict[str, float] = dataclasses.field(default_factory=dict)
    #: offload="cpu", or parallel="aep" with a predictor: the expert stores
    #: (moe_compile.runtime.expert_store.ExpertStore), copy counts per layer; weakly held: only the live ones
    offload: WeakList = dataclasses.field(default_factory=lambda: WeakList())
    #: bytes of the model's expert tensors whose storage the passes released (offload; parallel: the full
    #: tensors), i.e. device memory saved on a GPU (on CPU an offloaded tensor's host copy takes the same memory)
    released_bytes: int = 0

    def merge(self, other: Report) -> None:
        self.blocks.extend(other.blocks)
        self.skipped.extend(other.skipped)
        self.graphs += other.graphs
        self.notes.extend(other.notes)
        self.offload.extend(other.offload)
        self.released_bytes += other.released_bytes
        for name, seconds in other.pass_times.items():
            self.pass_times[name] = self.pass_times.get(name, 0.0) + seconds

    def block(self, path: str) -> BlockReport:
        for b in self.blocks:
            if b.path == path:
                return b
        raise KeyError(f"no MoE block at {path!r}; found: {[b.path for b in self.blocks]}")

    def __str__(self) -> str:
        header = ["block", "E", "k", "H/I", "activation", "layout", "router", "shared", "impl", "rewrites", "predictor"]
        lines = [f"moe_compile report: {len(self.blocks)} MoE block(s) in {self.graphs} graph(s)"]
        if self.blocks:
            lines.append(_table(header, [b.row() for b in self.blocks]))
        for s in self.skipped:
            lines.append(f"skipped {s.where}: {s.reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.released_bytes:
            lines.append(f"released: {self.released_bytes / 2**20:.2f} MiB of the model's expert tensors")
        lines.extend(str(store) for store in self.offload)
        return "\n".join(lines)

    __repr__ = __str__


class WeakList:
    """A list of weak references that shows only the items still alive (a report must not keep a store alive)."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []

    def append(self, item: Any) -> None:
        self._refs.append(weakref.ref(item))

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)

    def _live(self) -> list:
        return [item for ref in self._refs if (item := ref()) is not None]

    def __iter__(self):
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())

    def __getitem__(self, index: int) -> Any:
        return self._live()[index]

    def __repr__(self) -> str:
        return repr(self._live())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
