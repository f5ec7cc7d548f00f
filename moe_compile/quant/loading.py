"""Load a block-fp8 checkpoint directory with its weights kept in fp8 (any device, the CPU included).

transformers dequantizes an fp8 checkpoint to bf16 when it loads it on a CPU (twice the memory) and its fp8
modules need a Hub kernel to run. :func:`load_fp8_model` instead:

1. reads ``config.json`` and checks its ``quantization_config`` (:func:`fp8_block_size`):
   ``quant_method="fp8"``, ``fmt="e4m3"``, ``activation_scheme="dynamic"``, ``weight_block_size=[128, 128]``;
2. builds the model on the meta device and runs transformers' ``replace_with_fp8_linear`` (``FP8Experts``,
   ``FP8Linear``; ``modules_to_not_convert`` from the config, else ``lm_head``);
3. reads every tensor as stored (:class:`CheckpointTensors`: safetensors, no upcast): fp8 weights stay e4m3,
   their ``weight_scale_inv`` become fp32 (bf16 and ue8m0 scales converted exactly), the rest is cast to
   the dtype the model gives the parameter (``dtype``, or what the model keeps in fp32). Experts stored one
   tensor per expert (Qwen3-FP8: ``experts.{e}.gate_proj.weight``...) are stacked, gate then up,
   scales alike; fused ``gate_up_proj`` tensors are taken as they are;
4. runs :func:`moe_compile.prepare` (the fp8 modules become ``moe_compile::moe_fp8`` / ``fp8_linear``).

Refused with one line naming the tensor: a block size other than 128x128, a missing ``weight_scale_inv``,
a scale whose shape is not the weight's block grid, a missing tensor.

:class:`CheckpointTensors` reads one tensor (or one expert's slice of a stacked one) at a time; a loader that
gives each AEP rank only its own experts (the sharded loader of the deployable-serving issue) can share it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .fp8 import FP8_DTYPE, SUPPORTED_BLOCKS, check_weight_scales, scales_to_float32

__all__ = ["CheckpointTensors", "fp8_block_size", "is_fp8_checkpoint", "load_fp8_model"]


def _quantization_config(path: Path) -> dict | None:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc


def is_fp8_checkpoint(path: str | Path) -> bool:
    """Whether ``path/config.json`` declares fp8 quantization (``quant_method == "fp8"``)."""
    qc = _quantization_config(Path(path))
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def fp8_block_size(qc: dict, where: str = "quantization_config") -> tuple[int, int]:
    """The checked block of an fp8 ``quantization_config`` (ValueError naming what is wrong and what is supported)."""
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"{where}: quant_method={qc.get('quant_method')!r}, expected 'fp8'")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}: fmt={qc.get('fmt')!r} is not supported; fp8 weights must be e4m3")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"{where}: activation_scheme={qc.get('activation_scheme')!r} is not supported; "
            "only dynamic (per-token, per-128-channel) activation scales"
        )
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise ValueError(f"{where}: expert_dtype={qc.get('expert_dtype')!r} (FP4 experts) is not supported")
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError(f"{where}: no weight_block_size (per-tensor fp8) is not supported; only block-scaled fp8")
    block = tuple(int(b) for b in block)
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(
            f"{where}: weight_block_size {list(block)} is not supported; moe_compile runs block fp8 with "
            f"{' or '.join(str(list(b)) for b in SUPPORTED_BLOCKS)} blocks (DeepSeek-V3, Qwen3-FP8)"
        )
    return block


class CheckpointTensors:
    """The tensors of a safetensors checkpoint directory, read one at a time as stored (no dtype change)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files")
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._where = {key: f for f, h in self._handles.items() for key in h.keys()}  # noqa: SIM118 - a safe_open handle, not a dict

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension (an expert range of a stacked tensor), reading only those."""
        return self._handles[self._where[key]].get_slice(key)[start:stop]


def _need(tensors: CheckpointTensors, key: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{tensors.path}: {key} is missing ({what})")
    return tensors.get(key)


def _scale(tensors: CheckpointTensors, weight_key: str) -> torch.Tensor:
    key = weight_key.removesuffix(".weight") + (".weight_scale_inv" if weight_key.endswith(".weight") else "_scale_inv")
    return scales_to_float32(_need(tensors, key, "the block scales of an fp8 weight"), key)


def _fp8(tensors: CheckpointTensors, key: str) -> torch.Tensor:
    t = _need(tensors, key, "an fp8 weight")
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{tensors.path}: {key} is {t.dtype}, expected float8_e4m3fn in an fp8 checkpoint")
    return t


def _load_experts(tensors: CheckpointTensors, name: str, module: nn.Module, block: tuple[int, int]) -> None:
    gated = bool(getattr(module, "has_gate", True))
    E = module.num_experts
    fused = f"{name}.gate_up_proj" if gated else f"{name}.up_proj"
    if fused in tensors:  # already stacked
        roles = {fused.rpartition(".")[2]: (fused, 2 if gated else 1), "down_proj": (f"{name}.down_proj", 1)}
        for role, (key, halves) in roles.items():
            w, s = _fp8(tensors, key), _scale(tensors, key)
            check_weight_scales(key, w, s, block, halves)
            setattr(module, role, nn.Parameter(w, requires_grad=False))
            setattr(module, f"{role}_scale_inv", nn.Parameter(s, requires_grad=False))
        return
    parts = (("gate_proj", "up_proj") if gated else ("up_proj",), ("down_proj",))
    for role, projections in zip(("gate_up_proj" if gated else "up_proj", "down_proj"), parts, strict=True):
        ws, ss = [], []
        for e in range(E):
            w_rows, s_rows = [], []
            for proj in projections:
                key = f"{name}.{e}.{proj}.weight"
                w, s = _fp8(tensors, key), _scale(tensors, key)
                check_weight_scales(key, w, s, block)  # each projection has its own grid
                w_rows.append(w)
                s_rows.append(s)
            ws.append(torch.cat(w_rows))
            ss.append(torch.cat(s_rows))
        w, s = torch.stack(ws), torch.stack(ss)
        check_weight_scales(f"{name}.{role}", w, s, block, 2 if len(projections) == 2 else 1)
        setattr(module, role, nn.Parameter(w, requires_grad=False))
        setattr(module, f"{role}_scale_inv", nn.Parameter(s, requires_grad=False))


def _load_linear(tensors: CheckpointTensors, name: str, module: nn.Module, block, dtype) -> None:
    key = f"{name}.weight"
    w, s = _fp8(tensors, key), _scale(tensors, key)
    check_weight_scales(key, w, s, block)
    module.weight = nn.Parameter(w, requires_grad=False)
    module.weight_scale_inv = nn.Parameter(s, requires_grad=False)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(_need(tensors, f"{name}.bias", "a bias").to(dtype), requires_grad=False)


def _materialize_buffers(model: nn.Module, config) -> None:
    """Buffers left on the meta device that the checkpoint does not hold (rotary tables, computed at
    construction) rebuilt on the CPU by constructing their module again."""
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        try:
            fresh = type(module)(config=config)
        except Exception as why:  # noqa: BLE001 - any failure is reported with the module
            raise ValueError(f"cannot rebuild the buffers {meta} of {name} ({type(module).__name__}): {why}") from why
        for b in meta:
            setattr(module, b, getattr(fresh, b))


def load_fp8_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The causal LM in ``path`` with its fp8 weights kept in fp8, prepared for ``moe_prefill`` (module doc)."""
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear, replace_with_fp8_linear

    import moe_compile

    path = Path(path)
    qc = _quantization_config(path)
    if not isinstance(qc, dict):
        raise ValueError(f"{path}/config.json has no quantization_config: not an fp8 checkpoint")
    block = fp8_block_size(qc, f"{path}/config.json quantization_config")
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_with_fp8_linear(
        model,
        modules_to_not_convert=qc.get("modules_to_not_convert") or ["lm_head"],
        quantization_config=FineGrainedFP8Config(weight_block_size=block, activation_scheme="dynamic"),
        pre_quantized=True,
    )
    tensors = CheckpointTensors(path)
    for name, module in model.named_modules():
        if isinstance(module, FP8Experts):
            _load_experts(tensors, name, module, block)
        elif isinstance(module, FP8Linear):
            _load_linear(tensors, name, module, block, dtype)
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if name not in tensors:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise ValueError(f"{path}: {name} is missing from the checkpoint")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensors.get(name).to(p.dtype), requires_grad=False))
    if tied:
        model.tie_weights()
    for name, b in list(model.named_buffers()):
        if b is not None and b.is_meta and name in tensors:  # persistent buffers (a router's correction bias)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensors.get(name))
    _materialize_buffers(model, model.config.get_text_config())
    moe_compile.prepare(model.eval())
    return model
