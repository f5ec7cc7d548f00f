"""Self-routed MoE modules over stacked weights: one router ``nn.Linear(H, E)`` at any depth, two or three
``[E, ., .]`` expert parameters and at most one ``[H]`` output bias (JetMoE's ``JetMoeMoE``) become
:class:`~.modules.RoutedExperts` when a routing rule, a reading of the weights and the bias reproduce the
module on random inputs. A mixture of attention (``map``/``reduce``) is left alone, with the reason.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .modules import RoutedExperts, StackedExperts, routings
from .probe import (
    Form,
    close,
    has_own_forward,
    in_eval,
    is_interface_experts,
    large_input_scale,
    ours,
    same_output,
    weight_forms,
)


def match(module: nn.Module):
    """``(router, views, bias)`` of a module that owns exactly: one router ``nn.Linear(H, E)`` (at any depth),
    two or three expert-stacked ``[E, ., .]`` parameters in modules of its own (not transformers' experts
    interface, not a replaced module), and at most one ``[H]`` output bias; else None (JetMoE's ``JetMoeMoE``)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or not has_own_forward(module):
        return None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or any(ours(m) for m in module.modules()):
        return None
    if any(is_interface_experts(m) for m in module.modules()):
        return None
    router = linears[0]
    E, H = router.out_features, router.in_features
    router_params = {id(p) for p in router.parameters()}
    views, biases = [], []
    for name, p in module.named_parameters():
        if id(p) in router_params:
            continue
        if p.dim() == 3 and p.shape[0] == E:
            views.append((name, p.detach()))
        elif p.dim() == 1 and p.shape[0] == H:
            biases.append(p.detach())
        else:
            return None
    if not 2 <= len(views) <= 3 or len(biases) > 1 or E < 2:
        return None
    return router, views, biases[0] if biases else None


def build(module: nn.Module, router: nn.Linear, views, bias) -> RoutedExperts | str:
    """The module as :class:`RoutedExperts` over its stacked weights, when one routing rule, one reading of
    the weights and (if it has one) its output bias reproduce it on random inputs."""
    E, H = router.out_features, router.in_features
    if callable(getattr(type(module), "map", None)) and callable(getattr(type(module), "reduce", None)):
        return (
            "a mixture of attention (`map`/`reduce`): each expert's first projection makes per-expert queries "
            "and its second projects the attention output back, with attention in between; the canonical op "
            "computes an MLP per expert (down(act(up(x)))), not a projection split around attention"
        )
    dtype, device = router.weight.dtype, router.weight.device
    gen = torch.Generator().manual_seed(4)
    probes = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for shape in ((2, 5, H), (1, 7, H))]
    probes.append(probes[1] * large_input_scale([v for _, v in views], H))  # a clamp shows at large values
    with in_eval(module), torch.no_grad():
        try:
            expected = [module(x) for x in probes]
        except Exception as err:  # noqa: BLE001  (a forward that takes more than hidden states)
            return f"its forward does not take hidden states alone ({type(err).__name__})"
        returns_logits = isinstance(expected[0], tuple)
        if returns_logits and not (len(expected[0]) == 2 and all(isinstance(t, torch.Tensor) for t in expected[0])):
            return "its forward returns something other than hidden states (and router logits)"
        x_TH = probes[0].reshape(-1, H)
        want = expected[0][0] if returns_logits else expected[0]
        logits = router(x_TH)
        routed = [(routing, *routing(logits)) for routing in routings(E)]
        for form in weight_forms(views, hidden=H):
            for routing, weights, ids in routed:
                got = form(x_TH, ids, weights.to(dtype))
                if bias is not None:
                    got = got + bias
                if not close(got.reshape(-1), want.reshape(-1)):
                    continue
                w_up, w_down = form.weights()
                stacked = StackedExperts(w_up, w_down, None, None, form.spec, f"{E} experts' stacked weights")
                source = f"self-routed MoE, {routing.describe()}, {E} experts' stacked weights ({form.names})"
                if bias is not None:
                    source += ", output bias"
                candidate = RoutedExperts(router, stacked, routing, returns_logits, source, bias=bias)
                if all(same_output(candidate(x), e) for x, e in zip(probes, expected, strict=True)):
                    return candidate
    return (
        "no top-k routing rule (softmax or sigmoid, k <= 8, renormalised or not) with a canonical expert form "
        "of its stacked weights reproduces its output"
    )


FORMS = (Form("self-routed MoE module over stacked weights", match, build, "routed"),)
