"""Predictor files: safetensors with metadata, checked against the model they are loaded for.

Layout of a file (safetensors only; nothing is unpickled)::

    pre_attention.<layer>.up.weight    [D, H]  float32      (one group per MoE layer)
    pre_attention.<layer>.up.bias      [D]
    pre_attention.<layer>.down.weight  [E, D]
    pre_attention.<layer>.down.bias    [E]
    cross_layer.<layer>.up.weight ...                       (baseline; every MoE layer but the first)
    frequency.<layer>                  [E]     int64        (baseline: router choices per expert)

    metadata (all strings):
      format            "moe_compile.expert_predictors"
      format_version    "1"
      model_fingerprint SHA-256 of model_identity (model_info.fingerprint)
      model_identity    JSON: model type, layer count, hidden size, vocab, MoE layers, experts, top-k,
                        one hash per router's weights
      predictor         JSON: hidden_size, num_experts, top_k, width, norm_eps, activation, input
      layers            JSON: the layers of each kind
      training          JSON: TrainConfig, tokens, sequence length
      checksum          SHA-256 over every tensor's name, dtype, shape and bytes

Loading checks, in order: the file exists and safetensors can parse it; the format and version; the
checksum (a flipped or truncated byte is caught here); the fingerprint against the model (a
mismatch lists what differs); the tensor names and shapes. Each failure raises
:class:`PredictorFileError` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..file_format import FileFormat, read_file, write_file
from .model_info import fingerprint, identity_differences, model_identity, router_hash
from .net import NORM_EPS, ExpertPredictor, ExpertPredictors
from .train import PredictorBundle

FORMAT = "moe_compile.expert_predictors"
FORMAT_VERSION = 1
KINDS = ("pre_attention", "cross_layer")
_JSON_FIELDS = ("model_identity", "predictor", "layers", "training")
_RETRAIN = "re-create it with `moe-compile train-predictor`"


class PredictorFileError(ValueError):
    """A predictor file that cannot be used: missing, unreadable, corrupted, or made for another model."""


def save_bundle(bundle: PredictorBundle, path: str | Path) -> None:
    """Write ``bundle`` to ``path`` (parent directories are created)."""
    tensors: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        for name, tensor in getattr(bundle, kind).by_layer.state_dict().items():
            tensors[f"{kind}.{name}"] = tensor.detach().float().contiguous()
    for layer, counts in bundle.frequency.items():
        tensors[f"frequency.{layer}"] = counts.long().contiguous()
    first = bundle.pre_attention[bundle.pre_attention.layers[0]]
    predictor = {
        "hidden_size": first.up.in_features,
        "num_experts": first.down.out_features,
        "top_k": first.top_k,
        "width": first.up.out_features,
        "norm_eps": NORM_EPS,
        "activation": "gelu",
        "input": "pre_attention residual (input of input_layernorm)",
    }
    layers = {kind: getattr(bundle, kind).layers for kind in KINDS} | {"frequency": sorted(bundle.frequency)}
    metadata = {
        "model_fingerprint": fingerprint(bundle.identity),
        "model_identity": bundle.identity,
        "predictor": predictor,
        "layers": layers,
        "training": bundle.training,
    }
    write_file(tensors, path, PREDICTOR_FORMAT, metadata)


PREDICTOR_FORMAT = FileFormat(
    FORMAT,
    FORMAT_VERSION,
    "predictor",
    ("model_fingerprint", "model_identity", "predictor", "layers"),
    _JSON_FIELDS,
    _RETRAIN,
    PredictorFileError,
)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of the predictor file at ``path``, JSON fields decoded (no model needed)."""
    return read_file(path, PREDICTOR_FORMAT)[1]


def _check_model(path: Path, metadata: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``model``'s identity; :class:`PredictorFileError` listing the differences when it is not the file's model."""
    actual = model_identity(model)
    if fingerprint(actual) == metadata["model_fingerprint"]:
        return actual
    differences = identity_differences(metadata["model_identity"], actual)
    details = "".join(f"\n  - {line}" for line in differences) or "\n  - the fingerprints differ"
    raise PredictorFileError(
        f"{path}: predictors made for another model (fingerprint {metadata['model_fingerprint'][:12]}, "
        f"model's {fingerprint(actual)[:12]}):{details}\nTrain predictors for this model with "
        "`moe-compile train-predictor`"
    )


_SIZES = ("hidden_size", "num_experts", "top_k", "width")


def _layout(path: Path, metadata: dict[str, Any]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The file's predictor sizes and layer lists, checked to be plain bounded values (nothing allocated yet)."""
    sizes, layers = metadata["predictor"], metadata["layers"]
    if not isinstance(sizes, dict) or not all(_small_int(sizes.get(key), 1) for key in _SIZES):
        raise PredictorFileError(
            f"{path}: metadata 'predictor' must give {', '.join(_SIZES)} as integers >= 1; {_RETRAIN}"
        )
    if sizes["top_k"] > sizes["num_experts"]:
        raise PredictorFileError(f"{path}: metadata 'predictor' has top_k > num_experts; {_RETRAIN}")
    kinds = (*KINDS, "frequency")
    if not isinstance(layers, dict) or not all(
        isinstance(layers.get(kind), list) and all(_small_int(layer, 0) for layer in layers[kind]) for kind in kinds
    ):
        raise PredictorFileError(
            f"{path}: metadata 'layers' must map {', '.join(kinds)} to lists of layer indices; {_RETRAIN}"
        )
    return sizes, layers


def _small_int(value: Any, low: int) -> bool:
    return type(value) is int and low <= value < 2**31


def _build(path: Path, tensors: dict[str, torch.Tensor], kind: str, layers: list[int], sizes: dict) -> ExpertPredictors:
    predictors = {}
    H, E, width = sizes["hidden_size"], sizes["num_experts"], sizes["width"]
    for layer in layers:
        # the sizes must be the tensors' own before a predictor of those sizes is allocated
        expected = {"up.weight": (width, H), "up.bias": (width,), "down.weight": (E, width), "down.bias": (E,)}
        for name, shape in expected.items():
            tensor = tensors.get(f"{kind}.{layer}.{name}")
            if tensor is not None and tuple(tensor.shape) != shape:
                raise PredictorFileError(
                    f"{path}: metadata 'predictor' sizes (hidden_size {H}, num_experts {E}, width {width}) do not "
                    f"match the tensors ({kind}.{layer}.{name} is {list(tensor.shape)}); {_RETRAIN}"
                )
        predictor = ExpertPredictor(sizes["hidden_size"], sizes["num_experts"], sizes["top_k"], sizes["width"])
        prefix = f"{kind}.{layer}."
        state = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        try:
            predictor.load_state_dict(state)
        except RuntimeError as err:
            raise PredictorFileError(f"{path}: bad tensors for {kind} layer {layer}: {err}") from None
        predictors[layer] = predictor.eval()
    return ExpertPredictors(predictors)


def load_bundle(path: str | Path, model: nn.Module) -> PredictorBundle:
    """The predictors and baselines in the file at ``path``, checked to be made for ``model``."""
    path = Path(path)
    tensors, metadata = read_file(path, PREDICTOR_FORMAT)
    identity = _check_model(path, metadata, model)
    sizes, layers = _layout(path, metadata)
    kinds = {kind: _build(path, tensors, kind, layers[kind], sizes) for kind in KINDS}
    missing = [layer for layer in layers["frequency"] if f"frequency.{layer}" not in tensors]
    if missing:
        raise PredictorFileError(f"{path}: no frequency counts for layer(s) {missing}")
    frequency = {layer: tensors[f"frequency.{layer}"] for layer in layers["frequency"]}
    return PredictorBundle(
        kinds["pre_attention"], kinds["cross_layer"], frequency, identity, metadata.get("training", {})
    )


def load_predictors(path: str | Path, model: nn.Module) -> ExpertPredictors:
    """The pre-attention predictors in the file at ``path`` (one per MoE layer), checked against ``model``.

    ``load_predictors(path, model).predict(layer_idx, hidden)`` gives layer ``layer_idx``'s predicted
    expert ids ``[..., K]`` from the residual stream ``hidden`` ``[..., H]`` entering that layer.
    """
    return load_bundle(path, model).pre_attention


def load_predictors_for_routers(path: str | Path, router_weights: Mapping[int, torch.Tensor]) -> ExpertPredictors:
    """The pre-attention predictors in ``path``, checked against router weights instead of a model.

    For callers that hold a graph rather than the ``nn.Module`` (a compiler pass): ``router_weights``
    maps each MoE layer's decoder layer index to its router weight ``[E, H]``. The file must have been
    made for exactly these routers (same layers, same weights up to bf16 rounding).
    """
    path = Path(path)
    tensors, metadata = read_file(path, PREDICTOR_FORMAT)
    recorded = metadata["model_identity"]["routers"]
    actual = {str(layer): router_hash(weight) for layer, weight in router_weights.items()}
    if set(recorded) != set(actual):
        raise PredictorFileError(
            f"{path}: predictors made for another model: the file has MoE layers {sorted(map(int, recorded))}, "
            f"the graph's routers are in layers {sorted(map(int, actual))}"
        )
    changed = sorted((layer for layer in recorded if recorded[layer] != actual[layer]), key=int)
    if changed:
        raise PredictorFileError(
            f"{path}: predictors made for another model: router weights differ in layer(s) {', '.join(changed)}"
        )
    sizes, layers = _layout(path, metadata)
    return _build(path, tensors, "pre_attention", layers["pre_attention"], sizes)
