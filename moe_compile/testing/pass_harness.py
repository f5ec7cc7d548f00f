"""A torch.compile backend for testing passes: runs chosen passes and keeps each graph before and after each.

Like vLLM's ``tests/compile/backend.py``: the graph is compiled exactly as by ``backend="moe_prefill"``
(Dynamo, AOTAutograd, the passes on the inference ATen graph, eager execution or Inductor), but with
the passes the test names instead of :func:`moe_compile.passes.build_pipeline`, and every graph is
recorded::

    harness = PassHarness(DetectMoE(), CanonicalizeMoE())            # or PassHarness(): the whole pipeline
    compiled = torch.compile(model, backend=harness, options={"inductor": False})
    compiled(x)                                                     # compare with eager as usual
    harness.check_before_ops({"aten::_grouped_mm": 2})
    harness.check_after_ops({"moe_compile::moe": 1, "aten::_grouped_mm": 0})
    harness.graph("canonicalize_moe")                               # the fx.Graph after that pass
    harness.report.skipped                                          # why a near miss was left alone

The passes given must be in a valid order (:func:`moe_compile.passes.check_order`); options arrive
as with the real backend (``torch.compile(..., options=...)``, or ``PassHarness(options=...)``).
Graphs are copies (:meth:`fx.Graph.graph_copy`, node metadata included), so later passes do not
change what was recorded. One :class:`GraphRecord` per compiled graph, in compile order.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import fx

from ..backend import compile_graph
from ..graph import op_name
from ..options import Options
from ..passes import GraphPass, PassContext, build_pipeline, check_order
from ..report import Report

__all__ = ["GraphRecord", "PassHarness", "op_counts"]


def op_counts(graph: fx.Graph | fx.GraphModule) -> collections.Counter:
    """How many nodes of each op (:func:`moe_compile.graph.op_name`: ``aten::mm``, ``moe_compile::moe``...)."""
    graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
    return collections.Counter(op_name(n) for n in graph.nodes if n.op == "call_function")


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


@dataclasses.dataclass
class GraphRecord:
    """One compiled graph: its copy before the first pass and after each pass, and what the passes left."""

    stages: list[tuple[str, fx.Graph]] = dataclasses.field(default_factory=list)  # ("before", g), (pass, g)...
    changed: dict[str, bool] = dataclasses.field(default_factory=dict)  # pass name -> whether it changed the graph
    module: fx.GraphModule | None = None  # the live graph module after the last pass (what runs)
    ctx: PassContext | None = None  # the pass context (typed state, report) after the last pass

    @property
    def before(self) -> fx.Graph:
        return self.stages[0][1]

    @property
    def after(self) -> fx.Graph:
        return self.stages[-1][1]

    def graph(self, stage: str) -> fx.Graph:
        """The graph after pass ``stage`` (or ``"before"``)."""
        for name, graph in self.stages:
            if name == stage:
                return graph
        raise KeyError(f"no stage {stage!r}; stages: {[n for n, _ in self.stages]}")


class _Recorded:
    """A pass that records the graph after it runs (and, first in the pipeline, before)."""

    def __init__(self, inner: Any, harness: PassHarness, first: bool):
        self.inner, self.harness, self.first = inner, harness, first
        self.name = getattr(inner, "name", type(inner).__name__)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        if self.first:
            self.harness.records.append(GraphRecord(stages=[("before", _copy(gm.graph))]))
        record = self.harness.records[-1]
        changed = bool(self.inner(gm, ctx))
        record.stages.append((self.name, _copy(gm.graph)))
        record.changed[self.name] = changed
        record.module, record.ctx = gm, ctx
        return changed


class PassHarness:
    """A torch.compile backend running ``passes`` (instances of :class:`GraphPass`; none: the whole pipeline)."""

    def __init__(self, *passes: GraphPass, options: Mapping[str, Any] | None = None):
        if passes:
            check_order(passes)
        self.passes = passes
        self.options = dict(options or {})
        self.records: list[GraphRecord] = []

    # --- the backend ------------------------------------------------------------------------------

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
        options = {**self.options, **(kwargs.get("options") or {})}
        return compile_graph(gm, example_inputs, Options.from_user(options), pipeline=self._pipeline)

    def _pipeline(self, options: Options) -> list[_Recorded]:
        passes = list(self.passes) if self.passes else build_pipeline(options)
        return [_Recorded(p, self, first=i == 0) for i, p in enumerate(passes)]

    # --- what was recorded ------------------------------------------------------------------------

    @property
    def record(self) -> GraphRecord:
        """The only compiled graph's record (an error when there are none or several)."""
        if len(self.records) != 1:
            raise AssertionError(f"expected one compiled graph, the harness saw {len(self.records)}")
        return self.records[0]

    @property
    def report(self) -> Report:
        """The report of the only compiled graph."""
        return self.record.ctx.report

    def graph(self, stage: str) -> fx.Graph:
        return self.record.graph(stage)

    def final_graphs(self) -> list[fx.GraphModule]:
        """Every compiled graph's module after the last pass, in compile order."""
        return [r.module for r in self.records]

    def check_before_ops(self, expected: Mapping[str, int]) -> None:
        """The graph before the passes has exactly these counts of these ops."""
        _check(op_counts(self.record.before), expected, "before the passes")

    def check_after_ops(self, expected: Mapping[str, int], stage: str | None = None) -> None:
        """The graph after pass ``stage`` (default: the last) has exactly these counts of these ops."""
        graph = self.record.after if stage is None else self.record.graph(stage)
        _check(op_counts(graph), expected, f"after {stage or 'the passes'}")


def _check(counts: collections.Counter, expected: Mapping[str, int], when: str) -> None:
    wrong = {op: (counts[op], n) for op, n in expected.items() if counts[op] != n}
    if wrong:
        details = ", ".join(f"{op}: {got} (expected {n})" for op, (got, n) in wrong.items())
        raise AssertionError(f"op counts {when}: {details}")
