"""What every pass shares: the base class, the order check, timing and debug dumps.

A pass subclasses :class:`GraphPass`, sets ``name`` and implements
:meth:`GraphPass.run`, which transforms the graph module in place and returns
whether it changed anything. The base class times it, lints and recompiles a
changed graph, and writes the before/after dumps in debug mode.

What passes hand to each other lives in typed fields of :class:`~.state.PassContext`
(:mod:`.state`; ``detected``, ``moe_blocks``, ``presharded``, ...). A pass declares the fields it
reads (``requires``: a pass before it must provide them; ``uses``: read when some
pass provides them, which must then run before it) and the fields it writes
(``provides``). :func:`check_order` verifies a pipeline against these
declarations (``build_pipeline`` calls it) and raises :class:`PipelineOrderError`
naming the pass that runs too early and the one it needs.

The graph-editing helpers a pass uses (``set_fake_val``, ``reshape_like``, ``add_constant``) are in
:mod:`moe_compile.graph` with the other graph utilities.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch.fx as fx

# compatibility re-exports: passes import these from .state and ..graph now
from ..graph import add_constant, reshape_like, set_fake_val
from .state import STATE_FIELDS, MoEBlock, PassContext

__all__ = [
    "GraphPass",
    "MoEBlock",
    "PassContext",
    "PipelineOrderError",
    "add_constant",
    "check_order",
    "reshape_like",
    "set_fake_val",
]


class PipelineOrderError(RuntimeError):
    """A pass runs before a pass whose results it reads (or without one)."""


class GraphPass:
    """Base class: subclasses set ``name``, declare ``requires``/``uses``/``provides``, and implement ``run``."""

    name: str = "pass"
    #: context fields this pass cannot run without: a pass before it must provide each
    requires: tuple[str, ...] = ()
    #: context fields this pass reads when some pass provides them: that pass must run before it
    uses: tuple[str, ...] = ()
    #: context fields this pass writes
    provides: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = {*cls.requires, *cls.uses, *cls.provides} - set(STATE_FIELDS)
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown PassContext fields {sorted(unknown)}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        for field in self.requires:
            if getattr(ctx, field) is None:
                raise PipelineOrderError(f"{_needs(self, field)}, but none ran before it on this graph")
        if ctx.dumper is not None:
            ctx.dumper.before(gm, self.name)
        start = time.perf_counter()
        changed = self.run(gm, ctx)
        if changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        seconds = time.perf_counter() - start
        ctx.report.pass_times[self.name] = ctx.report.pass_times.get(self.name, 0.0) + seconds
        if ctx.dumper is not None:
            ctx.dumper.dump(gm, self.name, changed, seconds)
        return changed


def _producers(field: str) -> list[str]:
    """The names of the pass classes that provide ``field``."""
    found, stack = [], list(GraphPass.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if field in cls.provides and cls.name != GraphPass.name and cls.name not in found:  # not a base
            found.append(cls.name)
    return sorted(found)


def _needs(graph_pass: Any, field: str) -> str:
    by = " or ".join(_producers(field)) or "no known pass"
    return f"pass {graph_pass.name!r} reads PassContext.{field}, which {by} provides"


def check_order(passes: Sequence[Any]) -> None:
    """Raise :class:`PipelineOrderError` unless every pass runs after every pass whose results it reads.

    A field in ``requires`` must be provided by a pass before; a field in ``requires`` or ``uses``
    must not be (re)written by a pass after.
    """
    provided: set[str] = set()
    for i, graph_pass in enumerate(passes):
        later = {f for p in passes[i + 1 :] for f in getattr(p, "provides", ())}
        for field in getattr(graph_pass, "requires", ()):
            if field not in provided:
                where = "runs after it" if field in later else "is not in the pipeline"
                raise PipelineOrderError(f"{_needs(graph_pass, field)}; that pass {where}")
        for field in (*getattr(graph_pass, "requires", ()), *getattr(graph_pass, "uses", ())):
            if field in later:
                raise PipelineOrderError(f"{_needs(graph_pass, field)}; such a pass runs after it")
        provided.update(getattr(graph_pass, "provides", ()))
