"""Routing statistics: how often each MoE layer's router picks each expert, on sample inputs.

``parallel="aep"`` with ``hot_experts=R`` keeps the ``R`` most used experts of every MoE
layer resident on every rank and gathers only the rest (:mod:`moe_compile.passes.sharded_experts`);
"most used" comes from a file made here::

    stats = moe_compile.collect_routing_stats(model, samples)   # eager runs, forward hooks
    stats.save("routing.safetensors")                           # or: moe-compile routing-stats
    torch.compile(model, backend="moe_prefill",
                  options={"parallel": "aep", "hot_experts": 2, "routing_stats": "routing.safetensors"})

Collection: a forward pre-hook on every experts module (a module named ``experts`` holding
``[E, ...]`` weights, as in transformers' MoE blocks) reads the expert ids ``[T, K]`` it is
called with (the first 2D integer tensor among its inputs) and counts them per expert. The
MoE block is the experts module's parent (its path is the block path of the compile report);
its router is the one 2D ``[E, H]`` parameter of the block outside the experts.

File layout (safetensors, written and checked by :mod:`moe_compile.file_format`)::

    counts.<block path>   [E] int64     (e.g. counts.model.layers.1.mlp)

    metadata: format "moe_compile.routing_stats", format_version "1", checksum,
      model_fingerprint  SHA-256 of model_identity
      model_identity     JSON: model type; per block: experts, router parameter name, router hash
                         (bf16-rounded weights, :func:`moe_compile.predictor.model_info.router_hash`)
      samples            JSON: forward calls and tokens counted

At compile time each block's router weight (found by its parameter name in the graph) is
hashed and compared with the file's: a file made for another model raises
:class:`RoutingStatsError` naming the file and the block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .file_format import FileFormat, read_file, write_file
from .predictor.model_info import fingerprint, router_hash

_MAKE = (
    "make one for this model with moe_compile.collect_routing_stats(model, samples).save(path) "
    "or `moe-compile routing-stats --model DIR --out PATH`"
)


class RoutingStatsError(ValueError):
    """A routing statistics file that cannot be used: missing, corrupted, or made for another model."""


STATS_FORMAT = FileFormat(
    "moe_compile.routing_stats",
    1,
    "routing statistics",
    ("model_fingerprint", "model_identity", "samples"),
    ("model_identity", "samples"),
    _MAKE,
    RoutingStatsError,
)


@dataclasses.dataclass
class RoutingStats:
    """Per MoE block (keyed by its module path), how many times each expert was picked."""

    counts: dict[str, torch.Tensor]  # block path -> [E] int64
    identity: dict[str, Any]  # model_type, blocks: {path: {num_experts, router, router_hash}}
    samples: dict[str, int]  # forward calls and tokens counted
    source: str = "<memory>"  # the file it was loaded from, for messages

    @property
    def blocks(self) -> list[str]:
        return list(self.counts)

    def hot(self, block: str, r: int) -> tuple[int, ...]:
        """The ``r`` most picked experts of ``block`` (ties: the lower id), in ascending id order."""
        counts = self.counts[block].tolist()
        order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        return tuple(sorted(order[: min(r, len(counts))]))

    def hot_share(self, block: str, r: int) -> float:
        """The fraction of the block's routed token-slots that go to its ``r`` hot experts."""
        counts = self.counts[block].tolist()
        total = sum(counts)
        return sum(counts[e] for e in self.hot(block, r)) / total if total else 0.0

    def save(self, path: str | Path) -> None:
        tensors = {f"counts.{block}": c.long().contiguous() for block, c in self.counts.items()}
        metadata = {
            "model_fingerprint": fingerprint(self.identity),
            "model_identity": self.identity,
            "samples": self.samples,
        }
        write_file(tensors, path, STATS_FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        """The statistics in the file at ``path``, checked for integrity (not yet against a model)."""
        tensors, metadata = read_file(path, STATS_FORMAT)
        identity = metadata["model_identity"]
        if fingerprint(identity) != metadata["model_fingerprint"]:
            raise RoutingStatsError(f"{path}: model_identity does not match model_fingerprint; {_MAKE}")
        counts = {name[len("counts.") :]: t for name, t in tensors.items() if name.startswith("counts.")}
        for block, info in identity["blocks"].items():
            if block not in counts or counts[block].shape != (info["num_experts"],):
                raise RoutingStatsError(f"{path}: no counts [{info['num_experts']}] for block {block}; {_MAKE}")
        return cls(counts, identity, metadata["samples"], source=str(path))

    def check_block(self, block: str, num_experts: int, routers: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`RoutingStatsError` unless ``block`` was counted here with the same router.

        ``routers``: parameter name -> real tensor, for the parameters of the graph being compiled.
        """
        blocks = self.identity["blocks"]
        where = f"{self.source}: routing statistics made for another model"
        if block not in blocks:
            raise RoutingStatsError(f"{where}: the file has MoE blocks {sorted(blocks)}, not {block}; {_MAKE}")
        info = blocks[block]
        if info["num_experts"] != num_experts:
            raise RoutingStatsError(
                f"{where}: block {block} has {num_experts} experts, the file counted {info['num_experts']}; {_MAKE}"
            )
        weight = routers.get(info["router"])
        if weight is None:
            raise RoutingStatsError(
                f"{where}: block {block}'s router {info['router']} is not a parameter of the compiled graph; {_MAKE}"
            )
        if router_hash(weight) != info["router_hash"]:
            raise RoutingStatsError(
                f"{where}: the router weights of block {block} ({info['router']}) differ from the file's "
                f"(a different checkpoint); {_MAKE}"
            )

    def checksum(self, r: int) -> int:
        """A 62-bit digest of the hot sets of every block for ``r`` (equal on ranks that agree)."""
        sets = {block: self.hot(block, r) for block in sorted(self.counts)}
        digest = hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 2


@dataclasses.dataclass
class _Block:
    path: str  # the MoE block (the experts module's parent)
    experts: nn.Module
    num_experts: int
    router: str  # parameter name (full, in the model)
    router_weight: torch.Tensor


def _blocks(model: nn.Module) -> list[_Block]:
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if name.rsplit(".", 1)[-1] != "experts" or "." not in name:
            continue
        dims = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
        if len(dims) != 1:
            continue
        (E,) = dims
        path = name.rsplit(".", 1)[0]
        routers = [
            (f"{path}.{n}", p)
            for n, p in modules[path].named_parameters()
            if p.dim() == 2 and p.shape[0] == E and not n.startswith(("experts.", "shared"))
        ]
        if len(routers) != 1:
            raise ValueError(
                f"{type(model).__name__}: MoE block {path} has {len(routers)} [E={E}, H] parameters outside its "
                f"experts ({[n for n, _ in routers]}); expected one router"
            )
        found.append(_Block(path, module, E, *routers[0]))
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no MoE block found (a module named 'experts' holding [E, ...] weights, "
            "whose parent holds one [E, H] router)"
        )
    return found


def _expert_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first 2D integer tensor among an experts module's inputs: the routed ids ``[T, K]``."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
            return value
    return None


@torch.no_grad()
def collect_routing_stats(model: nn.Module, samples: Iterable[Any] | torch.Tensor) -> RoutingStats:
    """Run ``model`` (eager) on ``samples`` and count, per MoE block, how often each expert is picked.

    ``samples``: token ids ``[B, S]`` (one call), or an iterable of calls' inputs (a tensor of token
    ids, or a dict of keyword arguments each).
    """
    blocks = _blocks(model)
    counts = {b.path: torch.zeros(b.num_experts, dtype=torch.int64) for b in blocks}
    seen = {b.path: False for b in blocks}

    def hook(block: _Block):
        def count(module, args, kwargs):
            ids = _expert_ids(args, kwargs)
            if ids is None:
                raise ValueError(f"{block.path}.experts was called without expert ids [T, K]; cannot count routing")
            ids = ids.flatten().long().cpu()
            ids = ids[(ids >= 0) & (ids < block.num_experts)]
            counts[block.path] += torch.bincount(ids, minlength=block.num_experts)
            seen[block.path] = True

        return count

    handles = [b.experts.register_forward_pre_hook(hook(b), with_kwargs=True) for b in blocks]
    calls = tokens = 0
    try:
        for item in [samples] if isinstance(samples, torch.Tensor) else samples:
            inputs = item if isinstance(item, dict) else {"input_ids": item}
            model(**inputs)
            calls += 1
            tokens += int(inputs["input_ids"].numel()) if "input_ids" in inputs else 0
    finally:
        for h in handles:
            h.remove()
    missing = [path for path, hit in seen.items() if not hit]
    if missing:
        raise ValueError(f"MoE block(s) {missing} never ran on the samples; no routing statistics for them")
    config = getattr(model, "config", None)
    identity = {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "blocks": {
            b.path: {"num_experts": b.num_experts, "router": b.router, "router_hash": router_hash(b.router_weight)}
            for b in blocks
        },
    }
    return RoutingStats(counts, identity, {"calls": calls, "tokens": tokens})
