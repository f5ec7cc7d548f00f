"""Experts modules over stacked weights: ``forward(hidden, top_k_index, top_k_weights)`` with every parameter
expert-stacked (``[E, a, b]`` or flattened ``[E * a, b]``: DBRX, Step-3.7, LongCat-Flash) becomes
:class:`~.modules.StackedExperts` when one reading of the weights (and identity experts past ``E``)
reproduces the module's forward on random inputs, at unit and at large input scale.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn as nn

from .modules import StackedExperts
from .probe import (
    Form,
    close,
    expert_weight_views,
    has_own_forward,
    in_eval,
    is_interface_experts,
    large_input_scale,
    ours,
    weight_forms,
)

_SELECTION_NAME = re.compile(r"ind|idx|ids|expert|select|mask|rout")
_WEIGHTS_NAME = re.compile(r"weight|prob|gate|score")


def match(module: nn.Module) -> bool:
    """An experts module (not a container) with ``forward(hidden, top_k_index, top_k_weights)`` whose
    parameters are all expert-stacked, and not transformers' experts interface (already traceable)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or not has_own_forward(module):
        return False
    if ours(module):
        return False  # already traceable (StackedExperts, the reference expert-parallel module: collectives)
    if is_interface_experts(module):
        return False  # transformers' experts interface: "grouped_mm" traces
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 3 or any(p.default is not p.empty for p in positional):
        return False
    if not (_SELECTION_NAME.search(positional[1].name) and _WEIGHTS_NAME.search(positional[2].name)):
        return False
    return expert_weight_views(module) is not None


def build(module: nn.Module) -> StackedExperts | str:
    """The module as :class:`StackedExperts`, when one reading of its weights gives its outputs on random inputs.

    Hidden states are probed as ``[T, H]`` and ``[1, T, H]``; every shape the module takes must give its
    values, and one its exact output shape (DBRX's experts return ``[T, 1, H]`` for ``[T, H]``; they are
    called with ``[B, S, H]``). Each is probed at unit scale and at a scale that makes the projections
    about 30 in size, so that a clamp (Step3p7's ``swiglu_limits``) cannot hide behind small values.
    """
    E, Z, views = expert_weight_views(module)
    dtype, device = views[0][1].dtype, views[0][1].device
    gen = torch.Generator().manual_seed(3)
    T, K = 9, min(2, E + Z)
    ids_real = torch.rand(T, E, generator=gen).argsort(-1)[:, :K].to(device)  # real experts only
    ids_all = torch.rand(T, E + Z, generator=gen).argsort(-1)[:, :K].to(device)  # with the identity ones
    weights = torch.rand(T, K, generator=gen).to(dtype=dtype, device=device)
    probes: dict[int, list | str] = {}  # H -> [(x, ids, expected)] the module accepts, or why none

    def run_probes(H: int) -> list | str:
        x_TH = torch.randn(T, H, generator=gen).to(dtype=dtype, device=device)
        big_TH = x_TH * large_input_scale([v for _, v in views], H)
        accepted, errors = [], []
        for x in (x_TH, x_TH[None], big_TH, big_TH[None]):
            for ids in (ids_real, ids_real.flip(0)) + ((ids_all,) if Z else ()):
                try:
                    out = module(x, ids, weights)
                except Exception as err:  # noqa: BLE001 - not this shape
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                if isinstance(out, torch.Tensor) and out.numel() == x.numel():
                    accepted.append((x, ids, out))
        if not accepted:
            return errors[0] if errors else "its output is not one tensor of the input's size"
        return accepted

    def agrees(stacked: StackedExperts, found: list) -> bool:
        exact_shape = False
        for x, ids, expected in found:
            got = stacked(x, ids, weights)
            if not close(got.reshape(-1), expected.reshape(-1)):
                return False
            exact_shape |= got.shape == expected.shape
        return exact_shape

    with in_eval(module), torch.no_grad():
        for form in weight_forms(views):
            H = form.down.shape[1]
            if H not in probes:
                probes[H] = run_probes(H)
            found = probes[H]
            if isinstance(found, str):
                continue
            real = [f for f in found if f[1] is not ids_all]  # the views compute real experts only
            if not real:
                continue
            if Z and len(real) == len(found):
                return f"ids {E}..{E + Z - 1} (past the {E} experts' down projections) fail in its own forward"
            x0, ids0, expected0 = real[0]
            if not close(form(x0.reshape(T, H), ids0, weights).reshape(-1), expected0.reshape(-1)):
                continue
            w_up, w_down = form.weights()
            source = f"{E} experts' stacked weights ({form.names})"
            if Z:
                source += f" and {Z} identity experts"
            stacked = StackedExperts(w_up, w_down, None, None, form.spec, source, identity_experts=Z)
            if agrees(stacked, found):
                return stacked
            if Z and agrees(stacked, real):
                return (
                    f"ids {E}..{E + Z - 1} (past the {E} experts' down projections) are not identity experts "
                    "(output = weight * token), the only extra experts the canonical replacement has"
                )
    failed = [p for p in probes.values() if isinstance(p, str)]
    if not probes:
        return "its parameters read as no (gate,) up, down projections of consistent shapes"
    if len(failed) == len(probes):
        return f"its forward(hidden, ids, weights) fails on random inputs ({failed[0][:120]})"
    return (
        "no canonical expert form (activation, gating, layout) of its stacked weights reproduces its "
        "forward(hidden, top_k_index, top_k_weights) on random inputs"
    )


FORMS = (Form("experts module over stacked weights", match, build, "stacked"),)
