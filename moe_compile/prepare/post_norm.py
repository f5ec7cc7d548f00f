"""Experts with a post-expert norm: transformers' experts-interface module whose outputs each pass through one
norm before the routing weight (MuseSpark's ``post_expert_norm``) becomes :class:`~.modules.PostNormExperts`
when one canonical activation, followed by the module's norm, reproduces it on random inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..spec import ACTIVATIONS, PARAMETRIC, ExpertSpec
from .modules import PostNormExperts, StackedExperts
from .probe import Form, close, in_eval, is_interface_experts


def match(module: nn.Module) -> tuple[nn.Module] | None:
    """``(norm,)`` of transformers' experts-interface module with a post-expert norm: stacked ``gate_up_proj``
    ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, and one child module, the norm of each expert's output."""
    if not is_interface_experts(module) or getattr(module, "is_transposed", True) or not module.has_gate:
        return None
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 or len(children) != 1:
        return None
    if any(p is not up and p is not down for p in module.parameters(recurse=False)):
        return None
    return (children[0],)


def build(module: nn.Module, norm: nn.Module) -> PostNormExperts | str:
    """The module as :class:`PostNormExperts`, when one activation reproduces it on random inputs."""
    w_up, w_down = module.gate_up_proj.detach(), module.down_proj.detach()
    E, H = w_up.shape[0], w_up.shape[2]
    if w_down.shape[:2] != (E, H) or w_up.shape[1] != 2 * w_down.shape[2]:
        return f"gate_up_proj {tuple(w_up.shape)} and down_proj {tuple(w_down.shape)} are not [E, 2I, H]/[E, H, I]"
    gen = torch.Generator().manual_seed(3)
    dtype, device = w_up.dtype, w_up.device
    x = torch.randn(9, H, generator=gen).to(dtype=dtype, device=device)
    ids = torch.rand(9, E, generator=gen).argsort(-1)[:, : min(2, E)].to(device)
    w = torch.rand(ids.shape, generator=gen).to(dtype=dtype, device=device)
    with torch.no_grad(), in_eval(module):
        expected = module(x, ids, w)
        for act in ACTIVATIONS:
            if act in PARAMETRIC:
                continue
            spec = ExpertSpec(activation=act)
            stacked = StackedExperts(w_up, w_down, None, None, spec, f"{E} stacked experts, {spec.describe()}")
            candidate = PostNormExperts(stacked, norm, f"{stacked.source}, each output normed ({type(norm).__name__})")
            if close(candidate(x, ids, w), expected):
                return candidate
    return "no canonical activation followed by its norm reproduces the experts' outputs"


FORMS = (Form("experts with a post-expert norm", match, build, "stacked"),)
