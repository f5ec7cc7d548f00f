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
reason, is returned by :func:`prepare_model` (and logged); :func:`prepare` returns the model, and
:func:`prepare_report` gives its report afterwards.

The package: :mod:`.modules` (the replacement modules), one module per recognised form
(:mod:`.containers`, :mod:`.stacked_weights`, :mod:`.self_routed`, :mod:`.self_routed_stacked`,
:mod:`.post_norm`), what they share (:mod:`.probe`) and the driver (:mod:`.driver`).
"""

from __future__ import annotations

import weakref

import torch.nn as nn

from .driver import FORMS, PrepareReport, prepare_model
from .modules import PostNormExperts, RoutedExperts, Routing, StackedExperts

__all__ = [
    "FORMS",
    "PostNormExperts",
    "PrepareReport",
    "RoutedExperts",
    "Routing",
    "StackedExperts",
    "prepare",
    "prepare_model",
    "prepare_report",
]

_reports: weakref.WeakKeyDictionary[nn.Module, PrepareReport] = weakref.WeakKeyDictionary()
_last: PrepareReport = []


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model``'s MoE blocks traceable (in place); returns ``model``.

    What was done is :func:`prepare_report(model) <prepare_report>`; :func:`prepare_model` does the same
    rewrite and returns that report instead of the model.
    """
    report = prepare_model(model)
    _reports[model] = report
    _last[:] = report
    from ..backend import register_root

    register_root(model)  # reports name blocks by model's module paths, also after graph breaks
    return model


def prepare_report(model: nn.Module | None = None) -> PrepareReport:
    """What :func:`prepare` did to ``model``: ``(module path, what)`` pairs (a copy).

    A compatibility call: without ``model`` it answers for the most recent :func:`prepare` of any model
    (as it did when the driver kept a global log). New code calls :func:`prepare_model`, which returns it.
    """
    if model is None:
        return list(_last)
    if model not in _reports:
        raise KeyError(f"prepare_report: {type(model).__name__} was not prepared; call moe_compile.prepare(model)")
    return list(_reports[model])
