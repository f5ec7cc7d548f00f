"""Tiny block-fp8 models as transformers builds them for an fp8 checkpoint, on the CPU and with no download.

:func:`quantize_model` takes a model (a :mod:`moe_compile.testing.zoo` one, say), runs transformers'
``replace_with_fp8_linear`` on a copy (``FP8Experts`` for the experts, ``FP8Linear`` for the dense layers,
parameters on the meta device, as ``from_pretrained`` leaves them before loading), and fills them with the
original weights quantized to e4m3 with fp32 block scales (:func:`moe_compile.quant.fp8.quantize_weight`).
It also returns a copy with those fp8 weights dequantized, which is what transformers computes on a CPU
(it dequantizes an fp8 checkpoint on load).
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn as nn

from ..quant.fp8 import dequantize_weight, quantize_weight

__all__ = ["expert_param_bytes", "quantize_model", "save_fp8_checkpoint"]


def _hf_fp8_classes():
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    return FP8Experts, FP8Linear


def quantize_model(
    model: nn.Module, block: tuple[int, int] = (128, 128), keep: tuple[str, ...] = ("lm_head",)
) -> tuple[nn.Module, nn.Module]:
    """``(fp8_model, dequantized_model)`` from ``model`` (left unchanged): see the module doc.

    ``keep``: transformers' ``modules_to_not_convert`` (``("lm_head", "self_attn")`` quantizes the experts only).
    """
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    FP8Experts, FP8Linear = _hf_fp8_classes()
    fp8 = copy.deepcopy(model)
    deq = copy.deepcopy(model)
    replace_with_fp8_linear(
        fp8,
        modules_to_not_convert=list(keep),
        quantization_config=FineGrainedFP8Config(weight_block_size=block),
        pre_quantized=True,
    )
    for name, module in fp8.named_modules():
        if isinstance(module, FP8Experts):
            src, dst = model.get_submodule(name), deq.get_submodule(name)
            gated = module.has_gate
            for role, halves in (("gate_up_proj" if gated else "up_proj", 2 if gated else 1), ("down_proj", 1)):
                w = getattr(src, role).detach()
                q, s = quantize_weight(w, block, halves)
                setattr(module, role, nn.Parameter(q, requires_grad=False))
                setattr(module, f"{role}_scale_inv", nn.Parameter(s, requires_grad=False))
                getattr(dst, role).data = dequantize_weight(q, s, block, halves, w.dtype)
        elif isinstance(module, FP8Linear):
            src, dst = model.get_submodule(name), deq.get_submodule(name)
            w = src.weight.detach()
            q, s = quantize_weight(w, block)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.weight_scale_inv = nn.Parameter(s, requires_grad=False)
            if src.bias is not None:
                module.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=False)
            dst.weight.data = dequantize_weight(q, s, block, 1, w.dtype)
    left = [n for n, p in fp8.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"quantize_model: parameters left on the meta device: {left[:5]}")
    return fp8.eval(), deq.eval()


def expert_param_bytes(model: nn.Module) -> int:
    """Bytes of the stacked expert weights (``[E, ., .]`` parameters named ``*proj``) of an unquantized model."""
    return sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if ".experts." in n and p.dim() == 3 and n.rsplit(".", 1)[-1] in ("gate_up_proj", "up_proj", "down_proj")
    )


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == torch.float8_e4m3fn


def save_fp8_checkpoint(
    model: nn.Module, path, block: tuple[int, int] = (128, 128), layout: str = "per_expert"
) -> dict[str, torch.Tensor]:
    """Write ``model`` (unquantized, experts-interface form) as a Qwen3-FP8-style checkpoint directory.

    ``config.json`` with ``quantization_config``; every expert of every ``experts`` module as its own
    ``experts.{e}.{gate,up,down}_proj.weight`` (e4m3) and ``weight_scale_inv`` (fp32, one per block);
    every other ``nn.Linear`` but ``lm_head`` in fp8 alike; routers, norms, embeddings and ``lm_head`` as
    they are. ``layout="stacked"``: the experts as transformers' ``FP8Experts`` holds them instead,
    ``experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows, each quantized on its own grid) with
    ``experts.gate_up_proj_scale_inv`` ``[E, 2*ceil(I/bn), ceil(H/bk)]``, ``experts.down_proj`` and its
    ``down_proj_scale_inv``, in two files under a ``model.safetensors.index.json``. Returns the tensors written.
    """
    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"layout={layout!r}: use 'per_expert' or 'stacked'")
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "down_proj") and module.down_proj.dim() == 3:
            gated = getattr(module, "has_gate", True)
            up = (module.gate_up_proj if gated else module.up_proj).detach()
            I = module.down_proj.shape[-1]  # noqa: E741
            for e in range(up.shape[0]):
                projections = {"down_proj": module.down_proj[e].detach()}
                if gated:
                    projections.update(gate_proj=up[e, :I], up_proj=up[e, I:])
                else:
                    projections.update(up_proj=up[e])
                for proj, w in projections.items():
                    q, s = quantize_weight(w.contiguous(), block)
                    tensors[f"{name}.{e}.{proj}.weight"], tensors[f"{name}.{e}.{proj}.weight_scale_inv"] = q, s
            done.update(f"{name}.{p}" for p, _ in module.named_parameters())
        elif isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            q, s = quantize_weight(module.weight.detach(), block)
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, s
            done.add(f"{name}.weight")
    for name, p in model.state_dict().items():
        if name not in done and name not in tensors:
            tensors[name] = p.detach().contiguous()
    if layout == "stacked":
        _stack_experts(tensors)
        names = sorted(tensors)
        half = {k: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
                for i, k in enumerate(names)}  # fmt: skip
        for file in sorted(set(half.values())):
            part = {k: tensors[k].contiguous() for k in names if half[k] == file}
            save_file(part, str(path / file), metadata={"format": "pt"})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
    else:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return tensors


def _stack_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Per-expert fp8 tensors (and scales) -> ``experts.{gate_up,up,down}_proj`` ``[E, ...]`` (and ``_scale_inv``)."""
    import re

    found: dict[str, set[int]] = {}
    for key in tensors:
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.down_proj\.weight", key)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    for name, ids in found.items():
        E = len(ids)
        gated = f"{name}.0.gate_proj.weight" in tensors
        roles = {"gate_up_proj" if gated else "up_proj": ("gate_proj", "up_proj") if gated else ("up_proj",),
                 "down_proj": ("down_proj",)}  # fmt: skip
        for role, projections in roles.items():
            for suffix, out in (("weight", role), ("weight_scale_inv", f"{role}_scale_inv")):
                rows = [torch.cat([tensors.pop(f"{name}.{e}.{p}.{suffix}") for p in projections]) for e in range(E)]
                tensors[f"{name}.{out}"] = torch.stack(rows)
