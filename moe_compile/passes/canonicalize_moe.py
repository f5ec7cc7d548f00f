"""Rewrite each detected MoE block into one call of the canonical op.

Matches: the :class:`~.state.MoEMatch` objects in ``ctx.detected`` (provided by
:mod:`.detect_moe`), and reports the canonical calls already in the graph (from
``moe_compile.prepare``). Provides ``ctx.moe_blocks``: every canonical call with its
report line, which the later passes read.

Emits, per block (``x`` of any shape ``[..., H]``, output cast back if needed)::

    x_TH = aten.reshape(x, [-1, H])
    moe  = moe_compile.moe(x_TH, topk_ids, topk_weights, w_up, w_down, b_up, b_down, spec)
    # every use of the block's old output now uses `moe`; the old expert nodes are dead

Requires, or the block is left untouched with the reason in the report:

- the old output can be computed from ``x``, ``topk_ids``, ``topk_weights`` and
  the block's expert weights and biases alone (a post-expert norm, say, reads
  another parameter: skipped);
- one :class:`~moe_compile.spec.ExpertSpec` reproduces the old subgraph on random
  probe inputs (with the real weights, at the graph's shapes) within the dtype's
  tolerance. The candidates come from the detector's structural guesses; a
  pattern none of them reproduces is not rewritten. With ``verify=False`` the
  first guess is taken unchecked.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import verify
from ..graph import backward_region, hint, op_name, reshape_like, same, set_fake_val, tensor_val
from ..moe_math import check_inputs, moe_torch
from ..report import BlockReport, Skipped
from ..runtime import shards
from ..spec import ExpertSpec
from .base import GraphPass
from .detect_moe import softcap_of
from .moe_call import MoECall
from .state import CanonicalCall, MoEBlock, MoEMatch, PassContext
from .vocabulary import GATHERS, MATMULS, VIEWS

aten = torch.ops.aten

#: how much looser than :data:`moe_compile.verify.TOLERANCE` a candidate spec may be and still count as
#: reproducing the block: the probe runs the whole block (router outputs, sums over ``K``, casts) against
#: the op, whose sorted grouped matmuls sum in another order than the graph's loop or ``bmm``; in fp32
#: that order alone reaches ~1e-5 on the probe's sizes, in bf16 a rounding of the routing weights more
PROBE_SLACK = {torch.float32: 10.0, torch.bfloat16: 1.5}


def probe_tolerance(*dtypes: torch.dtype) -> float:
    """The bound of the probe comparison: the loosest of ``dtypes``, each :func:`verify.tolerance` x its slack."""
    return max(verify.tolerance(d) * PROBE_SLACK.get(d, 1.0) for d in dtypes)


class _NotCanonical(Exception):
    """The block cannot be rewritten: the message says why (it goes to ``report.skipped``)."""


class _BiasRoles(NamedTuple):
    b_up: fx.Node | None
    b_down: fx.Node | None


@dataclasses.dataclass
class _Choice:
    """The spec that reproduces the block, and how that was checked."""

    spec: ExpertSpec
    verified: str


class _Region:
    """The block's old subgraph, cut out as a standalone graph module, and the bias placeholders it reads."""

    def __init__(
        self, gm: fx.GraphModule, inputs: list[fx.Node], out: fx.Node, nodes: set[fx.Node], biases: list[fx.Node]
    ):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, node in enumerate(inputs):
            env[node] = graph.placeholder(f"in{i}")
        for node in gm.graph.nodes:
            if node in nodes and node not in env:
                env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[out])
        self.module = fx.GraphModule(gm, graph)
        self.inputs = inputs
        self.biases = biases


def _cut_region(m: MoEMatch, ctx: PassContext) -> _Region:
    """The nodes computing ``m.out`` from the block's inputs (and the bias placeholders found)."""
    stop = {m.hidden, m.topk_ids, m.topk_weights, m.w_up, m.w_down}
    # sizes computed in the graph (data-dependent ones, e.g. an AllToAll's split sizes) are region inputs
    computed_sizes = {
        n for n in m.out.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.SymInt)
    }
    nodes = set(backward_region([m.out], stop | computed_sizes))
    biases, syms, foreign = [], [], []
    for node in nodes:
        if node in stop:
            continue
        v = node.meta.get("val")
        if node in computed_sizes:
            syms.append(node)
        elif node.op != "placeholder":
            continue
        elif isinstance(v, torch.SymInt):
            syms.append(node)
        elif isinstance(v, torch.Tensor) and v.dim() == 2 and same(v.shape[0], m.num_experts) and _added(node):
            biases.append(node)
        else:
            foreign.append(ctx.param_name(node))
    if foreign:
        reads = ", ".join(sorted(foreign))
        raise _NotCanonical(f"the block also reads {reads} (e.g. a post-expert norm); not canonical")
    if len(biases) > 2:
        raise _NotCanonical(f"{len(biases)} per-expert vectors feed the block; expected at most two biases")
    inputs = [m.hidden, m.topk_ids, m.topk_weights, m.w_up, m.w_down, *biases, *syms]
    return _Region(m.out.graph.owning_module, inputs, m.out, nodes, biases)


def _added(node: fx.Node) -> bool:
    """A per-expert vector used as a bias (gathered and added), not as a matrix (e.g. a router weight)."""
    return not any(op_name(u) in MATMULS or op_name(u) in ("aten::t", "aten::permute") for u in node.users)


def _bias_roles(m: MoEMatch, biases: list[fx.Node]) -> _BiasRoles:
    b_up = b_down = None
    for b in biases:
        # an up bias is added before the down matmul, so the down matmul depends on it
        feeds_down = _depends_on(m.down_mm, b)
        if feeds_down and b_up is None:
            b_up = b
        elif not feeds_down and b_down is None:
            b_down = b
        else:
            raise _NotCanonical("could not tell the up bias from the down bias")
    return _BiasRoles(b_up, b_down)


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _own_rows(ctx: PassContext, node: fx.Node, shape: list[int]) -> torch.Tensor | None:
    """An expert tensor whose full value is gone (released, or a sharded load's): the rows this rank holds
    of it (its shards and resident experts, :mod:`moe_compile.runtime.shards`), tiled to ``shape`` [E, ...],
    so that the probe runs on this rank's own weights; None when it holds none."""
    index = ctx.placeholder_index(node)
    full = ctx.released_inputs.get(index) if index is not None else None
    kept = [t for t in shards.registered(full) if tuple(t.shape[1:]) == tuple(shape[1:])] if full is not None else []
    if not kept or not shape:
        return None
    rows = torch.cat([t.detach() for t in kept])  # [n, ...]
    return rows.repeat(-(-shape[0] // rows.shape[0]), *[1] * (rows.dim() - 1))[: shape[0]].contiguous()


def _probe_inputs(m: MoEMatch, region: _Region, ctx: PassContext, seed: int = 0) -> list | None:
    """Random hidden states, routing and weights, real expert weights (None when on meta)."""
    gen = torch.Generator().manual_seed(seed)
    values, ids_value = [], None
    for node in region.inputs:
        v = node.meta["val"]
        if isinstance(v, torch.SymInt):
            values.append(hint(v))
            continue
        shape = [hint(s) for s in v.shape]
        real = ctx.real_value(node) if node.op == "placeholder" else None
        if real is None and node.op == "placeholder":
            real = _own_rows(ctx, node, shape)  # released or never loaded whole: this rank's experts
        if isinstance(real, torch.Tensor) and not isinstance(real, torch._subclasses.FakeTensor):
            if real.is_meta:
                return None
            values.append(real)
        else:
            if node is m.topk_ids:  # k distinct experts per token
                T, K = shape
                value = ids_value = torch.rand(T, m.num_experts, generator=gen).argsort(-1)[:, :K]
            elif node is m.topk_weights and m.dense_scores:  # [T, E]: positive at the ids, zero elsewhere
                assert ids_value is not None  # the ids come first in region.inputs
                picked = torch.rand(ids_value.shape, generator=gen, dtype=v.dtype)
                value = torch.zeros(shape, dtype=v.dtype).scatter(1, ids_value, picked)
            elif node is m.topk_weights:  # positive, like a router's
                value = torch.rand(shape, generator=gen)
            else:
                value = torch.randn(shape, generator=gen)
            # the same strides as in the graph: views in the region may rely on them
            probe = torch.empty_strided(shape, [hint(s) for s in v.stride()], dtype=v.dtype)
            values.append(probe.copy_(value))
        if v.device.type == "meta":
            return None
    device = next((x.device for x in values if isinstance(x, torch.Tensor) and x.device.type != "cpu"), None)
    return [x.to(device) if device is not None and isinstance(x, torch.Tensor) else x for x in values]


def _choose_spec(m: MoEMatch, region: _Region, roles: _BiasRoles, ctx: PassContext) -> _Choice:
    """The first candidate spec that reproduces the block on probe inputs; :class:`_NotCanonical` if none does."""
    if not ctx.options.verify:
        return _Choice(m.candidates[0], "not verified (verify=False)")
    # the compiler may run under a fake-tensor mode: the probe computes for real
    with unset_fake_temporarily(), torch.no_grad():
        return _verify(m, region, roles, ctx)


def _verify(m: MoEMatch, region: _Region, roles: _BiasRoles, ctx: PassContext) -> _Choice:
    """Each candidate must reproduce the block twice: on unit-scale hidden states, and on hidden states scaled
    so that the up projection is about 30 in size, so that a clamp or saturation the candidate lacks (Step-3.7's
    ``swiglu_limits``, a bound of 7) cannot hide behind small probe values."""
    probe = _probe_inputs(m, region, ctx)
    if probe is None:
        return _Choice(m.candidates[0], "not verified (meta tensors)")
    value = dict(zip(region.inputs, probe, strict=True))
    x, ids, weights, w_up, w_down = (value[n] for n in (m.hidden, m.topk_ids, m.topk_weights, m.w_up, m.w_down))
    if m.dense_scores:
        weights = weights.gather(1, ids)  # what the rewrite passes the op
    b_up, b_down = (value[b] if b is not None else None for b in roles)
    scales = (1.0, verify.large_input_scale([w_up], m.hidden_size))
    probes = []  # (x, the block's output on it) at each scale
    for scale in scales:
        scaled = [p * scale if n is m.hidden else p for n, p in zip(region.inputs, probe, strict=True)]
        probes.append((x * scale, region.module(*scaled)))
    # the tolerance of the least precise dtype involved (bf16 experts may sum in fp32)
    tol = probe_tolerance(probes[0][1].dtype, x.dtype, w_up.dtype)
    best, best_spec = float("inf"), None
    for spec in m.candidates:
        try:
            check_inputs(x.reshape(-1, m.hidden_size), ids, weights, w_up, w_down, b_up, b_down, spec)
            errs = []
            for x_s, expected in probes:
                got = moe_torch(x_s.reshape(-1, m.hidden_size), ids, weights, w_up, w_down, b_up, b_down, spec)
                errs.append(verify.rel_err(got.reshape(expected.shape).to(expected.dtype), expected))
        except RuntimeError:  # the weights do not fit this layout
            continue
        err = max(errs)
        if err < best:
            best, best_spec = err, spec
        if err <= tol:
            return _Choice(spec, f"probe rel err {errs[0]:.1e} (x{scales[1]:.3g} inputs: {errs[1]:.1e})")
    closest = f", closest: {best_spec.describe()}" if best_spec is not None else ""
    raise _NotCanonical(
        f"{_unmatched_ops(m, region)} (no canonical form reproduces the block: best rel err {best:.2g}{closest})"
    )


#: ops the canonical op's activations and combine are made of (besides views and row gathers)
_CANONICAL_OPS = {
    "aten::silu", "aten::gelu", "aten::relu", "aten::sigmoid", "aten::tanh", "aten::mul", "aten::add",
    "aten::clamp", "aten::clamp_min", "aten::clamp_max", "aten::slice", "aten::split", "aten::split_with_sizes",
    "aten::chunk", "aten::narrow", "getitem", "aten::sum", "aten::empty_like", "aten::arange", "aten::index_put",
    "aten::new_zeros", "aten::zeros", "aten::zeros_like", "aten::index_add", "aten::scatter_add", "aten::copy",
    "aten::sym_size", "aten::select", "aten::histc", "aten::cumsum", "aten::sort", "aten::floor_divide",
    "aten::div", "aten::full", "aten::scalar_tensor", "aten::ge", "aten::lt", "aten::where", "aten::fill",
}  # fmt: skip


def _unmatched_ops(m: MoEMatch, region: _Region) -> str:
    """The cause of a failed verification, named by the ops the canonical activations do not contain.

    Between the up and down projections the canonical op computes an activation (optionally
    gated, clamped or softcapped); ops beyond those (``pow`` other than relu²'s square, a
    ``tanh`` softcap in another place than the softcapped SwiGLU's, ``erf`` or ``exp`` of a
    custom one, a norm) are named, and so is anything between the down projection and the
    block's output other than the routing-weight multiply and the scatter/sum back to tokens.
    """
    known = _CANONICAL_OPS | VIEWS | GATHERS | MATMULS
    nodes = {n for n in region.module.graph.nodes if n.op == "call_function"}
    names = {op_name(n) for n in nodes}
    between = _between(m)
    act_ops = {op_name(n) for n in between}
    odd = sorted(n.removeprefix("aten::") for n in (names | act_ops) - known)
    # relu² (relu then a square) is canonical: another power, or a square of something else, is a cause
    powers = sorted({repr(n.args[1]) for n in between if op_name(n) == "aten::pow" and len(n.args) > 1})
    if powers:
        odd.remove("pow")
        if powers != ["2"] or "aten::relu" not in act_ops:
            odd.insert(0, f"pow (exponent {', '.join(powers)}; the one canonical power is relu² = relu(x) ** 2)")
    softcaps = [n for n in between if op_name(n) == "aten::tanh" and softcap_of(n) is not None]
    if softcaps and "aten::gelu" not in act_ops:
        odd = [
            "tanh (a softcap tanh(x / c) * c where the canonical op has none: its one softcapped form is "
            "Inkling 2's cap(gate) * sigmoid(gate) * cap(up))",
            *odd,
        ]
    clamps = sorted({op_name(n).removeprefix("aten::") for n in between if op_name(n).startswith("aten::clamp")})
    if clamps:
        bound = "a bound between the projections in a form the canonical op lacks: its clamped forms are GPT-OSS's"
        odd.insert(
            0, f"{'/'.join(clamps)} ({bound} SwiGLU and a gated activation with gate and up bounded by one limit)"
        )
    if odd:
        return f"ops the canonical activations do not contain: {', '.join(odd)}"
    return "the activation or combine does not match any canonical form (no unknown op: different constants or order)"


def _between(m: MoEMatch) -> set[fx.Node]:
    """The nodes between the up and down projection (the activation)."""
    after_up, stack = set(), [m.up_mm]
    while stack and len(after_up) < 2000:  # descendants of the up projection, up to the down projection
        n = stack.pop()
        if n in after_up:
            continue
        after_up.add(n)
        if n is not m.down_mm:
            stack.extend(n.users)
    seen, stack = set(), [m.down_mm]
    while stack:  # ... that the down projection depends on
        n = stack.pop()
        if n in seen or n not in after_up:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen - {m.up_mm, m.down_mm}


def _layout(m: MoEMatch, spec: ExpertSpec, has_bias: bool) -> str:
    n = "2I" if spec.gated else "I"
    shapes = f"[E,H,{n}]/[E,I,H] transposed" if spec.transposed else f"[E,{n},H]/[E,H,I]"
    extra = [
        s
        for s, on in (("biases", has_bias), ("interleaved gate/up", spec.gated and spec.gate_layout == "interleaved"))
        if on
    ]
    source = {"batched": "per-pair gathered (batched_mm)", "dense": "every expert on every token (bmm over E)"}.get(
        m.source, "grouped"
    )
    return f"fused 3D {shapes}" + "".join(f", {e}" for e in extra) + f"; {source}"


def _report_existing(existing: CanonicalCall) -> BlockReport:
    call = MoECall.from_node(existing.node)
    spec = ExpertSpec.decode(call.spec)
    up, down = tensor_val(call.w_up), tensor_val(call.w_down)
    I = down.shape[1] if spec.transposed else down.shape[2]  # noqa: E741
    n = "2I" if spec.gated else "I"
    quant = spec.describe_quant()  # [fp8] "-" or the block-fp8 form
    return BlockReport(
        path=existing.path,
        num_experts=up.shape[0],
        top_k=tensor_val(call.topk_ids).shape[1],
        hidden_size=tensor_val(call.hidden).shape[-1],
        intermediate_size=int(I),
        activation=spec.describe(),
        layout=f"expert weights stacked by prepare() into [E,{n},H]/[E,H,I]"
        + (", biases" if call.b_up is not None else "")
        + (f"; {quant}" if quant != "-" else ""),
        quantization=quant,
        router=existing.router,
        shared_experts=existing.shared_experts,
        verified="checked by moe_compile.prepare on random inputs",
        rewrites=["canonical moe op (from prepare)"],
    )


class CanonicalizeMoE(GraphPass):
    name = "canonicalize_moe"
    requires = ("detected",)
    uses = ("released_inputs",)  # the weights an earlier parallel compile released are hidden first
    provides = ("moe_blocks",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        blocks: list[MoEBlock] = []
        ctx.moe_blocks = blocks
        for existing in ctx.detected.canonical:
            blocks.append(MoEBlock(existing.node, _report_existing(existing)))
            ctx.report.blocks.append(blocks[-1].report)
        for m in ctx.detected.matches:
            try:
                region = _cut_region(m, ctx)
                roles = _bias_roles(m, region.biases)
                choice = _choose_spec(m, region, roles, ctx)
            except _NotCanonical as why:
                ctx.report.skipped.append(Skipped(m.path, str(why)))
                continue
            node = self._rewrite(gm, m, choice.spec, roles)
            names = {"w_up": m.w_up, "w_down": m.w_down, "b_up": roles.b_up, "b_down": roles.b_down}
            report = BlockReport(
                path=m.path,
                num_experts=m.num_experts,
                top_k=m.top_k,
                hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size,
                activation=choice.spec.describe(),
                layout=_layout(m, choice.spec, roles.b_up is not None or roles.b_down is not None),
                router=m.router,
                shared_experts=m.shared_experts,
                verified=choice.verified,
                rewrites=["canonical moe op"],
                weights={k: ctx.param_name(v) for k, v in names.items() if v is not None},
            )
            ctx.report.blocks.append(report)
            blocks.append(MoEBlock(node, report))
        return bool(blocks)

    def _rewrite(self, gm: fx.GraphModule, m: MoEMatch, spec: ExpertSpec, roles: _BiasRoles) -> fx.Node:
        graph = gm.graph
        with graph.inserting_before(m.out):
            x = graph.call_function(aten.reshape.default, (m.hidden, [-1, m.hidden_size]))
            set_fake_val(x)
            weights = m.topk_weights
            if m.dense_scores:  # [T, E] score, zero outside the ids: the op takes its [T, K] values at the ids
                weights = graph.call_function(aten.gather.default, (weights, 1, m.topk_ids))
                set_fake_val(weights)
            moe = MoECall.insert(
                graph,
                torch.ops.moe_compile.moe.default,
                hidden=x,
                topk_ids=m.topk_ids,
                topk_weights=weights,
                w_up=m.w_up,
                w_down=m.w_down,
                b_up=roles.b_up,
                b_down=roles.b_down,
                spec=spec.encode(),
            )
            set_fake_val(moe)
            moe.meta["moe_block"] = m.path
            result = reshape_like(graph, moe, m.out, m.hidden)
            if tensor_val(result).dtype != tensor_val(m.out).dtype:
                result = graph.call_function(aten._to_copy.default, (result,), {"dtype": tensor_val(m.out).dtype})
                set_fake_val(result)
        m.out.replace_all_uses_with(result)
        return moe
