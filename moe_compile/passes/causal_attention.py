"""Causal attention masks that depend only on the sequence length become SDPA's ``is_causal``.

Runs last, with ``causal_attention=True`` (the default). Not about experts: it recovers what
tracing costs the attention around them. Eager Hugging Face attention calls SDPA with
``is_causal=True`` and no mask; traced, ``transformers.masking_utils`` cannot skip the mask
(it may not branch on a symbolic length), so the graph builds an ``[B, 1, L, L]`` boolean mask
from ``arange`` comparisons and every layer runs SDPA's masked path: on CPU the masked flash
kernel computes every block (measured, Qwen3-MoE at 1024 tokens: attention 40% slower than
eager's), on CUDA a mask rules out the flash kernel.

Matches: a call of an SDPA ATen op whose schema has ``is_causal`` and ``attn_mask`` or
``attn_bias`` (``_scaled_dot_product_flash_attention_for_cpu``,
``_scaled_dot_product_efficient_attention``, ``_scaled_dot_product_cudnn_attention``,
``scaled_dot_product_attention``), no dropout, query length equal to key length, and a mask
(boolean, or additive: 0 and -inf, as SDPA's decomposition makes it) that

- reads no tensor input of the graph, only sizes (``SymInt`` inputs, ``sym_size``): no padding
  mask, no position ids given by the caller;
- combines positions with no constant but 0 and +-1 (a sliding window or a chunk size would be
  one: such masks are causal only for short sequences);
- evaluates to the lower triangle: at the graph's own sizes when they are static (up to
  :data:`MAX_MASK_ELEMENTS`), else at two probe lengths.

Emits: the same call with the mask dropped and ``is_causal=True`` (SDPA's top-left causal
mask, equal to the lower triangle when query and key lengths agree); the mask's nodes die.
A mask that fails a check is left as it is and a report note says why.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..graph import hint, op_name, same, tensor_val
from .base import GraphPass
from .state import PassContext

#: a mask larger than this (elements, at the graph's static sizes) is not evaluated to check it
MAX_MASK_ELEMENTS = 1 << 24
#: probe lengths of a dynamic mask
PROBE_LENGTHS = (7, 19)
#: ops whose numeric arguments are positions or offsets (a constant here could be a window size)
_ARITHMETIC = {
    "aten::add", "aten::sub", "aten::rsub", "aten::mul", "aten::div", "aten::floor_divide", "aten::remainder",
    "aten::lt", "aten::le", "aten::gt", "aten::ge", "aten::eq", "aten::ne", "aten::minimum", "aten::maximum",
    "aten::clamp", "aten::clamp_min", "aten::clamp_max",
}  # fmt: skip
_PY_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.lt,
                  operator.le, operator.gt, operator.ge, operator.eq, operator.ne}  # fmt: skip


class CausalAttention(GraphPass):
    name = "causal_attention"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        verdicts: dict[fx.Node, str | None] = {}  # mask node -> None (causal) or why not
        rewritten = 0
        for node in list(gm.graph.nodes):
            fields = _sdpa_fields(node)
            if fields is None:
                continue
            mask_name = "attn_mask" if "attn_mask" in fields else "attn_bias"
            mask = fields[mask_name]
            if not isinstance(mask, fx.Node):
                continue
            why = _call_problem(fields)
            if why is None:
                if mask not in verdicts:
                    verdicts[mask] = _mask_problem(mask, ctx)
                why = verdicts[mask]
            if why is not None:
                note = f"causal_attention: {node.name} keeps its mask: {why}"
                if note not in ctx.report.notes:
                    ctx.report.notes.append(note)
                continue
            fields[mask_name], fields["is_causal"] = None, True
            _replace_call(node, fields)
            rewritten += 1
        if rewritten:
            ctx.report.notes.append(
                f"causal_attention: {rewritten} attention call(s) run with is_causal=True instead of an explicit "
                "causal mask built from the sequence length"
            )
        return rewritten > 0


def _sdpa_fields(node: fx.Node) -> dict[str, Any] | None:
    """Argument name -> value of an SDPA call with ``is_causal`` and a mask argument, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if "scaled_dot_product" not in op_name(node):
        return None
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    if "is_causal" not in names or not ({"attn_mask", "attn_bias"} & set(names)):
        return None
    fields = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            fields[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            fields[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            fields[arg.name] = arg.default_value
        else:
            return None
    return fields


def _replace_call(node: fx.Node, fields: dict[str, Any]) -> None:
    schema = node.target._schema  # type: ignore[union-attr]
    node.args = tuple(fields[a.name] for a in schema.arguments if not a.kwarg_only)
    node.kwargs = {a.name: fields[a.name] for a in schema.arguments if a.kwarg_only}


def _call_problem(fields: dict[str, Any]) -> str | None:
    if fields.get("is_causal"):
        return "it is already causal and masked"
    if fields.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    q, k = tensor_val(fields["query"]), tensor_val(fields["key"])
    if q is None or k is None or not same(q.shape[-2], k.shape[-2]):
        return "query and key lengths may differ (is_causal would align the mask top-left)"
    return None


def _mask_problem(mask: fx.Node, ctx: PassContext) -> str | None:
    """None when ``mask`` is the causal lower triangle for every length it is probed at, else why not."""
    val = tensor_val(mask)
    if val is None or not (val.dtype == torch.bool or val.dtype.is_floating_point):
        return f"the mask is neither boolean nor additive ({getattr(val, 'dtype', 'unknown dtype')})"
    nodes, leaves = _mask_region(mask)
    if isinstance(nodes, str):
        return nodes
    for n in nodes:
        constants = _offset_constants(n)
        if constants:
            return f"the mask compares positions with the constant(s) {constants} (a sliding window or chunk?)"
    sub = _extract(mask, nodes, leaves)
    if leaves:
        probes = [[length for _ in leaves] for length in PROBE_LENGTHS]
    else:
        if hint(val.numel()) > MAX_MASK_ELEMENTS:
            return f"the mask has {hint(val.numel())} elements at this static length: too many to check"
        probes = [[]]
    with unset_fake_temporarily(), torch.no_grad():
        for values in probes:
            try:
                got = sub(*values)
            except Exception as err:  # noqa: BLE001  (a probe that cannot run proves nothing)
                return f"the mask could not be evaluated on probe lengths ({type(err).__name__}: {err})"
            if got.dim() < 2 or got.shape[-1] != got.shape[-2]:
                return f"the mask is not square ({tuple(got.shape)})"
            length = got.shape[-1]
            if not _is_causal(got):
                return f"the mask is not the causal lower triangle (checked at length {length})"
    return None


def _is_causal(mask: torch.Tensor) -> bool:
    """``mask`` ``[..., L, L]`` keeps exactly the lower triangle: True there (boolean) or 0 there and
    -inf (or the dtype's lowest value, which softmax also turns into 0) elsewhere (additive)."""
    length = mask.shape[-1]
    keep = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    dropped = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min)
    return bool(torch.where(keep, mask == 0, dropped).all())


def _mask_region(mask: fx.Node) -> tuple[list[fx.Node] | str, list[fx.Node]]:
    """The nodes ``mask`` is computed from (graph order) and its size leaves (SymInt inputs, ``sym_size``)."""
    region, leaves, stack = set(), [], [mask]
    while stack:
        n = stack.pop()
        if n in region or n in leaves:
            continue
        if n.op == "placeholder" or op_name(n) == "aten::sym_size":
            if isinstance(n.meta.get("val"), torch.SymInt):
                leaves.append(n)
                continue
            if n.op == "placeholder":
                return f"the mask reads the graph input {n.name} (a padding mask or positions)", []
        if n.op == "get_attr":
            return f"the mask reads the constant {n.target}", []
        if n.op != "call_function":
            return f"the mask is computed by a {n.op} node", []
        region.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(region, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def _offset_constants(node: fx.Node) -> list[object]:
    if op_name(node) not in _ARITHMETIC and node.target not in _PY_ARITHMETIC:
        return []
    return [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool) and a not in (0, 1, -1)]


def _extract(mask: fx.Node, nodes: list[fx.Node], leaves: list[fx.Node]) -> fx.GraphModule:
    """A graph module computing ``mask`` from its size leaves."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {leaf: graph.placeholder(f"size_{i}") for i, leaf in enumerate(leaves)}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[mask])
    return fx.GraphModule(torch.nn.Module(), graph)
