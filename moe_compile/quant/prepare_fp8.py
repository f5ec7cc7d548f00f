"""``moe_compile.prepare`` for block-fp8 models: transformers' ``FP8Experts`` and ``FP8Linear``, never their forward.

transformers builds ``FP8Experts`` (experts) and ``FP8Linear`` (dense layers) for an fp8 checkpoint
(``from_pretrained`` on a GPU, or ``replace_with_fp8_linear`` anywhere). Their forwards call a kernel
fetched from the Hub at run time (no CPU, no offline path). :func:`prepare_fp8` replaces them, keeping
the same parameter tensors (no copy, weights stay e4m3):

- ``FP8Experts`` -> :class:`FP8StackedExperts`: one ``moe_compile::moe_fp8`` call (:mod:`moe_compile.ops.fp8`).
  The activation is the one of :data:`~moe_compile.spec.ACTIVATIONS` that reproduces the module's own
  ``_apply_gate`` (pure torch) on random inputs; the weights and scales are checked against the block grid.
- ``FP8Linear`` -> :class:`BlockFP8Linear`: ``moe_compile::fp8_linear``, the same W8A8 arithmetic.

Refused, each with its reason in :func:`moe_compile.prepare.prepare_report`: weights still on the meta
device, per-tensor fp8 (``weight_block_size=None``), static activation scales, FP4 experts
(``expert_dtype="fp4"``), clamped SiLU (``limit`` without ``swiglu_alpha``), scales that do not match the
grid. bf16 and ue8m0 scales are converted to fp32 (exactly; a small copy of the scales).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..moe_math import activate
from ..spec import ACTIVATIONS, PARAMETRIC, ExpertSpec
from .fp8 import FP8_DTYPE, check_weight_scales, scales_to_float32

__all__ = ["BlockFP8Linear", "FP8StackedExperts", "fp8_bytes", "prepare_fp8"]


def _is_hf(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.endswith("finegrained_fp8") for c in type(module).__mro__)


def _frozen(p: torch.Tensor) -> nn.Parameter:
    """The same storage as a parameter that needs no grad (e4m3 parameters cannot require one anyway)."""
    return nn.Parameter(p.detach(), requires_grad=False)


class FP8StackedExperts(nn.Module):
    """``E`` block-fp8 experts computed by one ``moe_compile::moe_fp8`` call (W8A8, :mod:`moe_compile.quant.fp8`)."""

    def __init__(self, w_up, w_down, w_up_scale, w_down_scale, spec: ExpertSpec, source: str):
        super().__init__()
        self.num_experts = w_up.shape[0]
        self.w_up = _frozen(w_up)  # [E, N, H] e4m3
        self.w_down = _frozen(w_down)  # [E, H, I] e4m3
        self.w_up_scale = _frozen(w_up_scale)  # [E, NB, ceil(H / block_k)] fp32
        self.w_down_scale = _frozen(w_down_scale)  # [E, ceil(H / block_n), ceil(I / block_k)] fp32
        self.spec = spec.encode()
        self.source = source

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        H = hidden_states.shape[-1]
        x_TH = hidden_states.reshape(-1, H)
        T = x_TH.shape[0]
        out_TH = torch.ops.moe_compile.moe_fp8(
            x_TH,
            top_k_index.reshape(T, -1),
            top_k_weights.reshape(T, -1),
            self.w_up,
            self.w_down,
            self.w_up_scale,
            self.w_down_scale,
            None,
            None,
            self.spec,
        )
        return out_TH.view(hidden_states.shape)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, spec={self.spec}, source={self.source!r}"


class BlockFP8Linear(nn.Module):
    """A dense block-fp8 linear layer (``moe_compile::fp8_linear``), in place of transformers' ``FP8Linear``."""

    def __init__(self, weight, weight_scale, bias, block: tuple[int, int], source: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _frozen(weight)  # [N, K] e4m3
        self.weight_scale_inv = _frozen(weight_scale)  # [ceil(N / bn), ceil(K / bk)] fp32
        self.bias = _frozen(bias) if bias is not None else None
        self.block = tuple(block)
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, bk = self.block
        return torch.ops.moe_compile.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, bn, bk)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def fp8_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the fp8 experts of ``model`` after :func:`prepare_fp8`: ``weights`` (e4m3) and ``scales``."""
    weights = scales = 0
    for m in model.modules():
        if isinstance(m, FP8StackedExperts):
            weights += sum(t.numel() * t.element_size() for t in (m.w_up, m.w_down))
            scales += sum(t.numel() * t.element_size() for t in (m.w_up_scale, m.w_down_scale))
    return {"weights": weights, "scales": scales}


def _block(module: nn.Module) -> tuple[int, int] | str:
    block = getattr(module, "block_size", None)
    if block is None:
        return "per-tensor fp8 (weight_block_size=None) is not supported; only block-scaled fp8"
    if getattr(module, "activation_scheme", "dynamic") != "dynamic":
        return f"activation_scheme={module.activation_scheme!r}: only dynamic activation scales are supported"
    return int(block[0]), int(block[1])


def _scale(t: torch.Tensor, what: str) -> torch.Tensor | str:
    try:
        return scales_to_float32(t.detach(), what)
    except ValueError as why:
        return str(why)


def _candidates(module: nn.Module, gated: bool):
    if not gated:
        for act in ACTIVATIONS:
            if act not in PARAMETRIC:
                yield ExpertSpec(activation=act, gated=False)
        return
    alpha, limit = getattr(module, "swiglu_alpha", None), getattr(module, "limit", None)
    gate_cap, up_cap = getattr(module, "gate_softcap", None), getattr(module, "up_softcap", None)
    if gate_cap is not None and up_cap is not None:
        yield ExpertSpec(activation="swiglu_softcap", gate_softcap=float(gate_cap), up_softcap=float(up_cap))
    elif alpha is not None and limit is not None:
        yield ExpertSpec(activation="swiglu_oai", alpha=float(alpha), limit=float(limit))
    elif limit is None:
        for act in ACTIVATIONS:
            if act not in PARAMETRIC:
                yield ExpertSpec(activation=act)


def _activation(module: nn.Module, gated: bool, I: int) -> ExpertSpec | str:  # noqa: E741
    """The spec whose activation reproduces the module's own (``_apply_gate`` / ``act_fn``) on random inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2 * I if gated else I, generator=gen) * 4
    with torch.no_grad():
        expected = module._apply_gate(x) if gated else module.act_fn(x)
        for spec in _candidates(module, gated):
            got = activate(x, spec)
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
                return spec
    return "no canonical activation reproduces the experts' own (e.g. a clamped SiLU: limit without swiglu_alpha)"


def _fp8_experts(module: nn.Module) -> FP8StackedExperts | str:
    block = _block(module)
    if isinstance(block, str):
        return block
    gated = bool(getattr(module, "has_gate", True))
    up_name = "gate_up_proj" if gated else "up_proj"
    w_up, w_down = getattr(module, up_name), module.down_proj
    if w_up.is_meta or w_down.is_meta:
        return "fp8 weights not loaded (meta device): load the checkpoint first (moe_compile.quant.loading)"
    if w_up.dtype != FP8_DTYPE:
        return f"{up_name} is {w_up.dtype}, not float8_e4m3fn (FP4 experts, expert_dtype='fp4', are not supported)"
    if getattr(module, "has_bias", False):
        return "fp8 experts with biases are not supported"
    s_up = _scale(getattr(module, f"{up_name}_scale_inv"), f"{up_name}_scale_inv")
    s_down = _scale(module.down_proj_scale_inv, "down_proj_scale_inv")
    for s in (s_up, s_down):
        if isinstance(s, str):
            return s
    try:
        check_weight_scales(up_name, w_up, s_up, block, 2 if gated else 1)
        check_weight_scales("down_proj", w_down, s_down, block, 1)
    except ValueError as why:
        return str(why)
    spec = _activation(module, gated, w_down.shape[-1])
    if isinstance(spec, str):
        return spec
    spec = dataclasses.replace(spec, quant="fp8_block", block_n=block[0], block_k=block[1], scale_dtype="float32")
    source = f"{w_up.shape[0]} fp8 experts ({spec.describe()}, {spec.describe_quant()}) from transformers' FP8Experts"
    return FP8StackedExperts(w_up, w_down, s_up, s_down, spec, source)


def _fp8_linear(module: nn.Module) -> BlockFP8Linear | str:
    block = _block(module)
    if isinstance(block, str):
        return block
    if module.weight.is_meta:
        return "fp8 weights not loaded (meta device): load the checkpoint first"
    if module.weight.dtype != FP8_DTYPE:
        return f"weight is {module.weight.dtype}, not float8_e4m3fn"
    scale = _scale(module.weight_scale_inv, "weight_scale_inv")
    if isinstance(scale, str):
        return scale
    try:
        check_weight_scales("weight", module.weight, scale, block)
    except ValueError as why:
        return str(why)
    source = f"fp8 linear {module.in_features}->{module.out_features} (W8A8, {block[0]}x{block[1]} blocks)"
    return BlockFP8Linear(module.weight, scale, module.bias, block, source)


def prepare_fp8(model: nn.Module) -> list[tuple[str, str]]:
    """Replace transformers' ``FP8Experts``/``FP8Linear`` in ``model`` (in place); ``(path, what)`` per module."""
    log: list[tuple[str, str]] = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if _is_hf(module, "FP8Experts"):
            result = _fp8_experts(module)
        elif _is_hf(module, "FP8Linear"):
            result = _fp8_linear(module)
        else:
            continue
        if isinstance(result, str):
            log.append((name, f"left alone: {result}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, result)
        log.append((name, f"fp8: {result.source}"))
    return log
