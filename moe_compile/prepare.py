"""``moe_compile.prepare(model)``: make a model's expert loops traceable.

Dynamo cannot follow an expert loop that depends on routing data (``nonzero``,
``torch.where``, boolean masks): the graph breaks at every MoE layer and the
backend sees no block. ``prepare`` rewrites, in place, the forms it knows into
ones that trace into one graph and compute the same function:

- **experts interface, eager loop.** Families using transformers' experts
  interface that were loaded with ``experts_implementation="eager"`` are switched
  to ``"grouped_mm"``.
- **per-expert module containers.** An ``nn.ModuleList``/``nn.ModuleDict`` subclass
  with its own ``forward(hidden, selection, routing_weights)`` whose children are
  identical MLPs of two or three ``nn.Linear`` (SwitchTransformers' experts, the
  Mixtral-era "one module per expert" layout, hand-written modules alike) is
  replaced by :class:`StackedExperts`: the experts' weights stacked into
  ``[E, N, H]``/``[E, H, I]`` tensors and one call of the canonical op
  ``moe_compile::moe``. ``selection`` may be expert ids ``[T, K]`` or a (possibly
  capacity-masked) one-hot mask ``[T, K, E]``; a token whose mask row is empty
  gets no expert output, as in the loop. Parameter-free children (NLLB-MoE's token dropout) are
  not experts; a constant factor on the output (NLLB-MoE's eval-time ``1 - moe_token_dropout``) is
  fitted and kept when it reproduces the container.

- **self-routed MoE modules.** A module that owns a router ``nn.Linear(H, E)`` and a plain
  ``nn.ModuleList``/``nn.ModuleDict`` of ``E`` identical MLPs and routes its tokens in its own
  ``forward(hidden)`` — however it computes them: a loop over experts gathering their tokens
  (``torch.where``/``index_add_``, the Mixtral-era reference code), every expert on every token
  weighted by a mostly-zero routing weight, or one-hot dispatch/combine through ``einsum``
  (GShard/Switch style) — is replaced by :class:`RoutedExperts`: its router, a :class:`Routing`
  rule (softmax or sigmoid, top-k for k <= 8, renormalised or not, or top-k logits then softmax)
  and the stacked experts. Whatever the body did, the replacement is kept only when it gives the
  module's outputs (hidden states, and router logits when it returned them) on random inputs;
  a capacity that drops tokens, say, is no top-k rule and stays.

- **experts modules over stacked weights.** A module (not transformers' experts interface, which
  traces once switched to ``"grouped_mm"``) with ``forward(hidden, top_k_index, top_k_weights)``
  whose parameters are all expert-stacked, ``[E, a, b]`` or flattened ``[E * a, b]`` (transformers'
  ``DbrxExperts``, weights ``[E*I, H]`` in ``DbrxExpertGLU``; ``Step3p7Experts``;
  ``LongcatFlashExperts``; all three loop over the experts they hit, with
  ``nonzero``/``torch.where``) is replaced by :class:`StackedExperts`. Every reading of the
  parameters as (gate,) up and down projections, each ``[E, out, in]`` or ``[E, in, out]``, fused
  gate/up in either layout, with every activation, is probed against the module's own forward until
  one agrees. Rows of a fused gate/up past the down projection's ``E`` (LongCat-Flash's
  ``zero_expert_num``) are identity experts when the module's forward agrees: ids ``E..E+Z-1``
  output the token times its weight, added outside the op. A clamp (Step-3.7's ``swiglu_limits``) is
  no canonical form: the probes run at a large input scale too, and such a module stays.

- **experts with a post-expert norm.** transformers' experts-interface module whose outputs each pass
  through one norm before the routing weight (MuseSpark's ``post_expert_norm``) traces, but the
  canonical op sums its pairs before any norm could run. It becomes :class:`PostNormExperts`: every
  (token, expert) pair is its own row of one op call (``K = 1``, unit weight), then the module's own
  norm, then the routing weights and the sum over ``k``; the activation is the one that reproduces
  the module on random inputs.

- **self-routed MoE modules over stacked weights.** A module that owns exactly one router
  ``nn.Linear(H, E)`` (at any depth), two or three ``[E, ., .]`` expert parameters and at most one
  output bias ``[H]``, and routes in ``forward(hidden)`` (JetMoE's ``JetMoeMoE``: top-k of the logits,
  ``split(expert_size)`` over the sorted tokens) is replaced by :class:`RoutedExperts` (with the bias)
  when a routing rule and a reading of the weights reproduce it. A mixture of attention
  (``JetMoeMoA``, ``map``/``reduce`` around attention) is left alone: its experts are no MLP.

- **Hugging Face expert parallelism.** An experts module that transformers' EP
  runs with ``AllToAllEP`` (``DistributedConfig(ep_size=W, ep_implementation=
  "all_to_all")``) graph-breaks about ten times per layer; it is replaced by
  :class:`moe_compile.reference.ExpertParallelExperts` on the same local shards,
  which traces into one graph (:mod:`moe_compile.reference.hf_expert_parallel`).
  This check is collective: call ``prepare`` on every rank.

Nothing is replaced on trust: each candidate is run, before and after, on random
inputs (every expert, both selection forms), and replaced only when the outputs
agree within the dtype's tolerance. What was done and what was left, with the
reason, is returned by :func:`prepare_report` and logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import re
from collections.abc import Iterator

import torch
import torch.nn as nn

from .moe_math import activate
from .spec import ACTIVATIONS, GATE_LAYOUTS, PARAMETRIC, ExpertSpec

log = logging.getLogger(__name__)

_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class StackedExperts(nn.Module):
    """``E`` experts as stacked weights, computed by one ``moe_compile::moe`` call.

    ``identity_experts``: ids ``E .. E + Z - 1`` name identity ("zero-computation") experts, whose
    output is the token itself times its weight (LongCat-Flash); they go to the op as expert 0 with
    weight 0 (the op has no "no expert" id, so expert 0 computes those rows for nothing) and their
    weighted input is added outside it. ``output_scale``: a constant factor on the output (NLLB-MoE's
    eval-time ``1 - moe_token_dropout``).
    """

    def __init__(
        self,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        b_up,
        b_down,
        spec: ExpertSpec,
        source: str,
        identity_experts: int = 0,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.num_experts = w_up.shape[0]
        self.w_up = nn.Parameter(w_up, requires_grad=False)  # [E, N, H]
        self.w_down = nn.Parameter(w_down, requires_grad=False)  # [E, H, I]
        self.b_up = nn.Parameter(b_up, requires_grad=False) if b_up is not None else None  # [E, N]
        self.b_down = nn.Parameter(b_down, requires_grad=False) if b_down is not None else None  # [E, H]
        self.spec = spec.encode()
        self.source = source
        self.identity_experts = identity_experts
        self.output_scale = output_scale

    def forward(self, hidden_states: torch.Tensor, selection: torch.Tensor, routing_weights: torch.Tensor):
        H = hidden_states.shape[-1]
        x_TH = hidden_states.reshape(-1, H)
        T = x_TH.shape[0]
        if selection.dim() == 3:  # one-hot mask [T, K, E]; an empty row (capacity overflow) drops the token
            mask_TKE = selection.reshape(T, -1, self.num_experts)
            ids_TK = mask_TKE.argmax(dim=-1)
            weights_TK = routing_weights.reshape(T, -1) * (mask_TKE.sum(dim=-1) > 0).to(routing_weights.dtype)
        else:
            ids_TK = selection.reshape(T, -1)
            weights_TK = routing_weights.reshape(T, -1)
        identity_T1 = None
        if self.identity_experts:
            is_identity_TK = ids_TK >= self.num_experts
            identity_T1 = (weights_TK * is_identity_TK).sum(dim=-1, keepdim=True)
            weights_TK = weights_TK * ~is_identity_TK
            ids_TK = ids_TK.masked_fill(is_identity_TK, 0)
        out_TH = torch.ops.moe_compile.moe(
            x_TH, ids_TK, weights_TK, self.w_up, self.w_down, self.b_up, self.b_down, self.spec
        )
        if identity_T1 is not None:
            out_TH = out_TH + (x_TH * identity_T1).to(out_TH.dtype)
        if self.output_scale != 1.0:
            out_TH = out_TH * self.output_scale
        return out_TH.view(hidden_states.shape)

    def extra_repr(self) -> str:
        extra = f", identity_experts={self.identity_experts}" if self.identity_experts else ""
        extra += f", output_scale={self.output_scale:g}" if self.output_scale != 1.0 else ""
        return f"num_experts={self.num_experts}, spec={self.spec}, source={self.source!r}{extra}"


class PostNormExperts(nn.Module):
    """Experts whose outputs each pass through one norm before their routing weight (MuseSpark's
    ``post_expert_norm``): ``sum_k w_k * norm(expert_k(x))``.

    The canonical op sums its pairs' outputs, so the norm cannot go after it; here each (token, expert)
    pair is its own row of one op call (``K = 1``, unit weight), the module's own norm runs on those
    rows, and the routing weights and the sum over ``k`` follow, outside the op.
    """

    def __init__(self, stacked: StackedExperts, norm: nn.Module, source: str):
        super().__init__()
        self.stacked = stacked
        self.norm = norm
        self.source = source

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        H = hidden_states.shape[-1]
        x_TH = hidden_states.reshape(-1, H)
        T, K = top_k_index.reshape(x_TH.shape[0], -1).shape
        x_PH = x_TH.repeat_interleave(K, dim=0)  # pair p = t * K + k
        ones_P1 = torch.ones(T * K, 1, dtype=top_k_weights.dtype, device=x_TH.device)
        y_PH = self.norm(self.stacked(x_PH, top_k_index.reshape(-1, 1), ones_P1))
        out_TH = (y_PH.view(T, K, H) * top_k_weights.reshape(T, K, 1)).sum(dim=1)
        return out_TH.to(hidden_states.dtype).view(hidden_states.shape)


_prepare_log: list[tuple[str, str]] = []


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model``'s MoE blocks traceable (in place); returns ``model``."""
    _prepare_log.clear()
    _switch_eager_experts(model)
    _make_expert_parallel_traceable(model)
    _replace_each(model, _post_norm_experts_parts, _stack_post_norm_experts, "stacked")
    _replace_each(model, _looks_like_weight_experts, _stack_weight_experts, "stacked")
    _replace_each(model, _self_routed_stacked_parts, _route_self_routed_stacked, "routed")
    _replace_each(model, _self_routed_parts, _route_self_routed, "routed")
    _replace_each(model, _looks_like_expert_container, _stack, "stacked")
    _replace_each(model, _single_linear_experts, _why_single_linear_experts_stay, "")  # says why, replaces nothing
    for name, what in _prepare_log:
        log.info("moe_compile.prepare: %s: %s", name or "<model>", what)
    from .backend import register_root

    register_root(model)  # reports name blocks by model's module paths, also after graph breaks
    return model


def _replace_each(model: nn.Module, match, build, verb: str) -> None:
    """Every submodule (not the root, which cannot be replaced in place) that ``match`` accepts is
    replaced by ``build``'s module, or left alone with ``build``'s reason; both are logged.

    ``match(module)`` is a bool or the parts ``build(module, *parts)`` takes (None: no match).
    """
    for name, module in list(model.named_modules()):
        parts = match(module) if name else None
        if parts is None or parts is False:
            continue
        result = build(module) if parts is True else build(module, *parts)
        if isinstance(result, str):
            _prepare_log.append((name, f"left alone: {result}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, result)
        _prepare_log.append((name, f"{verb}: {result.source}"))


def _make_expert_parallel_traceable(model: nn.Module) -> None:
    """Hugging Face ``AllToAllEP`` experts -> the reference EP module on the same shards (collective checks)."""
    from .reference.hf_expert_parallel import all_to_all_implementation, make_traceable

    for name, module in list(model.named_modules()):
        implementation = all_to_all_implementation(module)
        if implementation is None:
            continue
        result = make_traceable(module, implementation)
        if isinstance(result, str):
            _prepare_log.append((name, f"left alone: {result}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, result)
        what = "expert-parallel (HF AllToAllEP) -> reference EP module with functional collectives"
        _prepare_log.append((name, what))


def prepare_report() -> list[tuple[str, str]]:
    """What the last :func:`prepare` did: ``(module path, what)`` pairs."""
    return list(_prepare_log)


def _is_interface_experts(module: nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def _switch_eager_experts(model: nn.Module) -> None:
    """Experts-interface modules running transformers' ``eager`` loop -> ``grouped_mm``.

    The switch is made on the innermost model (``PreTrainedModel``) that holds such experts: a composite
    model's own config may say ``eager`` while its text model, which holds the experts, uses ``grouped_mm``
    (Kimi-K2.5), and some composite classes refuse the switch.
    """
    eager = [name for name, m in model.named_modules() if _is_interface_experts(m)
             and getattr(getattr(m, "config", None), "_experts_implementation", None) == "eager"]  # fmt: skip
    owners = [name for name, m in model.named_modules() if hasattr(m, "set_experts_implementation")]
    done: set[str] = set()
    for experts in eager:
        owner = max((o for o in owners if o == "" or experts.startswith(o + ".")), key=len, default=None)
        if owner is None:
            _prepare_log.append((experts, "left alone: runs transformers' eager experts loop, and no model holding "
                                 "it has set_experts_implementation"))  # fmt: skip
            continue
        if owner in done:
            continue
        done.add(owner)
        try:
            model.get_submodule(owner).set_experts_implementation("grouped_mm")
        except ValueError as err:
            _prepare_log.append((owner, f"left alone: experts implementation stays eager: {err}"))
            continue
        _prepare_log.append((owner, "experts implementation eager -> grouped_mm"))


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.children() if isinstance(m, nn.Linear)]


def _container_members(module: nn.Module) -> list[nn.Module] | None:
    """The members of an ``nn.ModuleList``/``nn.ModuleDict`` subclass with its own forward, else None.

    Parameter-free children (a token dropout) are not members: see :func:`_members`.
    """
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module).forward is nn.Module.forward:
        return None
    return _members(module)


def _looks_like_expert_container(module: nn.Module) -> bool:
    children = _container_members(module)
    if children is None or len(children) < 2 or len({type(c) for c in children}) != 1:
        return False
    shapes = {tuple(tuple(p.shape) for p in c.parameters()) for c in children}
    return len(shapes) == 1 and len(_linears(children[0])) in (2, 3)


def _post_norm_experts_parts(module: nn.Module) -> tuple[nn.Module] | None:
    """``(norm,)`` of transformers' experts-interface module with a post-expert norm: stacked ``gate_up_proj``
    ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, and one child module, the norm of each expert's output."""
    if not _is_interface_experts(module) or getattr(module, "is_transposed", True) or not module.has_gate:
        return None
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 or len(children) != 1:
        return None
    if any(p is not up and p is not down for p in module.parameters(recurse=False)):
        return None
    return (children[0],)


def _stack_post_norm_experts(module: nn.Module, norm: nn.Module) -> PostNormExperts | str:
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
    with torch.no_grad(), _in_eval(module):
        expected = module(x, ids, w)
        for act in ACTIVATIONS:
            if act in PARAMETRIC:
                continue
            spec = ExpertSpec(activation=act)
            stacked = StackedExperts(w_up, w_down, None, None, spec, f"{E} stacked experts, {spec.describe()}")
            candidate = PostNormExperts(stacked, norm, f"{stacked.source}, each output normed ({type(norm).__name__})")
            if _close(candidate(x, ids, w), expected):
                return candidate
    return "no canonical activation followed by its norm reproduces the experts' outputs"


def _single_linear_experts(module: nn.Module) -> bool:
    """A container with its own forward over ``>= 2`` identical children that are each one ``nn.Linear``."""
    children = _container_members(module)
    return (
        children is not None
        and len(children) >= 2
        and all(type(c) is nn.Linear for c in children)
        and len({tuple(c.weight.shape) for c in children}) == 1
    )


def _why_single_linear_experts_stay(module: nn.Module) -> str:
    """Why a container of single ``nn.Linear`` experts is left as it is (always: it is reported, never replaced)."""
    args = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    picked = f"its forward({', '.join(args)}) picks them" if args else "its forward picks them"
    return (
        f"its {len(_members(module))} experts are single nn.Linear layers, not MLPs (no up projection, activation "
        f"and down projection), and {picked} itself (e.g. by an input index, as ViTPose's per-dataset experts): "
        "outside the canonical op, which computes sum_k w_k * down(act(up(x)))"
    )


def _members(container: nn.Module) -> list[nn.Module]:
    return [c for c in container.children() if any(True for _ in c.parameters())]


def _ordered_experts(container: nn.Module) -> list[nn.Module] | None:
    """Children in expert-index order (``expert_3`` is expert 3), or None if unclear."""
    if isinstance(container, nn.ModuleList):
        return _members(container)
    keys = [k for k, c in container.items() if any(True for _ in c.parameters())]
    indices = [int(m.group(1)) if (m := re.search(r"(\d+)$", k)) else None for k in keys]
    if None in indices or sorted(indices) != list(range(len(keys))):
        return None
    return [container[k] for _, k in sorted(zip(indices, keys))]


def _call_order(expert: nn.Module, x: torch.Tensor) -> list[nn.Linear]:
    order: list[nn.Linear] = []
    hooks = [lin.register_forward_hook(lambda m, *_: order.append(m)) for lin in _linears(expert)]
    try:
        expert(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def _stack(container: nn.Module) -> StackedExperts | str:
    experts = _ordered_experts(container)
    if experts is None:
        return "expert keys do not end in 0..E-1"
    with _in_eval(container):
        stacked = _stack_experts(experts)
        if isinstance(stacked, str):
            return stacked
        lin0 = _linears(experts[0])[0]
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if _same_container(container, stacked, lin0.in_features, lin0.weight.dtype, gen):
                if stacked.output_scale != 1.0:
                    stacked.source += f", output scaled by {stacked.output_scale:g}"
                return stacked
        return "the container's forward is not sum_k weight * expert(x) over its selection"


@contextlib.contextmanager
def _in_eval(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (dropout off) for the duration, then as it was."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _stack_experts(experts: list[nn.Module]) -> StackedExperts | str:
    """The experts (identical MLPs of 2-3 ``nn.Linear``, in eval mode) stacked, checked expert by expert."""
    first = experts[0]
    lin0 = _linears(first)[0]
    H, dtype = lin0.in_features, lin0.weight.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, H, generator=gen).to(dtype=dtype, device=lin0.weight.device)
    with torch.no_grad():
        order = _call_order(first, x)
        if len(order) != len(_linears(first)):
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


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    return err <= _TOLERANCE.get(b.dtype, 1e-5)


def _same_experts(experts, spec, w_up, w_down, b_up, b_down, x) -> bool:
    for e, expert in enumerate(experts):
        up = x @ w_up[e].t() + (b_up[e] if b_up is not None else 0)
        y = activate(up, spec) @ w_down[e].t() + (b_down[e] if b_down is not None else 0)
        if not _close(y, expert(x)):
            return False
    return True


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
        if _close(got, expected):
            return True
        # a constant factor on the output (NLLB-MoE's eval-time ``1 - moe_token_dropout``): fitted by least
        # squares, then the shortest decimal that reproduces the output (0.8, not bf16's 0.7996)
        fit = ((got.double() * expected.double()).sum() / got.double().square().sum()).item()
        for digits in range(1, 7):
            scale = round(fit, digits)
            if 0 < scale and scale != 1.0:
                stacked.output_scale = scale
                if _close(stacked(x, selection, w), expected):
                    return True
            stacked.output_scale = 1.0
    return False


# -- experts modules holding stacked weights ------------------------------------------------------------------------

_EXPERT_COUNT_ATTRS = ("num_experts", "moe_num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts")


@dataclasses.dataclass
class _WeightForm:
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


def _expert_weight_views(module: nn.Module) -> tuple[int, int, list[tuple[str, torch.Tensor]]] | None:
    """``(E, Z, views)`` when every parameter of ``module`` is expert-stacked: ``[E', a, b]`` (``E' >= E``:
    rows past ``E`` belong to ``Z = E' - E`` identity experts) or flattened ``[E * a, b]`` (DBRX), else None."""
    params = [(n, p.detach()) for n, p in module.named_parameters()]
    if not 2 <= len(params) <= 3:
        return None
    stacked = [p.shape[0] for _, p in params if p.dim() == 3]
    if stacked:
        E = min(stacked)
    else:
        counts = [getattr(module, a) for a in _EXPERT_COUNT_ATTRS if isinstance(getattr(module, a, None), int)]
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


def _large_input_scale(weights: list[torch.Tensor], H: int) -> float:
    """A factor for unit-variance hidden states that makes ``x @ w.T`` about 30 in size, for any ``[E, ., H]``
    or ``[E, H, .]`` reading of ``weights`` (the smallest typical row norm along a size-``H`` dimension)."""
    norms = []
    for w in weights:
        for dim in (1, 2):
            if w.shape[dim] == H:
                norms.append(w.float().norm(dim=dim).mean().item())
    norm = min((n for n in norms if n > 0), default=1.0)
    return 30.0 / norm


def _weight_forms(views: list[tuple[str, torch.Tensor]], hidden: int | None = None) -> Iterator[_WeightForm]:
    """Every consistent reading of the views as (gate,) up, down, each either ``[E, out, in]`` or
    ``[E, in, out]``, with every activation; ``hidden``, when known, fixes ``H``."""
    for order in itertools.permutations(range(len(views))):
        for flips in itertools.product((False, True), repeat=len(views)):
            ws = [views[i][1].transpose(1, 2) if f else views[i][1] for i, f in zip(order, flips)]
            names = ", ".join(f"{views[i][0]}{'.T' if f else ''}" for i, f in zip(order, flips))
            *ups, down = ws
            H, I = down.shape[1], down.shape[2]
            if (hidden is not None and H != hidden) or any(u.shape[2] != H for u in ups):
                continue
            if len(ups) == 2:  # gate, up
                if ups[0].shape[1] != I or ups[1].shape[1] != I:
                    continue
                for act in ACTIVATIONS:
                    yield _WeightForm(ups[0], ups[1], down, ExpertSpec(activation=act), f"gate {names}")
                continue
            up = ups[0]
            if up.shape[1] == 2 * I:
                for layout, act in itertools.product(GATE_LAYOUTS, ACTIVATIONS):
                    spec = ExpertSpec(activation=act, gate_layout=layout)
                    yield _WeightForm(None, up, down, spec, f"gate_up {names}, {layout}")
            if up.shape[1] == I:
                for act in ACTIVATIONS:
                    if act != "swiglu_oai":
                        yield _WeightForm(None, up, down, ExpertSpec(activation=act, gated=False), f"up {names}")


def _ours(module: nn.Module) -> bool:
    """A module of moe_compile's own (a replacement, the reference EP module): never probed or replaced."""
    return type(module).__module__.split(".")[0] == __name__.split(".")[0]


_SELECTION_NAME = re.compile(r"ind|idx|ids|expert|select|mask|rout")
_WEIGHTS_NAME = re.compile(r"weight|prob|gate|score")


def _looks_like_weight_experts(module: nn.Module) -> bool:
    """An experts module (not a container) with ``forward(hidden, top_k_index, top_k_weights)`` whose
    parameters are all expert-stacked, and not transformers' experts interface (already traceable)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module).forward is nn.Module.forward:
        return False
    if _ours(module):
        return False  # already traceable (StackedExperts, the reference expert-parallel module: collectives)
    if _is_interface_experts(module):
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
    return _expert_weight_views(module) is not None


def _stack_weight_experts(module: nn.Module) -> StackedExperts | str:
    """The module as :class:`StackedExperts`, when one reading of its weights gives its outputs on random inputs.

    Hidden states are probed as ``[T, H]`` and ``[1, T, H]``; every shape the module takes must give its
    values, and one its exact output shape (DBRX's experts return ``[T, 1, H]`` for ``[T, H]``; they are
    called with ``[B, S, H]``). Each is probed at unit scale and at a scale that makes the projections
    about 30 in size, so that a clamp (Step3p7's ``swiglu_limits``) cannot hide behind small values.
    """
    E, Z, views = _expert_weight_views(module)
    dtype, device = views[0][1].dtype, views[0][1].device
    gen = torch.Generator().manual_seed(3)
    T, K = 9, min(2, E + Z)
    ids_real = torch.rand(T, E, generator=gen).argsort(-1)[:, :K].to(device)  # real experts only
    ids_all = torch.rand(T, E + Z, generator=gen).argsort(-1)[:, :K].to(device)  # with the identity ones
    weights = torch.rand(T, K, generator=gen).to(dtype=dtype, device=device)
    probes: dict[int, list | str] = {}  # H -> [(x, ids, expected)] the module accepts, or why none

    def run_probes(H: int) -> list | str:
        x_TH = torch.randn(T, H, generator=gen).to(dtype=dtype, device=device)
        big_TH = x_TH * _large_input_scale([v for _, v in views], H)
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
            if not _close(got.reshape(-1), expected.reshape(-1)):
                return False
            exact_shape |= got.shape == expected.shape
        return exact_shape

    with _in_eval(module), torch.no_grad():
        for form in _weight_forms(views):
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
            if not _close(form(x0.reshape(T, H), ids0, weights).reshape(-1), expected0.reshape(-1)):
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


# -- self-routed MoE modules ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Routing:
    """A top-k routing rule: ``logits [T, E]`` -> ``(weights [T, K] fp32, ids [T, K])``.

    ``score``: "softmax" or "sigmoid" of the logits, in fp32; ``order``: "score-topk" (score, then
    the k best) or "topk-softmax" (the k best logits, then a softmax over them);
    ``renormalise``: the k weights divided by their sum.
    """

    k: int
    score: str = "softmax"
    order: str = "score-topk"
    renormalise: bool = False

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order == "topk-softmax":
            top, ids = torch.topk(logits, self.k, dim=-1)
            return torch.softmax(top.float(), dim=-1), ids
        scores = torch.softmax(logits.float(), dim=-1) if self.score == "softmax" else torch.sigmoid(logits.float())
        weights, ids = torch.topk(scores, self.k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def describe(self) -> str:
        if self.order == "topk-softmax":
            return f"top-{self.k} of the logits -> softmax"
        return f"{self.score} -> top-{self.k}" + (" -> renormalise" if self.renormalise else "")


def _routings(num_experts: int):
    for k in range(1, min(num_experts, 8) + 1):
        yield Routing(k, "softmax", "score-topk", False)
        yield Routing(k, "softmax", "score-topk", True)
        yield Routing(k, "softmax", "topk-softmax", False)
        yield Routing(k, "sigmoid", "score-topk", False)
        yield Routing(k, "sigmoid", "score-topk", True)


class RoutedExperts(nn.Module):
    """A MoE module that routed its tokens itself, as its router, a :class:`Routing` and stacked experts."""

    def __init__(
        self,
        router: nn.Linear,
        experts: StackedExperts,
        routing: Routing,
        returns_logits: bool,
        source: str,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.routing = routing
        self.returns_logits = returns_logits
        self.source = source
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # [H], after the experts

    def forward(self, hidden_states: torch.Tensor):
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE = self.router(x_TH)
        weights_TK, ids_TK = self.routing(logits_TE)
        out = self.experts(x_TH, ids_TK, weights_TK.to(x_TH.dtype)).view(hidden_states.shape)
        if self.bias is not None:
            out = out + self.bias
        return (out, logits_TE) if self.returns_logits else out

    def extra_repr(self) -> str:
        return f"routing={self.routing.describe()}, returns_logits={self.returns_logits}"


def _self_routed_parts(module: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """``(router, experts)`` of a module that owns exactly a router ``nn.Linear(H, E)`` and a plain
    list (or dict) of ``E`` identical MLPs, and whose own forward routes (else None)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, RoutedExperts)) or type(module).forward is nn.Module.forward:
        return None
    if any(True for _ in module.parameters(recurse=False)):
        return None
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    routers = [c for c in children if isinstance(c, nn.Linear)]
    lists = [c for c in children if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
    if len(routers) != 1 or len(lists) != 1 or len(children) != 2:
        return None
    router, experts = routers[0], lists[0]
    if type(experts).forward is not nn.Module.forward:
        return None  # a container with its own forward(hidden, selection, weights): stacked, not routed here
    members = list(experts.children())
    if len(members) != router.out_features or len(members) < 2 or len({type(m) for m in members}) != 1:
        return None
    shapes = {tuple(tuple(p.shape) for p in m.parameters()) for m in members}
    if len(shapes) != 1 or len(_linears(members[0])) not in (2, 3):
        return None
    if _linears(members[0])[0].in_features != router.in_features:
        return None
    return router, experts


def _route_self_routed(module: nn.Module, router: nn.Linear, container: nn.Module) -> RoutedExperts | str:
    """The module as :class:`RoutedExperts`, when one routing rule reproduces it on random inputs."""
    experts = _ordered_experts(container)
    if experts is None:
        return "expert keys do not end in 0..E-1"
    with _in_eval(module):
        stacked = _stack_experts(experts)
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
            for routing in _routings(len(experts)):
                candidate = RoutedExperts(router, stacked, routing, returns_logits, "")
                if all(_same_output(candidate(x), e) for x, e in zip(probes, expected)):
                    candidate.source = f"self-routed MoE, {routing.describe()}, {stacked.source}"
                    return candidate
            return "no top-k routing rule (softmax or sigmoid, k <= 8, renormalised or not) reproduces its output"


def _same_output(got, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == expected.shape and _close(got, expected)
    return (
        isinstance(got, tuple)
        and len(got) == len(expected)
        and all(g.shape == e.shape and _close(g, e) for g, e in zip(got, expected))
    )


# -- self-routed MoE modules over stacked weights --------------------------------------------------------------------


def _self_routed_stacked_parts(module: nn.Module):
    """``(router, views, bias)`` of a module that owns exactly: one router ``nn.Linear(H, E)`` (at any depth),
    two or three expert-stacked ``[E, ., .]`` parameters in modules of its own (not transformers' experts
    interface, not a replaced module), and at most one ``[H]`` output bias; else None (JetMoE's ``JetMoeMoE``)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module).forward is nn.Module.forward:
        return None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or any(_ours(m) for m in module.modules()):
        return None
    if any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in module.modules()):
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


def _route_self_routed_stacked(module: nn.Module, router: nn.Linear, views, bias) -> RoutedExperts | str:
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
    probes.append(probes[1] * _large_input_scale([v for _, v in views], H))  # a clamp shows at large values
    with _in_eval(module), torch.no_grad():
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
        routed = [(routing, *routing(logits)) for routing in _routings(E)]
        for form in _weight_forms(views, hidden=H):
            for routing, weights, ids in routed:
                got = form(x_TH, ids, weights.to(dtype))
                if bias is not None:
                    got = got + bias
                if not _close(got.reshape(-1), want.reshape(-1)):
                    continue
                w_up, w_down = form.weights()
                stacked = StackedExperts(w_up, w_down, None, None, form.spec, f"{E} experts' stacked weights")
                source = f"self-routed MoE, {routing.describe()}, {E} experts' stacked weights ({form.names})"
                if bias is not None:
                    source += ", output bias"
                candidate = RoutedExperts(router, stacked, routing, returns_logits, source, bias=bias)
                if all(_same_output(candidate(x), e) for x, e in zip(probes, expected)):
                    return candidate
    return (
        "no top-k routing rule (softmax or sigmoid, k <= 8, renormalised or not) with a canonical expert form "
        "of its stacked weights reproduces its output"
    )
