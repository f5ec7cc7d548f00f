"""What the recognisers share: the "module with its own forward" test, eval mode, stacking per-expert MLPs,
reading stacked parameters as expert weights, and the comparison every probe makes.

A recogniser (one module per form: :mod:`.containers`, :mod:`.stacked_weights`, :mod:`.self_routed`,
:mod:`.self_routed_stacked`, :mod:`.post_norm`) exports ``FORMS``, a tuple of :class:`Form`; the driver
(:mod:`.driver`) walks the model's submodules with each in turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .. import verify
from ..moe_math import activate
from ..spec import ACTIVATIONS, GATE_LAYOUTS, PARAMETRIC, ExpertSpec
from ..verify import large_input_scale  # noqa: F401  (the probes of each prepare form use it)
from .modules import StackedExperts


class Form(NamedTuple):
    """One recognised form: ``match(module)`` is a bool or the parts ``build(module, *parts)`` takes (None or
    False: no match); ``build`` returns the replacement module, or a string saying why the module stays.
    ``verb`` names the replacement in the report (``"stacked"``, ``"routed"``; empty for a form that only
    reports)."""

    name: str
    match: Callable[[nn.Module], Any]
    build: Callable[..., nn.Module | str]
    verb: str


def has_own_forward(module: nn.Module) -> bool:
    """``module``'s class defines a ``forward`` of its own (not ``nn.Module``'s, which raises)."""
    return type(module).forward is not nn.Module.forward


def is_interface_experts(module: nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def ours(module: nn.Module) -> bool:
    """A module of moe_compile's own (a replacement, the reference EP module): never probed or replaced."""
    return type(module).__module__.split(".")[0] == __name__.split(".")[0]


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.children() if isinstance(m, nn.Linear)]


def members(container: nn.Module) -> list[nn.Module]:
    return [c for c in container.children() if any(True for _ in c.parameters())]


def ordered_experts(container: nn.Module) -> list[nn.Module] | None:
    """Children in expert-index order (``expert_3`` is expert 3), or None if unclear."""
    if isinstance(container, nn.ModuleList):
        return members(container)
    keys = [k for k, c in container.items() if any(True for _ in c.parameters())]
    indices = [int(m.group(1)) if (m := re.search(r"(\d+)$", k)) else None for k in keys]
    if None in indices or sorted(indices) != list(range(len(keys))):
        return None
    return [container[k] for _, k in sorted(zip(indices, keys, strict=True))]


def call_order(expert: nn.Module, x: torch.Tensor) -> list[nn.Linear]:
    order: list[nn.Linear] = []
    hooks = [lin.register_forward_hook(lambda m, *_: order.append(m)) for lin in linears(expert)]
    try:
        expert(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@contextlib.contextmanager
def in_eval(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (dropout off) for the duration, then as it was."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` equals the module's own output ``b`` within ``b``'s dtype tolerance (:mod:`moe_compile.verify`)."""
    return verify.close(a, b)


def same_output(got, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == expected.shape and close(got, expected)
    return (
        isinstance(got, tuple)
        and len(got) == len(expected)
        and all(g.shape == e.shape and close(g, e) for g, e in zip(got, expected, strict=True))
    )


def stack_experts(experts: list[nn.Module]) -> StackedExperts | str:
    """The experts (identical MLPs of 2-3 ``nn.Linear``, in eval mode) stacked, checked expert by expert."""
    first = experts[0]
    lin0 = linears(first)[0]
    H, dtype = lin0.in_features, lin0.weight.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, H, generator=gen).to(dtype=dtype, device=lin0.weight.device)
    with torch.no_grad():
        order = call_order(first, x)
        if len(order) != len(linears(first)):
            return "experts do not call each of their Linear layers once"
        names = [n for lin in order for n, m in first.named_children() if m is lin]
        for spec, w_up, w_down, b_up, b_down in _candidates(experts, names):
            if _same_experts(experts, spec, w_up, w_down, b_up, b_down, x):
                stacked = StackedExperts(w_up, w_down, b_up, b_down, spec, _describe(names, len(experts)))
                return stacked.to(device=lin0.weight.device)
        return "no canonical expert form (activation, gating) reproduces the experts"


def _describe(names: list[str], E: int) -> str:
    return f"{E} per-expert nn.Linear modules ({', '.join(names)})"


def _candidates(experts: list[nn.Module], names: list[str]):
    """(spec, w_up, w_down, b_up, b_down) guesses: every activation, and gate/up orders."""

    def stack(name: str, what: str):
        tensors = [getattr(getattr(e, name), what) for e in experts]
        return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])

    down = names[-1]
    w_down, b_down = stack(down, "weight"), stack(down, "bias")
    if len(names) == 2:
        ups = [(names[0],)]
        gated = False
    else:
        ups = [(names[0], names[1]), (names[1], names[0])]  # (gate, up)
        gated = True
    for up_names, act in itertools.product(ups, ACTIVATIONS):
        if act in PARAMETRIC:
            continue  # constants of their own (and swiglu_oai's interleaved projection): not guessed here
        w_up = torch.cat([stack(n, "weight") for n in up_names], dim=1)
        biases = [stack(n, "bias") for n in up_names]
        b_up = None if biases[0] is None else torch.cat(biases, dim=1)
        yield ExpertSpec(activation=act, gated=gated), w_up, w_down, b_up, b_down


def _same_experts(experts, spec, w_up, w_down, b_up, b_down, x) -> bool:
    for e, expert in enumerate(experts):
        up = x @ w_up[e].t() + (b_up[e] if b_up is not None else 0)
        y = activate(up, spec) @ w_down[e].t() + (b_down[e] if b_down is not None else 0)
        if not close(y, expert(x)):
            return False
    return True


# -- parameters read as stacked expert weights ------------------------------------------------------------------------


EXPERT_COUNT_ATTRS = ("num_experts", "moe_num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts")


@dataclasses.dataclass
class WeightForm:
    """One reading of an experts module's parameters as ``[E, out, in]`` views: gate (or None), up, down."""

    gate: torch.Tensor | None  # [E, I, H] (separate gate projection), or None
    up: torch.Tensor  # [E, I, H], or [E, 2I, H] fused gate/up when ``gate`` is None and the spec is gated
    down: torch.Tensor  # [E, H, I]
    spec: ExpertSpec
    names: str  # how the parameters were read, for the report

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_up [E, N, H], w_down [E, H, I])`` for :class:`StackedExperts`: the module's own storage where
        it is already laid out so (Step3p7's ``gate_up_proj``), else one contiguous copy (DBRX's ``w2.T``)."""
        w_up = self.up if self.gate is None else torch.cat([self.gate, self.up], dim=1)
        return w_up.contiguous(), self.down.contiguous()

    def __call__(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """``sum_k weight * expert(x)`` through the views, expert by expert (probing only; ids < E)."""
        out_TH = torch.zeros_like(x_TH)
        for e in ids_TK.unique().tolist():
            t, k = torch.where(ids_TK == e)
            x = x_TH[t]
            up = x @ self.up[e].t()
            if self.gate is not None:
                up = torch.cat([x @ self.gate[e].t(), up], dim=-1)
            y = activate(up, self.spec) @ self.down[e].t()
            out_TH.index_add_(0, t, (y * weights_TK[t, k, None]).to(out_TH.dtype))
        return out_TH


def expert_weight_views(module: nn.Module) -> tuple[int, int, list[tuple[str, torch.Tensor]]] | None:
    """``(E, Z, views)`` when every parameter of ``module`` is expert-stacked: ``[E', a, b]`` (``E' >= E``:
    rows past ``E`` belong to ``Z = E' - E`` identity experts) or flattened ``[E * a, b]`` (DBRX), else None."""
    params = [(n, p.detach()) for n, p in module.named_parameters()]
    if not 2 <= len(params) <= 3:
        return None
    stacked = [p.shape[0] for _, p in params if p.dim() == 3]
    if stacked:
        E = min(stacked)
    else:
        counts = [getattr(module, a) for a in EXPERT_COUNT_ATTRS if isinstance(getattr(module, a, None), int)]
        if not counts:
            return None
        E = counts[0]
    views = []
    for name, p in params:
        if p.dim() == 3:
            views.append((name, p[:E]))
        elif p.dim() == 2 and not stacked and E > 1 and p.shape[0] % E == 0 and p.shape[0] > E:
            views.append((f"{name} as [E, {p.shape[0] // E}, {p.shape[1]}]", p.view(E, -1, p.shape[1])))
        else:
            return None
    return E, max(stacked, default=E) - E, views


def weight_forms(views: list[tuple[str, torch.Tensor]], hidden: int | None = None) -> Iterator[WeightForm]:
    """Every consistent reading of the views as (gate,) up, down, each either ``[E, out, in]`` or
    ``[E, in, out]``, with every activation; ``hidden``, when known, fixes ``H``."""
    for order in itertools.permutations(range(len(views))):
        for flips in itertools.product((False, True), repeat=len(views)):
            ws = [views[i][1].transpose(1, 2) if f else views[i][1] for i, f in zip(order, flips, strict=True)]
            names = ", ".join(f"{views[i][0]}{'.T' if f else ''}" for i, f in zip(order, flips, strict=True))
            *ups, down = ws
            H, I = down.shape[1], down.shape[2]
            if (hidden is not None and hidden != H) or any(u.shape[2] != H for u in ups):
                continue
            if len(ups) == 2:  # gate, up
                if ups[0].shape[1] != I or ups[1].shape[1] != I:
                    continue
                for act in ACTIVATIONS:
                    yield WeightForm(ups[0], ups[1], down, ExpertSpec(activation=act), f"gate {names}")
                continue
            up = ups[0]
            if up.shape[1] == 2 * I:
                for layout, act in itertools.product(GATE_LAYOUTS, ACTIVATIONS):
                    spec = ExpertSpec(activation=act, gate_layout=layout)
                    yield WeightForm(None, up, down, spec, f"gate_up {names}, {layout}")
            if up.shape[1] == I:
                for act in ACTIVATIONS:
                    if act != "swiglu_oai":
                        yield WeightForm(None, up, down, ExpertSpec(activation=act, gated=False), f"up {names}")
