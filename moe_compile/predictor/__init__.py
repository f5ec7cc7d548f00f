"""Pre-attention expert predictors: predict a MoE layer's experts before its attention runs.

The residual stream entering decoder layer ``i`` (before ``input_layernorm``) predicts which experts
layer ``i``'s router will pick (paper 2 in ``docs/background.md``), so expert weights can start moving
while attention runs, for the first MoE layer too. See ``docs/predictors.md``.

::

    from moe_compile.predictor import load_model, text_chunks, train_predictors, save_bundle, load_predictors

    model = load_model()                                        # the shipped tiny MoE (trained on the stdlib)
    bundle = train_predictors(model, text_chunks(None, "train", 128, 65536))
    save_bundle(bundle, "predictors.safetensors")
    predictors = load_predictors("predictors.safetensors", model)   # checks the model fingerprint
    ids = predictors.predict(0, hidden)                         # [T, H] -> [T, K] expert ids

Modules: :mod:`.corpus` (stdlib text as bytes), :mod:`.tiny_moe` and :mod:`.train_lm` (the shipped
model), :mod:`.model_info` (MoE layers, fingerprint), :mod:`.collect` (hooks), :mod:`.net` (the
predictor), :mod:`.loss` (ranking loss), :mod:`.train`, :mod:`.checkpoint` (files), :mod:`.evaluate`
(accuracy and baselines), :mod:`.cli` (``train-predictor``, ``eval-predictor``).
"""

from __future__ import annotations

from .checkpoint import (
    PredictorFileError,
    load_bundle,
    load_predictors,
    load_predictors_for_routers,
    read_metadata,
    save_bundle,
)
from .collect import RoutingData, collect_routing
from .corpus import text_chunks
from .evaluate import Accuracy, evaluate, format_table, mean_accuracy, topk_accuracy
from .loss import ranking_loss
from .model_info import fingerprint, model_identity, moe_layers
from .net import ExpertPredictor, ExpertPredictors, PredictorWeights, predict_topk, predictor_scores
from .tiny_moe import TINY_MOE_DIR, load_model
from .train import PredictorBundle, TrainConfig, train_predictors

__all__ = [
    "TINY_MOE_DIR",
    "Accuracy",
    "ExpertPredictor",
    "ExpertPredictors",
    "PredictorBundle",
    "PredictorFileError",
    "PredictorWeights",
    "RoutingData",
    "TrainConfig",
    "collect_routing",
    "evaluate",
    "fingerprint",
    "format_table",
    "load_bundle",
    "load_model",
    "load_predictors",
    "load_predictors_for_routers",
    "mean_accuracy",
    "model_identity",
    "moe_layers",
    "predict_topk",
    "predictor_scores",
    "ranking_loss",
    "read_metadata",
    "save_bundle",
    "text_chunks",
    "topk_accuracy",
    "train_predictors",
]
