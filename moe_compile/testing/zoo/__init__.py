"""A zoo of tiny, randomly initialised Hugging Face MoE models for tests and benchmarks.

Every entry describes one model family: the config class, kwargs that shrink it to a model that builds and
runs a forward pass in well under a second on a laptop CPU, and the facts a graph-level MoE detector
cares about (router kind, expert weight layout, shared experts, which decoder layers are MoE, and whether
the experts class goes through transformers' ``@use_experts_implementation`` dispatch).

Typical use::

    from moe_compile.testing import zoo

    for name in zoo.names():
        model = zoo.build(name)
        input_ids = zoo.make_inputs(model)
        logits = zoo.logits(model, input_ids)

Builds are deterministic for a given ``seed``. Hugging Face's random init leaves some parameters all-zero
(biases, router weights, score-correction buffers) or, for a few families, uninitialised; :func:`build`
re-draws those from ``normal(0, 0.02)`` so that every routing and expert path contributes to the logits.

Families that only exist in newer transformers releases carry ``min_transformers``; :func:`names` skips
them on older installs.

The package: the family table (:mod:`.families`) and, beside it, the builders (:mod:`.builders`).
"""

from __future__ import annotations

from .builders import _redraw_degenerate, _uninitialized_memory_is_nan, build, build_dense, logits, make_inputs
from .families import ZooEntry, get, moe_layer_indices, names

__all__ = ["ZooEntry", "build", "build_dense", "get", "logits", "make_inputs", "moe_layer_indices", "names"]
# helpers tests reuse for their own builds (non-degenerate weights, NaN-filled uninitialised memory)
_HELPERS = (_redraw_degenerate, _uninitialized_memory_is_nan)
