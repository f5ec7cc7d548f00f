"""Where a model's MoE layers and routers are, and a fingerprint that tells one model from another.

Supported layout (Qwen2/3-MoE, Mixtral, OLMoE and the like): the decoder layers are ``model.layers``
(found through ``get_decoder()``), each has ``input_layernorm`` and ``post_attention_layernorm``, and
a MoE layer's ``mlp.gate`` is the router: ``weight [E, H]``, ``top_k``, and a forward returning a tuple
whose last item is the chosen expert ids ``[T, K]``, best first.

The fingerprint is the SHA-256 of a small JSON description (:func:`model_identity`): the model type and
the sizes a predictor depends on, plus one hash per router of its weights rounded to bf16 (so the same
checkpoint loaded in fp32 or bf16 has the same fingerprint). Router weights are tiny next to the experts,
cheap to hash on any model, and differ between any two trained checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class MoELayer:
    """One MoE decoder layer.

    - ``layer``: the decoder layer; its first input is the pre-attention residual stream ``[B, S, H]``.
    - ``norm``: ``post_attention_layernorm``, the norm in front of the router.
    - ``router``: ``mlp.gate``.
    """

    index: int
    layer: nn.Module
    norm: nn.Module
    router: nn.Module
    num_experts: int
    top_k: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (or of its base model)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer list (expected get_decoder().layers)")
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model``, in order; ``ValueError`` when it has none in the supported layout."""
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        router = getattr(getattr(layer, "mlp", None), "gate", None)
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not hasattr(router, "top_k"):
            continue
        norm = getattr(layer, "post_attention_layernorm", None)
        if norm is None or not hasattr(layer, "input_layernorm"):
            continue
        found.append(MoELayer(index, layer, norm, router, num_experts=weight.shape[0], top_k=int(router.top_k)))
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no MoE layer in the supported layout (decoder layers with input_layernorm, "
            "post_attention_layernorm and a router at mlp.gate with weight [E, H] and top_k)"
        )
    return found


def router_hash(tensor: torch.Tensor) -> str:
    """Short SHA-256 of a router weight rounded to bf16 (how identities record routers)."""
    data = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a predictor file records about the model it was trained on (JSON-serialisable)."""
    layers = moe_layers(model)
    if len({(moe.num_experts, moe.top_k) for moe in layers}) != 1:
        raise ValueError(f"{type(model).__name__}: MoE layers with different expert counts or top-k are not supported")
    config = model.config.get_text_config()
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "moe_layers": [moe.index for moe in layers],
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "routers": {str(moe.index): router_hash(moe.router.weight) for moe in layers},
    }


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 (hex) of a :func:`model_identity` description."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between a recorded and an actual identity, one line each."""
    lines = []
    for key in sorted(set(recorded) | set(actual)):
        if key == "routers":
            continue
        if recorded.get(key) != actual.get(key):
            lines.append(f"{key}: file has {recorded.get(key)!r}, model has {actual.get(key)!r}")
    old, new = recorded.get("routers", {}), actual.get("routers", {})
    changed = sorted((layer for layer in set(old) & set(new) if old[layer] != new[layer]), key=int)
    if changed:
        lines.append(f"router weights differ in layer(s) {', '.join(changed)} (a different checkpoint)")
    return lines
