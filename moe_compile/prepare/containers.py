"""Per-expert module containers: an ``nn.ModuleList``/``nn.ModuleDict`` subclass with its own
``forward(hidden, selection, routing_weights)`` over identical MLPs of two or three ``nn.Linear``
becomes :class:`~.modules.StackedExperts`, when it reproduces the container on random inputs (both
selection forms: ids ``[T, K]`` or a one-hot mask ``[T, K, E]``; a constant output factor is fitted).
A container of single ``nn.Linear`` experts is reported, never replaced.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .modules import StackedExperts
from .probe import Form, close, has_own_forward, in_eval, linears, members, ordered_experts, stack_experts


def _container_members(module: nn.Module) -> list[nn.Module] | None:
    """The members of an ``nn.ModuleList``/``nn.ModuleDict`` subclass with its own forward, else None.

    Parameter-free children (a token dropout) are not members: see :func:`members`.
    """
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or not has_own_forward(module):
        return None
    return members(module)


def match(module: nn.Module) -> bool:
    children = _container_members(module)
    if children is None or len(children) < 2 or len({type(c) for c in children}) != 1:
        return False
    shapes = {tuple(tuple(p.shape) for p in c.parameters()) for c in children}
    return len(shapes) == 1 and len(linears(children[0])) in (2, 3)


def build(container: nn.Module) -> StackedExperts | str:
    experts = ordered_experts(container)
    if experts is None:
        return "expert keys do not end in 0..E-1"
    with in_eval(container):
        stacked = stack_experts(experts)
        if isinstance(stacked, str):
            return stacked
        lin0 = linears(experts[0])[0]
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if _same_container(container, stacked, lin0.in_features, lin0.weight.dtype, gen):
                if stacked.output_scale != 1.0:
                    stacked.source += f", output scaled by {stacked.output_scale:g}"
                return stacked
        return "the container's forward is not sum_k weight * expert(x) over its selection"


def _same_container(container: nn.Module, stacked: StackedExperts, H: int, dtype, gen) -> bool:
    """Both selection forms the container might take; True if one agrees everywhere."""
    T, K, E = 9, 2, stacked.num_experts
    device = stacked.w_up.device
    x = torch.randn(T, H, generator=gen).to(dtype=dtype, device=device)
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :K].to(device)
    weights = torch.rand(T, K, generator=gen).to(dtype=dtype, device=device)
    mask = torch.nn.functional.one_hot(ids[:, :1], E)  # [T, 1, E]
    mask[::3] = 0  # every third token dropped, as by a capacity limit
    for selection, w in ((ids, weights), (mask, weights[:, :1])):
        try:
            expected = container(x, selection, w)
        except Exception:  # noqa: BLE001 - the container does not take this form
            continue
        if not isinstance(expected, torch.Tensor):
            continue
        got = stacked(x, selection, w)
        if close(got, expected):
            return True
        # a constant factor on the output (NLLB-MoE's eval-time ``1 - moe_token_dropout``): fitted by least
        # squares, then the shortest decimal that reproduces the output (0.8, not bf16's 0.7996)
        fit = ((got.double() * expected.double()).sum() / got.double().square().sum()).item()
        for digits in range(1, 7):
            scale = round(fit, digits)
            if scale > 0 and scale != 1.0:
                stacked.output_scale = scale
                if close(stacked(x, selection, w), expected):
                    return True
            stacked.output_scale = 1.0
    return False


def match_single_linear(module: nn.Module) -> bool:
    """A container with its own forward over ``>= 2`` identical children that are each one ``nn.Linear``."""
    children = _container_members(module)
    return (
        children is not None
        and len(children) >= 2
        and all(type(c) is nn.Linear for c in children)
        and len({tuple(c.weight.shape) for c in children}) == 1
    )


def explain_single_linear(module: nn.Module) -> str:
    """Why a container of single ``nn.Linear`` experts is left as it is (always: it is reported, never replaced)."""
    args = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    picked = f"its forward({', '.join(args)}) picks them" if args else "its forward picks them"
    return (
        f"its {len(members(module))} experts are single nn.Linear layers, not MLPs (no up projection, activation "
        f"and down projection), and {picked} itself (e.g. by an input index, as ViTPose's per-dataset experts): "
        "outside the canonical op, which computes sum_k w_k * down(act(up(x)))"
    )


FORMS = (
    Form("per-expert module container", match, build, "stacked"),
    Form("single nn.Linear experts", match_single_linear, explain_single_linear, ""),  # says why, replaces nothing
)
