"""Small helpers over FX graphs that several passes share: reading a graph, and editing one."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


def op_name(node: fx.Node) -> str:
    """``aten::mm``, ``transformers::grouped_mm_fallback``, ``getitem``… for call_function nodes."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return getattr(target, "__name__", str(target))


def val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_val(node: object) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def same(a: object, b: object) -> bool:
    """Sizes equal for every value of the symbols (never adds a guard)."""
    try:
        return bool(statically_known_true(a == b))  # type: ignore[arg-type]
    except Exception:
        return False


def same_shape(a: Iterable, b: Iterable) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def numel(shape: Iterable) -> object:
    n: object = 1
    for s in shape:
        n = n * s
    return n


#: the value a data-dependent (unbacked) size takes in probes: e.g. the rows an AllToAll receives
UNBACKED_HINT = 8


def hint(size: object) -> int:
    """A concrete value for a (possibly symbolic) size: its hint.

    A data-dependent size (an unbacked SymInt, say ``u2 + u3``) has none: each of its
    symbols counts as :data:`UNBACKED_HINT`, so that every tensor of one graph agrees.
    """
    if isinstance(size, torch.SymInt):
        h = size.node.hint
        if h is None:
            expr, known = size.node.expr, size.node.shape_env.var_to_val
            h = expr.xreplace({s: known.get(s, UNBACKED_HINT) for s in expr.free_symbols})
        return int(h)
    return int(size)  # type: ignore[call-overload]


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if tensor_val(a) is not None]


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow graph: an edge from each input node to each node that uses it."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def post_dominators(g: nx.DiGraph, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Immediate post-dominator of each node (on the way to the graph's output)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return nx.immediate_dominators(g.reverse(copy=False), output)


def masked_fill_input(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is a masked fill written as ``where(mask, c, x)`` or ``where(mask, x, c)``.

    ``c`` is a constant scalar: a Python number, or a 0-dim tensor computed from no other
    node (``scalar_tensor``, ``full([], c)``). That is how ``torch.where(mask, 0.0, x)``
    traces, and how Inductor's decompositions rewrite ``masked_fill`` in its post-grad
    graph. ``x`` must have the result's shape (no broadcast). Otherwise None.
    """
    if op_name(node) != "aten::where" or len(node.args) != 3:
        return None
    out = tensor_val(node)
    _, a, b = node.args
    for const, data in ((a, b), (b, a)):
        if _is_constant_scalar(const) and isinstance(data, fx.Node):
            v = tensor_val(data)
            if v is not None and out is not None and same_shape(v.shape, out.shape):
                return data
    return None


def _is_constant_scalar(arg: object) -> bool:
    if isinstance(arg, (int, float, bool)):
        return True
    v = tensor_val(arg)
    return v is not None and v.dim() == 0 and not arg.all_input_nodes  # type: ignore[union-attr]


def walk_back(node: fx.Node, through: Iterable[str], max_steps: int = 32) -> Iterator[fx.Node]:
    """Yield ``node`` and then its first argument repeatedly while the op is in ``through``.

    ``aten::where`` in ``through`` is walked only as a masked fill (:func:`masked_fill_input`),
    to the operand whose values it keeps.
    """
    through = set(through)
    for _ in range(max_steps):
        yield node
        if node.op != "call_function" or op_name(node) not in through or not node.args:
            return
        first = masked_fill_input(node) if op_name(node) == "aten::where" else node.args[0]
        if not isinstance(first, fx.Node):
            return
        node = first


def backward_region(roots: Iterable[fx.Node], stop: set[fx.Node], limit: int = 4000) -> list[fx.Node]:
    """Nodes needed to compute ``roots``, not going past (but including) ``stop`` nodes."""
    seen: set[fx.Node] = set()
    queue = deque(roots)
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        queue.extend(node.all_input_nodes)
    return list(seen)


def ancestors_since(nodes: Iterable[fx.Node], lower: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Ancestors of ``nodes`` (themselves included) at graph position ``lower`` or later.

    Bounded searches keep detection linear in depth: through the residual stream every
    layer's ancestors include every earlier layer, but a block's nodes lie in a window.
    """
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if order[n] >= lower]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(a for a in node.all_input_nodes if order[a] >= lower)
    return seen


def descendants_until(node: fx.Node, upper: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Descendants of ``node`` (itself included) at graph position ``upper`` or earlier."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(u for u in n.users if order[u] <= upper)
    return seen


_INDEX = re.compile(r"\[(\d+)\]")
_MODULES = re.compile(r"(?:^|\.)_(?:modules|parameters|buffers)\['([^']+)'\]")


def normalize_module_path(path: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']._parameters['w']`` -> ``model.layers.0.mlp.w``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L\['([^']+)'\]\.?", r"\1.", path)
    path = _MODULES.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    return re.sub(r"\.{2,}", ".", path).strip(".")


def module_path(node: fx.Node) -> str:
    """The innermost module a node came from, normalised (empty if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return normalize_module_path(path)


def common_module_path(nodes: Iterable[fx.Node]) -> str:
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def without_control_deps(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` in which Inductor's ``control_deps`` wrappers are the ops they wrap.

    :mod:`moe_compile.passes.async_expert_parallel` pins its schedule for Inductor by wrapping
    gathers, waits and MoE calls in ``control_deps(extra_deps, subgraph, *args)``; reading a
    graph's structure (tests, debug summaries) is simpler on the ops themselves.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        if node.op != "call_function" or "control_deps" not in str(node.target):
            continue
        subgraph = getattr(gm, node.args[1].target)
        inner = [n for n in subgraph.graph.nodes if n.op == "call_function"]
        if len(inner) != 1:
            continue
        env = dict(zip(subgraph.graph.find_nodes(op="placeholder"), node.args[2:], strict=False))
        op = inner[0]
        with graph.inserting_before(node):
            plain = graph.call_function(
                op.target,
                fx.node.map_arg(op.args, lambda n, env=env: env[n]),
                fx.node.map_arg(op.kwargs, lambda n, env=env: env[n]),
            )
        plain.meta = dict(node.meta)
        node.replace_all_uses_with(plain)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------
# editing a graph: fake values of new nodes, reshapes, constants


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
