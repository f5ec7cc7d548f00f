"""What every pass shares: the context it reads and writes, the order check, timing and debug dumps.

A pass subclasses :class:`GraphPass`, sets ``name`` and implements
:meth:`GraphPass.run`, which transforms the graph module in place and returns
whether it changed anything. The base class times it, lints and recompiles a
changed graph, and writes the before/after dumps in debug mode.

What passes hand to each other lives in typed fields of :class:`PassContext`
(``detected``, ``moe_blocks``, ``presharded``, ...). A pass declares the fields it
reads (``requires``: a pass before it must provide them; ``uses``: read when some
pass provides them, which must then run before it) and the fields it writes
(``provides``). :func:`check_order` verifies a pipeline against these
declarations (``build_pipeline`` calls it) and raises :class:`PipelineOrderError`
naming the pass that runs too early and the one it needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx

from ..options import Options
from ..report import BlockReport, Report

if TYPE_CHECKING:
    from ..runtime.expert_store import ExpertStore
    from .detect_moe import CanonicalCall, MoEMatch


class MoEBlock(NamedTuple):
    """One canonical MoE call of the graph and its report line."""

    node: fx.Node  # the call: moe_compile.moe, or what a later pass retargeted it to
    report: BlockReport


@dataclasses.dataclass
class DetectedMoE:
    """What :mod:`.detect_moe` found: blocks to rewrite, and canonical calls already in the graph."""

    matches: list[MoEMatch] = dataclasses.field(default_factory=list)
    canonical: list[CanonicalCall] = dataclasses.field(default_factory=list)


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
    dumper: Any = None  # moe_compile.debug.GraphDumper in debug mode
    #: the graph is Inductor's post-grad graph (Inductor schedules it next): async_expert_parallel pins its order
    inductor: bool = False

    # --- what passes hand to each other; the comment names the pass that provides each field ---
    #: detect_moe: the MoE blocks found by data flow, and the canonical calls already in the graph
    detected: DetectedMoE | None = None
    #: canonicalize_moe: every canonical call and its report, in the order found (recognize_expert_parallel
    #: replaces the expert-parallel ones)
    moe_blocks: list[MoEBlock] | None = None
    #: recognize_expert_parallel: calls whose expert arguments already are this rank's shards -> their world size
    presharded: dict[fx.Node, int] = dataclasses.field(default_factory=dict)
    #: released_weights: placeholder index -> full expert tensor an earlier parallel compile released
    released_inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: offload_experts, predicted_gather: the graph's expert stores (the compiled callable keeps them alive)
    stores: list[ExpertStore] = dataclasses.field(default_factory=list)
    #: async_expert_parallel, expert_parallel, predicted_gather: wraps the compiled callable (world-size check)
    wrap_compiled: Callable[[Callable], Callable] | None = None

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


#: the :class:`PassContext` fields that passes provide
STATE_FIELDS = ("detected", "moe_blocks", "presharded", "released_inputs", "stores", "wrap_compiled")


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


def reshape_like(graph: fx.Graph, node: fx.Node, like: fx.Node, hidden: fx.Node) -> fx.Node:
    """``node`` reshaped to ``like``'s shape, sizes taken from ``hidden`` where symbolic.

    Inserted at the graph's current insertion point; ``node`` itself when the shapes already agree.
    """
    from ..graph import same, same_shape, tensor_val

    target = tensor_val(like).shape
    if same_shape(tensor_val(node).shape, target):
        return node
    hv = tensor_val(hidden).shape
    sizes = []
    for s in target:
        if isinstance(s, int):
            sizes.append(s)
            continue
        d = next((i for i, h in enumerate(hv) if same(h, s)), None)
        if d is None:
            sizes.append(-1)
            continue
        size = graph.call_function(torch.ops.aten.sym_size.int, (hidden, d))
        size.meta["val"] = hv[d]
        sizes.append(size)
    out = graph.call_function(torch.ops.aten.reshape.default, (node, sizes))
    set_fake_val(out)
    return out


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
