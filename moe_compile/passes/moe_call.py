"""One MoE call in a graph, read and written by argument name: :class:`MoECall`.

The passes meet four ops of one family, all computing the canonical op's result ``[T, H]``::

    moe_compile.moe         (hidden, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec)
    moe_compile.moe_triton  (same arguments)
    moe_compile.moe_ep      (same arguments, group_name, world_size, impl)
    moe_compile.moe_offload (hidden, topk_ids, topk_weights, token, store, layer, spec)
    moe_compile.moe_fp8     (hidden, topk_ids, topk_weights, w_up, w_down, w_up_scale, w_down_scale, b_up, b_down,
                             spec)   block-fp8 experts; moe_compile.moe_fp8_triton: the same arguments

:meth:`MoECall.from_node` reads a call's arguments by the names of its op's schema (no pass reads
them by position); :meth:`MoECall.replace` writes some of them back, optionally retargeting the
call to another op of the family (the arguments the new op takes are laid out by its schema);
:meth:`MoECall.insert` makes a new call. See :mod:`moe_compile.ops` for the ops themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers the moe_compile ops)

#: the canonical op's expert tensors, in schema order (``b_up``/``b_down`` may be None)
ROLES = ("w_up", "w_down", "b_up", "b_down")
#: [fp8] the block scales of ``moe_fp8``'s weights (:mod:`moe_compile.ops.fp8`)
SCALE_ROLES = ("w_up_scale", "w_down_scale")


def _ops() -> tuple[Any, ...]:
    mc = torch.ops.moe_compile
    return (
        mc.moe.default,
        mc.moe_triton.default,
        mc.moe_ep.default,
        mc.moe_offload.default,
        *fp8_ops(),
    )


def fp8_ops() -> tuple[Any, ...]:
    """[fp8] the MoE ops on block-fp8 experts (which take the scales too)."""
    mc = torch.ops.moe_compile
    return (mc.moe_fp8.default, mc.moe_fp8_triton.default)


def fp8_refusal(node: fx.Node, what: str) -> str | None:
    """[fp8] Why ``what`` (a pass moving expert weights) leaves a block-fp8 call as it is; None for other calls."""
    if node.target not in fp8_ops():
        return None
    return f"{what}: block-fp8 experts (weights and their block scales) are not supported by this pass yet; left as is"


def is_moe_call(node: fx.Node) -> bool:
    """A call of one of the MoE ops above."""
    return node.op == "call_function" and node.target in _ops()


def _arg_names(target: Any) -> list[str]:
    return [a.name for a in target._schema.arguments]


@dataclasses.dataclass(frozen=True)
class MoECall:
    """The arguments of one MoE call by name; fields an op does not take are None."""

    node: fx.Node
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    spec: str
    w_up: fx.Node | None = None
    w_down: fx.Node | None = None
    b_up: fx.Node | None = None
    b_down: fx.Node | None = None
    #: moe_fp8: the weights' block scales
    w_up_scale: fx.Node | None = None
    w_down_scale: fx.Node | None = None
    #: moe_offload: the prefetch token (None: everything on demand), the store handle, the layer
    token: fx.Node | None = None
    store: int | None = None
    layer: int | None = None
    #: moe_ep: the process group, its size, the local experts' implementation
    group_name: str | None = None
    world_size: int | None = None
    impl: str | None = None

    @classmethod
    def from_node(cls, node: fx.Node) -> MoECall:
        if not is_moe_call(node):
            raise TypeError(f"{node.name} ({node.target}) is not a moe_compile MoE call")
        names = _arg_names(node.target)
        values = dict(zip(names, node.args, strict=False))
        values.update(node.kwargs)
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{node.name}: arguments {missing} of {node.target} are missing")
        return cls(node=node, **values)

    @property
    def op(self) -> str:
        """``moe``, ``moe_triton``, ``moe_ep``, ``moe_offload``, ``moe_fp8`` or ``moe_fp8_triton``."""
        return self.node.target._schema.name.split("::")[-1]

    def experts(self) -> dict[str, fx.Node]:
        """Role -> expert tensor node (``w_up``, ``w_down``, and the biases that are present)."""
        return {role: v for role in ROLES if isinstance(v := getattr(self, role), fx.Node)}

    def named(self) -> dict[str, Any]:
        """Argument name -> value, for this call's op (what :meth:`insert` takes)."""
        return {name: getattr(self, name) for name in _arg_names(self.node.target)}

    def arguments(self, target: Any = None) -> tuple[Any, ...]:
        """The positional arguments of a call of ``target`` (default: this call's op) with these values."""
        return tuple(getattr(self, name) for name in _arg_names(target or self.node.target))

    def replace(self, target: Any = None, **changes: Any) -> MoECall:
        """Set ``changes`` (argument name -> value) on the node, retargeted to ``target`` when given.

        The node's arguments are laid out by ``target``'s schema; the new view is returned.
        """
        new = dataclasses.replace(self, **changes)
        if target is not None:
            self.node.target = target
        self.node.args = new.arguments()
        self.node.kwargs = {}
        return new

    @staticmethod
    def insert(graph: fx.Graph, target: Any, **values: Any) -> fx.Node:
        """A new call of ``target`` at the graph's insertion point, its arguments given by name."""
        names = _arg_names(target)
        unknown = set(values) - set(names)
        if unknown:
            raise TypeError(f"{target} takes no argument {sorted(unknown)}")
        return graph.call_function(target, tuple(values[n] for n in names))
