"""Score the pre-attention predictor and the baselines against the router on held-out text.

Methods, each predicting layer ``i``'s top-k experts per token:

- ``pre-attention``: the trained predictor on the residual stream entering layer ``i``;
- ``cross-layer``: the trained predictor on the previous MoE layer's router input (none for the
  first MoE layer: there is no previous layer, which is the case the pre-attention predictor covers);
- ``router``: no training: layer ``i``'s own norm and router, unchanged, applied to the pre-attention
  activation, i.e. ``router(post_attention_layernorm(x))`` instead of
  ``router(post_attention_layernorm(x + attention(x)))``: the real routing with attention's update
  dropped. Applying the router's own norm (not ``input_layernorm``) keeps its input on the scale it
  was trained for;
- ``frequency``: the layer's ``K`` most chosen experts in the training data, for every token.

Metrics per layer, over tokens: ``exact``, the share of tokens whose predicted top-k *set* equals the
router's; ``recall``, the mean of ``|predicted ∩ chosen| / K``. Legend: ``N`` tokens, ``H`` hidden,
``E`` experts, ``K`` experts per token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .collect import RoutingData, collect_routing, router_ids
from .model_info import moe_layers
from .train import PredictorBundle

METHODS = ("pre-attention", "cross-layer", "router", "frequency")


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """How well predicted top-k sets match the router's over ``tokens`` tokens."""

    exact: float  # share of tokens with the exact top-k set
    recall: float  # mean |predicted ∩ chosen| / K
    tokens: int


#: method -> decoder layer index -> accuracy (``None`` where the method has no prediction)
AccuracyTable = dict[str, dict[int, Accuracy | None]]


def topk_accuracy(predicted: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> Accuracy:
    """Compare predicted ids ``[N, K]`` with chosen ids ``[N, K]`` as sets (order ignored)."""
    predicted_mask = torch.zeros(chosen.shape[0], num_experts, dtype=torch.bool).scatter(1, predicted, True)  # [N, E]
    chosen_mask = torch.zeros_like(predicted_mask).scatter(1, chosen, True)  # [N, E]
    hits = (predicted_mask & chosen_mask).sum(-1)  # [N]
    k = chosen.shape[1]
    return Accuracy((hits == k).float().mean().item(), hits.float().mean().item() / k, chosen.shape[0])


def _previous_layers(layers: list[int]) -> dict[int, int]:
    return dict(zip(layers[1:], layers[:-1], strict=True))


@torch.no_grad()
def predictions(model: nn.Module, bundle: PredictorBundle, data: RoutingData) -> dict[str, dict[int, torch.Tensor]]:
    """Every method's predicted ids ``[N, K]`` per layer on the routing ``data`` of ``model``."""
    out: dict[str, dict[int, torch.Tensor]] = {method: {} for method in METHODS}
    previous = _previous_layers(data.layers)
    for moe in moe_layers(model):
        layer, pre = moe.index, data.pre_attention[moe.index]  # [N, H]
        out["pre-attention"][layer] = bundle.pre_attention.predict(layer, pre)
        if layer in bundle.cross_layer.layers:
            out["cross-layer"][layer] = bundle.cross_layer.predict(layer, data.router_input[previous[layer]])
        out["router"][layer] = router_ids(moe.router(moe.norm(pre)), moe.router).long()
        hot = torch.topk(bundle.frequency[layer], moe.top_k).indices  # [K]
        out["frequency"][layer] = hot.expand(pre.shape[0], -1)
    return out


def evaluate(model: nn.Module, bundle: PredictorBundle, chunks: torch.Tensor, progress: bool = True) -> AccuracyTable:
    """Accuracy of every method per MoE layer on token ``chunks`` ``[B, S]`` (held-out text)."""
    data = collect_routing(model, chunks, progress=progress)
    predicted = predictions(model, bundle, data)
    return {
        method: {
            layer: topk_accuracy(per_layer[layer], data.topk[layer], data.num_experts) if layer in per_layer else None
            for layer in data.layers
        }
        for method, per_layer in predicted.items()
    }


def mean_accuracy(table: AccuracyTable, method: str, layers: list[int] | None = None) -> Accuracy | None:
    """Token-weighted mean of ``method``'s accuracy over ``layers`` (default: every layer it covers)."""
    rows = [acc for layer, acc in table[method].items() if acc is not None and (layers is None or layer in layers)]
    if not rows:
        return None
    tokens = sum(acc.tokens for acc in rows)
    exact = sum(acc.exact * acc.tokens for acc in rows) / tokens
    recall = sum(acc.recall * acc.tokens for acc in rows) / tokens
    return Accuracy(exact, recall, tokens)


def format_table(table: AccuracyTable) -> str:
    """The accuracy table as aligned text: one row per layer, two mean rows, an exact/recall pair per method."""
    layers = sorted(next(iter(table.values())))
    later = layers[1:]  # the layers every method covers (cross-layer has no first layer)

    def cells(acc: Accuracy | None) -> str:
        return f"{'n/a':>7} {'n/a':>7}" if acc is None else f"{acc.exact:7.1%} {acc.recall:7.1%}"

    width = 16
    lines = [
        f"{'layer':<{width}}" + "".join(f"  {method:^15}" for method in table),
        f"{'':<{width}}" + "".join(f"  {'exact':>7} {'recall':>7}" for _ in table),
    ]
    for layer in layers:
        lines.append(f"{layer:<{width}}" + "".join(f"  {cells(table[m][layer])}" for m in table))
    lines.append(f"{'mean':<{width}}" + "".join(f"  {cells(mean_accuracy(table, m))}" for m in table))
    if later:
        label = f"mean {later[0]}-{later[-1]}" if len(later) > 1 else f"mean {later[0]}"
        lines.append(f"{label:<{width}}" + "".join(f"  {cells(mean_accuracy(table, m, later))}" for m in table))
    tokens = next(acc.tokens for acc in table["pre-attention"].values() if acc is not None)
    lines.append(f"({tokens} held-out tokens per layer; exact: predicted top-k set == router's; "
                 "recall: |predicted ∩ router's| / k)")  # fmt: skip
    return "\n".join(lines)
