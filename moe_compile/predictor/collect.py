"""Collect (pre-attention activation, router top-k) pairs by running a model with forward hooks.

For every MoE decoder layer ``i`` and every token, three tensors are recorded:

- ``pre_attention[i]``: the residual stream entering layer ``i``, i.e. the input of its
  ``input_layernorm`` (a forward pre-hook on the decoder layer);
- ``router_input[i]``: what the router saw, ``post_attention_layernorm(residual + attention)``
  (the router's input, from a forward hook on the router);
- ``topk[i]``: the experts the router chose, best first (the last item of the router's output).

No graph is involved: this runs the eager model. Legend: ``B`` chunks, ``S`` tokens per chunk,
``N = B*S`` tokens, ``H`` hidden size, ``K`` experts per token.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from .model_info import moe_layers
from .progress import progress_bar


@dataclasses.dataclass
class RoutingData:
    """Per MoE layer (keyed by decoder layer index), the same ``N`` tokens in the same order."""

    pre_attention: dict[int, torch.Tensor]  # [N, H] float32
    router_input: dict[int, torch.Tensor]  # [N, H] float32
    topk: dict[int, torch.Tensor]  # [N, K] int64, best first
    num_experts: int

    @property
    def layers(self) -> list[int]:
        return sorted(self.topk)

    @property
    def num_tokens(self) -> int:
        return next(iter(self.topk.values())).shape[0]


def router_ids(output: object, router: nn.Module) -> torch.Tensor:
    """The expert ids ``[T, K]`` in a router's output (a tuple whose last item they are)."""
    ids = output[-1] if isinstance(output, tuple) else None
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise ValueError(
            f"{type(router).__name__}: expected the router to return a tuple ending with expert ids [T, K]; "
            f"got {type(output).__name__}"
        )
    return ids


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    chunks: torch.Tensor,
    batch_size: int = 16,
    progress: bool = True,
) -> RoutingData:
    """Run ``model`` on token ``chunks`` ``[B, S]`` and record every MoE layer's activations and routing."""
    layers = moe_layers(model)
    recorded: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    handles = []

    def on_layer(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, S, H]
            recorded["pre_attention"][index].append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())

        return hook

    def on_router(index: int):
        def hook(module, args, output):
            hidden = args[0]  # [T, H] (or [B, S, H])
            recorded["router_input"][index].append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())
            recorded["topk"][index].append(router_ids(output, module).detach().long().cpu())

        return hook

    for moe in layers:
        handles.append(moe.layer.register_forward_pre_hook(on_layer(moe.index), with_kwargs=True))
        handles.append(moe.router.register_forward_hook(on_router(moe.index)))
    device = next(model.parameters()).device
    try:
        for start in progress_bar(range(0, chunks.shape[0], batch_size), "collect routing", enabled=progress):
            model(input_ids=chunks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    data = {
        kind: {index: torch.cat(parts) for index, parts in per_layer.items()} for kind, per_layer in recorded.items()
    }
    return RoutingData(data["pre_attention"], data["router_input"], data["topk"], num_experts=layers[0].num_experts)
