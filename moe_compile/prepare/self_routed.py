"""Self-routed MoE modules: a module owning one router ``nn.Linear(H, E)`` and a plain list (or dict) of ``E``
identical MLPs, routing in its own ``forward(hidden)``, becomes :class:`~.modules.RoutedExperts` when a
top-k :class:`~.modules.Routing` rule reproduces its outputs (and router logits) on random inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .modules import RoutedExperts, routings
from .probe import Form, has_own_forward, in_eval, linears, ordered_experts, same_output, stack_experts


def match(module: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """``(router, experts)`` of a module that owns exactly a router ``nn.Linear(H, E)`` and a plain
    list (or dict) of ``E`` identical MLPs, and whose own forward routes (else None)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, RoutedExperts)) or not has_own_forward(module):
        return None
    if any(True for _ in module.parameters(recurse=False)):
        return None
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    routers = [c for c in children if isinstance(c, nn.Linear)]
    lists = [c for c in children if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
    if len(routers) != 1 or len(lists) != 1 or len(children) != 2:
        return None
    router, experts = routers[0], lists[0]
    if has_own_forward(experts):
        return None  # a container with its own forward(hidden, selection, weights): stacked, not routed here
    members = list(experts.children())
    if len(members) != router.out_features or len(members) < 2 or len({type(m) for m in members}) != 1:
        return None
    shapes = {tuple(tuple(p.shape) for p in m.parameters()) for m in members}
    if len(shapes) != 1 or len(linears(members[0])) not in (2, 3):
        return None
    if linears(members[0])[0].in_features != router.in_features:
        return None
    return router, experts


def build(module: nn.Module, router: nn.Linear, container: nn.Module) -> RoutedExperts | str:
    """The module as :class:`RoutedExperts`, when one routing rule reproduces it on random inputs."""
    experts = ordered_experts(container)
    if experts is None:
        return "expert keys do not end in 0..E-1"
    with in_eval(module):
        stacked = stack_experts(experts)
        if isinstance(stacked, str):
            return stacked
        H, dtype, device = router.in_features, router.weight.dtype, router.weight.device
        gen = torch.Generator().manual_seed(2)
        probes = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for shape in ((2, 5, H), (1, 7, H))]
        with torch.no_grad():
            try:
                expected = [module(x) for x in probes]
            except Exception as err:  # noqa: BLE001  (a forward that takes more than hidden states)
                return f"its forward does not take hidden states alone ({type(err).__name__})"
            returns_logits = isinstance(expected[0], tuple)
            if returns_logits and not (len(expected[0]) == 2 and all(isinstance(t, torch.Tensor) for t in expected[0])):
                return "its forward returns something other than hidden states (and router logits)"
            for routing in routings(len(experts)):
                candidate = RoutedExperts(router, stacked, routing, returns_logits, "")
                if all(same_output(candidate(x), e) for x, e in zip(probes, expected, strict=True)):
                    candidate.source = f"self-routed MoE, {routing.describe()}, {stacked.source}"
                    return candidate
            return "no top-k routing rule (softmax or sigmoid, k <= 8, renormalised or not) reproduces its output"


FORMS = (Form("self-routed MoE module", match, build, "routed"),)
