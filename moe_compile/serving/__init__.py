"""Prefill-only serving: batched scoring, a prefix cache, and routing over data-parallel ranks.

- :class:`PrefillEngine` (``engine.py``): scores :class:`Request` s on one model replica,
  compiled with ``moe_prefill``, reading only the logits it needs.
- ``prefix_cache.py``: keys/values of shared prefixes, LRU-bounded.
- ``batching.py``: packing under a token budget, padded batch tensors.
- ``flops.py`` / ``routing.py``: true-FLOPs cost and the prefix-aware router; the makespan model.
- ``distributed.py``: W ranks each scoring their routed share, gathered.
- ``cli.py`` / ``http.py``: ``moe-compile score`` and ``moe-compile serve``.

See docs/serving.md.
"""

from __future__ import annotations

from .engine import EngineStats, PrefillEngine
from .flops import FlopsModel
from .requests import MalformedRequest, Request, Score
from .routing import POLICIES, Router, RoutingResult, simulate

__all__ = [
    "POLICIES",
    "EngineStats",
    "FlopsModel",
    "MalformedRequest",
    "PrefillEngine",
    "Request",
    "Router",
    "RoutingResult",
    "Score",
    "simulate",
]
