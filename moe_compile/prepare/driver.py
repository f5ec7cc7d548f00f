"""The driver of ``prepare``: every step and recogniser over a model's submodules, returning what it did.

:func:`prepare_model` is the whole rewrite; it keeps no state between calls: its report, ``(module path,
what)`` pairs, is its return value. The steps, in order: transformers' experts interface switched from its
eager loop to ``grouped_mm``; Hugging Face ``AllToAllEP`` experts to the reference EP module (collective);
then each recogniser's :class:`~.probe.Form` in :data:`FORMS` order (a module replaced by an earlier form is
not seen by a later one). Adding a form is one module exporting ``FORMS`` and one line here.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from . import containers, post_norm, self_routed, self_routed_stacked, stacked_weights
from .probe import Form, is_interface_experts

log = logging.getLogger("moe_compile.prepare")

#: what :func:`prepare_model` returns: ``(module path, what was done or why it was left alone)``
PrepareReport = list[tuple[str, str]]

#: the recognisers, in the order they run
FORMS: tuple[Form, ...] = (
    *post_norm.FORMS,
    *stacked_weights.FORMS,
    *self_routed_stacked.FORMS,
    *self_routed.FORMS,
    *containers.FORMS,
)


def prepare_model(model: nn.Module) -> PrepareReport:
    """Make ``model``'s MoE blocks traceable, in place; returns what was replaced and what was left, and why."""
    report: PrepareReport = []
    from ..quant.prepare_fp8 import prepare_fp8  # [fp8] transformers' FP8Experts/FP8Linear, before anything probes them

    report.extend(prepare_fp8(model))
    _switch_eager_experts(model, report)
    _make_expert_parallel_traceable(model, report)
    for form in FORMS:
        _replace_each(model, form, report)
    for name, what in report:
        log.info("moe_compile.prepare: %s: %s", name or "<model>", what)
    return report


def _replace_each(model: nn.Module, form: Form, report: PrepareReport) -> None:
    """Every submodule (not the root, which cannot be replaced in place) that ``match`` accepts is
    replaced by ``build``'s module, or left alone with ``build``'s reason; both are logged.

    ``form.match(module)`` is a bool or the parts ``form.build(module, *parts)`` takes (None: no match).
    """
    for name, module in list(model.named_modules()):
        parts = form.match(module) if name else None
        if parts is None or parts is False:
            continue
        result = form.build(module) if parts is True else form.build(module, *parts)
        if isinstance(result, str):
            report.append((name, f"left alone: {result}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, result)
        report.append((name, f"{form.verb}: {result.source}"))


def _make_expert_parallel_traceable(model: nn.Module, report: PrepareReport) -> None:
    """Hugging Face ``AllToAllEP`` experts -> the reference EP module on the same shards (collective checks)."""
    from ..reference.hf_expert_parallel import all_to_all_implementation, make_traceable

    for name, module in list(model.named_modules()):
        implementation = all_to_all_implementation(module)
        if implementation is None:
            continue
        result = make_traceable(module, implementation)
        if isinstance(result, str):
            report.append((name, f"left alone: {result}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, result)
        what = "expert-parallel (HF AllToAllEP) -> reference EP module with functional collectives"
        report.append((name, what))


def _switch_eager_experts(model: nn.Module, report: PrepareReport) -> None:
    """Experts-interface modules running transformers' ``eager`` loop -> ``grouped_mm``.

    The switch is made on the innermost model (``PreTrainedModel``) that holds such experts: a composite
    model's own config may say ``eager`` while its text model, which holds the experts, uses ``grouped_mm``
    (Kimi-K2.5), and some composite classes refuse the switch.
    """
    eager = [name for name, m in model.named_modules() if is_interface_experts(m)
             and getattr(getattr(m, "config", None), "_experts_implementation", None) == "eager"]  # fmt: skip
    owners = [name for name, m in model.named_modules() if hasattr(m, "set_experts_implementation")]
    done: set[str] = set()
    for experts in eager:
        owner = max((o for o in owners if o == "" or experts.startswith(o + ".")), key=len, default=None)
        if owner is None:
            report.append((experts, "left alone: runs transformers' eager experts loop, and no model holding "
                                 "it has set_experts_implementation"))  # fmt: skip
            continue
        if owner in done:
            continue
        done.add(owner)
        try:
            model.get_submodule(owner).set_experts_implementation("grouped_mm")
        except ValueError as err:
            report.append((owner, f"left alone: experts implementation stays eager: {err}"))
            continue
        report.append((owner, "experts implementation eager -> grouped_mm"))
