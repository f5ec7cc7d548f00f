"""``moe_compile.prepare(model)``: make a model's expert loops traceable.

Dynamo cannot follow an expert loop that depends on routing data (``nonzero``,
boolean masks): the graph breaks at every MoE layer and the backend sees no
block. ``prepare`` switches such models to a form that traces into one graph,
computing the same function:

- families that use transformers' experts interface and were loaded with
  ``experts_implementation="eager"`` are switched to ``"grouped_mm"``.

It returns the model (changed in place) and leaves models it does not know
alone.
"""

from __future__ import annotations

import torch


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) == "eager" and _uses_experts_interface(model):
        model.set_experts_implementation("grouped_mm")
    return model


def _uses_experts_interface(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in model.modules())
