"""Train the pre-attention predictors of a model and the baselines measured beside them.

From one collection of routing data (:func:`.collect.collect_routing`) on sample text:

- ``pre_attention``: per MoE layer ``i``, an :class:`.net.ExpertPredictor` from the residual stream
  entering layer ``i`` (before its attention) to layer ``i``'s router top-k;
- ``cross_layer``: per MoE layer ``i`` after the first, a predictor of the same size from the router
  input of the previous MoE layer (what earlier work and ST-MoE's spatial predictor use);
- ``frequency``: per MoE layer, how often the router chose each expert (the hot-experts baseline).

Both predictor kinds are trained identically: Adam with cosine decay on :func:`.loss.ranking_loss`,
shuffled mini-batches, a fixed seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .collect import RoutingData, collect_routing
from .loss import ranking_loss
from .model_info import model_identity, moe_layers
from .net import DEFAULT_WIDTH, ExpertPredictor, ExpertPredictors
from .progress import progress_bar


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How predictors are trained."""

    width: int = DEFAULT_WIDTH  # hidden units D of each predictor
    epochs: int = 10  # passes over the collected tokens
    batch_size: int = 256  # tokens per optimiser step
    lr: float = 3e-3  # Adam peak learning rate, cosine-decayed to 0
    pairwise_weight: float = 1.0  # weight of the pairwise boundary term of the ranking loss
    seed: int = 0


@dataclasses.dataclass
class PredictorBundle:
    """Everything a predictor file holds: the predictors, the baselines, and what they were trained on."""

    pre_attention: ExpertPredictors
    cross_layer: ExpertPredictors  # keyed by the predicted layer; input: previous MoE layer's router input
    frequency: dict[int, torch.Tensor]  # [E] int64: how often each expert was chosen in the training data
    identity: dict[str, Any]  # model_info.model_identity of the model trained on
    training: dict[str, Any]  # settings and data size, for the record


def fit_predictor(
    inputs: torch.Tensor,
    topk: torch.Tensor,
    num_experts: int,
    config: TrainConfig,
    desc: str,
    progress: bool = True,
) -> ExpertPredictor:
    """Train one predictor from activations ``inputs`` ``[N, H]`` to router choices ``topk`` ``[N, K]``."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        predictor = ExpertPredictor(inputs.shape[1], num_experts, topk.shape[1], config.width)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(inputs.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    bar = progress_bar(range(total), desc, enabled=progress)
    for step in bar:
        if step % steps_per_epoch == 0:
            order = torch.randperm(inputs.shape[0], generator=generator)  # [N]
        batch = order[(step % steps_per_epoch) * config.batch_size :][: config.batch_size]  # [b]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = ranking_loss(predictor(inputs[batch]), topk[batch], config.pairwise_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return predictor.eval()


def frequency_counts(data: RoutingData) -> dict[int, torch.Tensor]:
    """Per MoE layer, router choices per expert ``[E]`` (int64) in ``data``."""
    return {layer: torch.bincount(ids.flatten(), minlength=data.num_experts) for layer, ids in data.topk.items()}


def train_predictors(
    model: nn.Module,
    chunks: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> PredictorBundle:
    """Collect routing on token ``chunks`` ``[B, S]`` and train every predictor and baseline of ``model``."""
    identity = model_identity(model)  # validates the layout before the (slower) collection
    data = collect_routing(model, chunks, progress=progress)
    layers = [moe.index for moe in moe_layers(model)]
    pre_attention, cross_layer = {}, {}
    for position, layer in enumerate(layers):
        pre_attention[layer] = fit_predictor(
            data.pre_attention[layer], data.topk[layer], data.num_experts, config,
            f"layer {layer} pre-attention", progress,
        )  # fmt: skip
        if position > 0:
            previous = layers[position - 1]
            cross_layer[layer] = fit_predictor(
                data.router_input[previous], data.topk[layer], data.num_experts, config,
                f"layer {layer} cross-layer (from {previous})", progress,
            )  # fmt: skip
    training = {**dataclasses.asdict(config), "tokens": data.num_tokens, "seq_len": chunks.shape[1]}
    return PredictorBundle(
        ExpertPredictors(pre_attention), ExpertPredictors(cross_layer), frequency_counts(data), identity, training
    )
