"""Building a zoo entry: a tiny model in eval mode with deterministic, non-degenerate random weights
(:func:`build`, :func:`build_dense`), its inputs (:func:`make_inputs`) and logits (:func:`logits`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from .families import _DENSE, ZooEntry, get

_INIT_STD = 0.02
# Float buffers that feed the router and are zero after a fresh init; randomised like parameters.
_ROUTER_BUFFERS = re.compile(r"(e_score_correction_bias|expert_bias)$")


def build(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int | None = None,
    experts_implementation: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Build the tiny model ``name`` in eval mode with deterministic, non-degenerate random weights.

    ``overrides`` replaces config kwargs of the entry (e.g. ``{"num_experts_per_tok": 1}``).
    """
    entry = get(name)
    if overrides:
        entry = dataclasses.replace(entry, kwargs={**entry.kwargs, **overrides})
    return _build(entry, dtype=dtype, seed=seed, num_layers=num_layers, experts_implementation=experts_implementation)


def build_dense(*, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A tiny dense Llama: a model with no MoE block at all."""
    return _build(_DENSE, dtype=dtype, seed=seed, num_layers=None, experts_implementation=None)


def make_inputs(model: PreTrainedModel, batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, seq]`` for ``model``."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab_size, (batch, seq), generator=generator).to(model.device)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for ``input_ids``; encoder-decoder models also decode ``input_ids``.

    ``model`` may be the output of ``torch.compile`` around a zoo model.
    """
    if model.config.is_encoder_decoder:
        return model(input_ids=input_ids, decoder_input_ids=input_ids).logits
    return model(input_ids=input_ids).logits


def _build(
    entry: ZooEntry,
    *,
    dtype: torch.dtype,
    seed: int,
    num_layers: int | None,
    experts_implementation: str | None,
) -> PreTrainedModel:
    kwargs = copy.deepcopy(entry.kwargs)  # configs may mutate nested dicts such as ``rope_parameters``
    if num_layers is not None:
        for key in entry.num_layers_keys:
            kwargs = _with_num_layers(kwargs, key, num_layers)
    config = getattr(transformers, entry.config_cls_name)(**kwargs)
    model_cls = getattr(transformers, entry.model_cls_name)
    from_config_kwargs: dict[str, Any] = {"dtype": dtype}
    if experts_implementation is not None:
        from_config_kwargs["experts_implementation"] = experts_implementation
    torch.manual_seed(seed)
    with _uninitialized_memory_is_nan():
        if entry.model_cls_name.startswith("Auto"):
            model = model_cls.from_config(config, **from_config_kwargs)
        else:
            model = model_cls._from_config(config, **from_config_kwargs)
    _redraw_degenerate(model, seed)
    return model.eval()


def _with_num_layers(kwargs: dict[str, Any], key: str, num_layers: int) -> dict[str, Any]:
    """Set the layer count at the dotted ``key``, tiling per-layer list kwargs (e.g. ``layer_types``) to match."""
    head, _, rest = key.partition(".")
    if rest:
        return {**kwargs, head: _with_num_layers(kwargs[head], rest, num_layers)}
    old = kwargs[key]
    resized = {
        k: [v[i % old] for i in range(num_layers)] if isinstance(v, list) and len(v) == old else v
        for k, v in kwargs.items()
    }
    resized[key] = num_layers
    return resized


@contextlib.contextmanager
def _uninitialized_memory_is_nan() -> Iterator[None]:
    """Make ``torch.empty`` return NaN so that parameters the HF init skips are detectably degenerate."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


@torch.no_grad()
def _redraw_degenerate(model: torch.nn.Module, seed: int) -> None:
    """Re-draw non-finite or all-zero float parameters (and zero router bias buffers) from normal(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + [
        (name, buf) for name, buf in model.named_buffers() if _ROUTER_BUFFERS.search(name)
    ]
    for _, tensor in tensors:
        if tensor.is_floating_point() and (not torch.isfinite(tensor).all() or not tensor.any()):
            fresh = torch.randn(tensor.shape, generator=generator) * _INIT_STD
            tensor.copy_(fresh.to(tensor.device, tensor.dtype))
