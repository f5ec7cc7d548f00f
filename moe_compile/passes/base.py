"""What every pass shares: the context it reads and writes, timing and debug dumps.

A pass subclasses :class:`GraphPass`, sets ``name`` and implements
:meth:`GraphPass.run`, which transforms the graph module in place and returns
whether it changed anything. The base class times it, lints and recompiles a
changed graph, and writes the before/after dumps in debug mode.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.fx as fx

from ..options import Options
from ..report import Report


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read besides the graph, and where results go."""

    options: Options
    report: Report
    graph_name: str = "graph_0"
    #: real values of the graph's placeholders (tensors, ints), in placeholder order, when known
    real_inputs: list[Any] | None = None
    #: placeholder position -> parameter FQN (``model.layers.0.mlp.experts.gate_up_proj``)
    param_names: dict[int, str] = dataclasses.field(default_factory=dict)
    #: set when autograd is on: the backend then runs no pass
    training: bool = False
    #: results handed from one pass to the next (e.g. detected MoE matches)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    dumper: Any = None  # moe_compile.debug.GraphDumper in debug mode

    def placeholder_index(self, node: fx.Node) -> int | None:
        if node.op != "placeholder":
            return None
        for i, n in enumerate(node.graph.find_nodes(op="placeholder")):
            if n is node:
                return i
        return None

    def real_value(self, node: fx.Node) -> Any:
        i = self.placeholder_index(node)
        if i is None or self.real_inputs is None or i >= len(self.real_inputs):
            return None
        return self.real_inputs[i]

    def param_name(self, node: fx.Node) -> str:
        i = self.placeholder_index(node)
        return self.param_names.get(i, node.name) if i is not None else node.name


class GraphPass:
    """Base class: subclasses set ``name`` and implement ``run``."""

    name: str = "pass"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
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


def set_fake_val(node: fx.Node) -> None:
    """Fill ``node.meta["val"]`` by running its target on its inputs' fake values."""
    from torch._guards import detect_fake_mode

    def fake(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]


def add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, fake_mode: Any) -> fx.Node:
    """``tensor`` as a buffer of ``gm``, read through a view: ``view(view(get_attr, [-1]), shape)``.

    Inserted at the graph's current insertion point. Inductor hands a constant passed
    straight to an extern kernel (a collective, a custom op) to its fake mode as a
    real tensor, and fails; a view of the constant is lowered as a view (no copy).
    Without Inductor the two views cost nothing.
    """
    gm.register_buffer(name, tensor)
    graph = gm.graph
    attr = graph.get_attr(name)
    if fake_mode is not None:
        attr.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    flat = graph.call_function(torch.ops.aten.view.default, (attr, [-1]))
    set_fake_val(flat)
    view = graph.call_function(torch.ops.aten.view.default, (flat, list(tensor.shape)))
    set_fake_val(view)
    return view
