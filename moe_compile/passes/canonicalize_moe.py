"""Rewrite each detected MoE block into one call of the canonical op.

Matches: the :class:`~.detect_moe.MoEMatch` objects left by :mod:`.detect_moe`
(and reports the canonical calls already in the graph, from ``moe_compile.prepare``).

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

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers moe_compile::moe)
from ..graph import backward_region, hint, op_name, same, same_shape, tensor_val
from ..report import BlockReport, Skipped
from ..spec import ExpertSpec
from .base import GraphPass, PassContext, set_fake_val
from torch._subclasses.fake_tensor import unset_fake_temporarily
from .detect_moe import MATMULS, CanonicalCall, MoEMatch

aten = torch.ops.aten

#: relative error (Frobenius) under which a candidate spec counts as reproducing the block
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 3e-2}


class _Region:
    """The block's old subgraph, cut out as a standalone graph module."""

    def __init__(self, gm: fx.GraphModule, inputs: list[fx.Node], out: fx.Node, nodes: set[fx.Node]):
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


def _cut_region(m: MoEMatch, ctx: PassContext) -> tuple[_Region, list[fx.Node]] | str:
    """The nodes computing ``m.out`` from the block's inputs, and the bias placeholders found."""

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
        return f"the block also reads {', '.join(sorted(foreign))} (e.g. a post-expert norm); not canonical"
    if len(biases) > 2:
        return f"{len(biases)} per-expert vectors feed the block; expected at most two biases"
    inputs = [m.hidden, m.topk_ids, m.topk_weights, m.w_up, m.w_down, *biases, *syms]
    return _Region(m.out.graph.owning_module, inputs, m.out, nodes), biases


def _added(node: fx.Node) -> bool:
    """A per-expert vector used as a bias (gathered and added), not as a matrix (e.g. a router weight)."""
    return not any(op_name(u) in MATMULS or op_name(u) in ("aten::t", "aten::permute") for u in node.users)


def _bias_roles(m: MoEMatch, biases: list[fx.Node]) -> tuple[fx.Node | None, fx.Node | None] | str:
    b_up = b_down = None
    for b in biases:
        # an up bias is added before the down matmul, so the down matmul depends on it
        feeds_down = _depends_on(m.down_mm, b)
        if feeds_down and b_up is None:
            b_up = b
        elif not feeds_down and b_down is None:
            b_down = b
        else:
            return "could not tell the up bias from the down bias"
    return b_up, b_down


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


def _probe_inputs(m: MoEMatch, region: _Region, ctx: PassContext, seed: int = 0) -> list | None:
    """Random hidden states, routing and weights, real expert weights (None when on meta)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for i, node in enumerate(region.inputs):
        v = node.meta["val"]
        if isinstance(v, torch.SymInt):
            values.append(hint(v))
            continue
        shape = [hint(s) for s in v.shape]
        real = ctx.real_value(node) if node.op == "placeholder" else None
        if isinstance(real, torch.Tensor) and not isinstance(real, torch._subclasses.FakeTensor):
            if real.is_meta:
                return None
            values.append(real)
        else:
            if i == 1:  # topk_ids: k distinct experts per token
                T, K = shape
                value = torch.rand(T, m.num_experts, generator=gen).argsort(-1)[:, :K]
            elif i == 2:  # topk_weights: positive, like a router's
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


def _choose_spec(m: MoEMatch, region: _Region, bias_roles, ctx: PassContext) -> tuple[ExpertSpec | None, str]:
    if not ctx.options.verify:
        return m.candidates[0], "not verified (verify=False)"
    # the compiler may run under a fake-tensor mode: the probe computes for real
    with unset_fake_temporarily(), torch.no_grad():
        return _verify(m, region, bias_roles, ctx)


def _verify(m: MoEMatch, region: _Region, bias_roles, ctx: PassContext) -> tuple[ExpertSpec | None, str]:
    probe = _probe_inputs(m, region, ctx)
    if probe is None:
        return m.candidates[0], "not verified (meta tensors)"
    if True:
        expected = region.module(*probe)
        x, ids, weights, w_up, w_down = probe[:5]
        b_up, b_down = (probe[region.inputs.index(b)] if b is not None else None for b in bias_roles)
        # the tolerance of the least precise dtype involved (bf16 experts may sum in fp32)
        tol = max(TOLERANCE.get(t.dtype, 1e-4) for t in (expected, x, w_up))
        best, best_spec = float("inf"), None
        for spec in m.candidates:
            try:
                got = ops.moe_torch(x.reshape(-1, m.hidden_size), ids, weights, w_up, w_down, b_up, b_down, spec)
            except RuntimeError:
                continue
            err = _rel_err(got.reshape(expected.shape).to(expected.dtype), expected)
            if err < best:
                best, best_spec = err, spec
            if err <= tol:
                return spec, f"probe rel err {err:.1e}"
    closest = f", closest: {best_spec.describe()}" if best_spec is not None else ""
    return None, f"{_unmatched_ops(m, region)} (no canonical form reproduces the block: best rel err {best:.2g}{closest})"


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
    gated or clamped); ops beyond those (``pow`` of relu², ``tanh`` with a ``div`` of a
    softcap, ``erf`` or ``exp`` of a custom one, a norm) are named, and so is anything
    between the down projection and the block's output other than the routing-weight
    multiply and the scatter/sum back to tokens.
    """
    from .detect_moe import GATHERS, VIEWS

    known = _CANONICAL_OPS | VIEWS | GATHERS | MATMULS
    nodes = {n for n in region.module.graph.nodes if n.op == "call_function"}
    names = {op_name(n) for n in nodes}
    act_ops = {op_name(n) for n in _between(m)}
    softcap = "aten::tanh" in act_ops and "aten::gelu" not in act_ops and act_ops & {"aten::div", "aten::mul"}
    odd = sorted(n.removeprefix("aten::") for n in (names | act_ops) - known)
    if softcap and m.candidates and all(c.gated for c in m.candidates):
        odd = ["tanh (a softcap on the gate or up projection)", *odd]
    if "aten::pow" in act_ops and "aten::relu" in act_ops:
        return "activation relu² (relu then pow) is not a canonical activation"
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


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _layout(m: MoEMatch, spec: ExpertSpec, has_bias: bool) -> str:
    n = "2I" if spec.gated else "I"
    shapes = f"[E,H,{n}]/[E,I,H] transposed" if spec.transposed else f"[E,{n},H]/[E,H,I]"
    extra = [s for s, on in (("biases", has_bias), ("interleaved gate/up", spec.gated and spec.gate_layout == "interleaved")) if on]
    source = "per-pair gathered (batched_mm)" if m.source == "batched" else "grouped"
    return f"fused 3D {shapes}" + "".join(f", {e}" for e in extra) + f"; {source}"


def _reshape_like(graph: fx.Graph, node: fx.Node, like: fx.Node, hidden: fx.Node) -> fx.Node:
    """``node`` reshaped to ``like``'s shape, sizes taken from ``hidden`` where symbolic."""
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
        size = graph.call_function(aten.sym_size.int, (hidden, d))
        size.meta["val"] = hv[d]
        sizes.append(size)
    out = graph.call_function(aten.reshape.default, (node, sizes))
    set_fake_val(out)
    return out


def _report_existing(call: CanonicalCall) -> BlockReport:
    x, ids, _weights, w_up, w_down, b_up, b_down, spec_text = call.node.args
    spec = ExpertSpec.decode(spec_text)
    up, down = tensor_val(w_up), tensor_val(w_down)
    I = down.shape[1] if spec.transposed else down.shape[2]  # noqa: E741
    n = "2I" if spec.gated else "I"
    return BlockReport(
        path=call.path,
        num_experts=up.shape[0],
        top_k=tensor_val(ids).shape[1],
        hidden_size=tensor_val(x).shape[-1],
        intermediate_size=int(I),
        activation=spec.describe(),
        layout=f"per-expert nn.Linear, stacked by prepare() into [E,{n},H]/[E,H,I]" + (", biases" if b_up is not None else ""),
        router=call.router,
        shared_experts=call.shared_experts,
        verified="checked by moe_compile.prepare on random inputs",
        rewrites=["canonical moe op (from prepare)"],
    )


class CanonicalizeMoE(GraphPass):
    name = "canonicalize_moe"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        matches: list[MoEMatch] = ctx.state.get("moe_matches", [])
        blocks: list[tuple[fx.Node, BlockReport]] = []
        ctx.state["moe_blocks"] = blocks
        for call in ctx.state.get("moe_canonical", []):
            blocks.append((call.node, _report_existing(call)))
            ctx.report.blocks.append(blocks[-1][1])
        for m in matches:
            cut = _cut_region(m, ctx)
            roles = _bias_roles(m, cut[1]) if not isinstance(cut, str) else cut
            if isinstance(roles, str):
                ctx.report.skipped.append(Skipped(m.path, roles))
                continue
            region, _ = cut
            spec, verified = _choose_spec(m, region, roles, ctx)
            if spec is None:
                ctx.report.skipped.append(Skipped(m.path, verified))
                continue
            node = self._rewrite(gm, m, spec, roles)
            names = {"w_up": m.w_up, "w_down": m.w_down, "b_up": roles[0], "b_down": roles[1]}
            report = BlockReport(
                path=m.path,
                num_experts=m.num_experts,
                top_k=m.top_k,
                hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size,
                activation=spec.describe(),
                layout=_layout(m, spec, roles[0] is not None or roles[1] is not None),
                router=m.router,
                shared_experts=m.shared_experts,
                verified=verified,
                rewrites=["canonical moe op"],
                weights={k: ctx.param_name(v) for k, v in names.items() if v is not None},
            )
            ctx.report.blocks.append(report)
            blocks.append((node, report))
        return bool(blocks)

    def _rewrite(self, gm: fx.GraphModule, m: MoEMatch, spec: ExpertSpec, roles) -> fx.Node:
        graph = gm.graph
        with graph.inserting_before(m.out):
            x = graph.call_function(aten.reshape.default, (m.hidden, [-1, m.hidden_size]))
            set_fake_val(x)
            args = (x, m.topk_ids, m.topk_weights, m.w_up, m.w_down, roles[0], roles[1], spec.encode())
            moe = graph.call_function(torch.ops.moe_compile.moe.default, args)
            set_fake_val(moe)
            moe.meta["moe_block"] = m.path
            result = _reshape_like(graph, moe, m.out, m.hidden)
            if tensor_val(result).dtype != tensor_val(m.out).dtype:
                result = graph.call_function(aten._to_copy.default, (result,), {"dtype": tensor_val(m.out).dtype})
                set_fake_val(result)
        m.out.replace_all_uses_with(result)
        return moe
