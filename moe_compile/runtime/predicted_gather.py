"""Moved: :class:`RanksSource` is in :mod:`moe_compile.runtime.expert_store.ranks` (re-exported here)."""

from __future__ import annotations

from .expert_store.ranks import RanksSource

__all__ = ["RanksSource"]
