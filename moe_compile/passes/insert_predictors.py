"""Insert each MoE layer's expert predictor on its pre-attention activation; let it drive the prefetch.

Contract
--------
Matches: the calls of ``ctx.moe_blocks`` that :mod:`.offload_experts` (``offload="cpu"``)
or :mod:`.predicted_gather` (``parallel="aep"``) retargeted to ``moe_compile.moe_offload`` (the
consumers of predictions), with ``predictor=PATH``. The prefetch is the same op for both: the call's
store decides whether experts come from host memory or from the other ranks.
For each, in graph order:

1. the decoder layer holding the block: the longest proper prefix of the block's path ending in
   an index (``model.layers.3.mlp`` -> ``model.layers.3``, layer index 3);
2. its pre-attention activation: the first tensor ``[..., H]`` with ``T*H`` elements that a node of
   the layer reads from outside the layer, in graph order (the residual stream entering
   ``input_layernorm``); where there is no such layer or tensor, the block's own input, and the
   report says so;
3. the router weight: the one 2D ``[E, H]`` graph input read by the nodes between the block's
   input and its expert ids (through views such as ``t``).

The file is loaded with :func:`~moe_compile.predictor.load_predictors_for_routers` against those
router weights: a file made for another model raises
:class:`~moe_compile.predictor.PredictorFileError` at compile time.

Emits, per block, before the first node of its decoder layer (shown for layer 1)::

    # before
    add_8: "f32[1, s0, 128]" = aten.add(add_7, view_20)                  # residual entering layer 1
    pow_5: "f32[1, s0, 128]" = aten.pow(add_8, 2)                         # input_layernorm ...
    ...
    moe_1: "f32[s0, 128]" = moe_compile.moe_offload(x_1, ids_1, wts_1, None, 0, 1, spec)

    # after
    add_8: "f32[1, s0, 128]" = aten.add(add_7, view_20)
    moe_predictor1_w1 = get_attr[moe_predictor1_w1]; ... view(view(., [-1]), [256, 128])  (x4 weights)
    reshape_9: "f32[s0, 128]" = aten.reshape(add_8, [-1, 128])
    predict_experts_1: "i64[s0, 2]" = moe_compile.predict_experts(reshape_9, w1, b1, w2, b2, 2, 1e-06)
    offload_prefetch_1: "i64[1]" = moe_compile.offload_prefetch(predict_experts_1, 0, 1)
    pow_5: "f32[1, s0, 128]" = aten.pow(add_8, 2)
    ...
    moe_1: "f32[s0, 128]" = moe_compile.moe_offload(x_1, ids_1, wts_1, offload_prefetch_1, 0, 1, spec)

The prefetch token is a data dependency of the call: it orders the copy before the compute and
keeps the prefetch alive. The four weights are buffers of the graph module, read through two
views (Inductor hands a bare constant given to a custom op to its fake mode, and fails).

``predictor=`` alone is refused by the options (nothing would consume predictions). When no block
is served by an expert store (offload or AEP left every block untouched), the file is still checked
against the graph's routers, no node is inserted and the report says so.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ..graph import add_constant, ancestors_since, module_path, numel, same, set_fake_val, tensor_val, walk_back
from ..predictor import PredictorWeights, load_predictors_for_routers
from ..report import BlockReport, Skipped
from .base import GraphPass
from .moe_call import MoECall
from .state import PassContext
from .vocabulary import VIEWS

aten = torch.ops.aten
_LAYER = re.compile(r"^(.*\.(\d+))\.[^.]+.*$")  # a proper prefix ending in an index: (layer path, index)


@dataclasses.dataclass
class _Site:
    """Where one block's predictor goes, and the router weight the file is checked against."""

    node: fx.Node  # the block's moe / moe_offload call
    report: BlockReport
    layer: int  # decoder layer index (the predictor file's key)
    activation: fx.Node  # what the predictor reads: the pre-attention residual, or the block's input
    before: fx.Node  # the predictor goes just before this node (the layer's first node, or the call)
    where: str  # for the report
    router: torch.Tensor  # [E, H] real value


class InsertPredictors(GraphPass):
    name = "insert_predictors"
    requires = ("moe_blocks",)
    uses = ("stores",)  # the calls it drives are those the expert stores serve

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        blocks = ctx.moe_blocks
        if not blocks:
            return False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        paths = {n: module_path(n) for n in gm.graph.nodes}
        sites = []
        for node, report in sorted(blocks, key=lambda b: order[b.node]):
            site = _site(node, report, ctx, order, paths)
            if isinstance(site, str):
                ctx.report.skipped.append(Skipped(report.path, f"predictor: {site}"))
            else:
                sites.append(site)
        if not sites:
            return False
        consumed = [s for s in sites if s.node.target is torch.ops.moe_compile.moe_offload.default]
        with unset_fake_temporarily():  # raises PredictorFileError for another model's file
            predictors = load_predictors_for_routers(ctx.options.predictor, {s.layer: s.router for s in sites})
            weights = {s.layer: predictors[s.layer].weights() for s in consumed}
        if not consumed:
            ctx.report.notes.append(
                f"predictor {ctx.options.predictor}: checked against {len(sites)} router(s); no node inserted: "
                "no block is served by an expert store (offload or AEP left them untouched: see the skipped blocks)"
            )
            return False
        for site in consumed:
            self._insert(gm, site, weights[site.layer])
        return True

    def _insert(self, gm: fx.GraphModule, site: _Site, w: PredictorWeights) -> None:
        graph = gm.graph
        act = tensor_val(site.activation)
        H = act.shape[-1]
        fake_mode = detect_fake_mode([act])
        with graph.inserting_before(site.before):
            weights = [
                add_constant(gm, f"moe_predictor{site.layer}_{name}", _on(t, act.device), fake_mode)
                for name, t in (("w1", w.w1), ("b1", w.b1), ("w2", w.w2), ("b2", w.b2))
            ]
            hidden = graph.call_function(aten.reshape.default, (site.activation, [-1, H]))  # [T, H]
            set_fake_val(hidden)
            pred = graph.call_function(
                torch.ops.moe_compile.predict_experts.default, (hidden, *weights, w.top_k, w.eps)
            )
            set_fake_val(pred)  # int64 [T, K]
            call = MoECall.from_node(site.node)
            token = graph.call_function(torch.ops.moe_compile.offload_prefetch.default, (pred, call.store, call.layer))
            set_fake_val(token)  # int64 [1]
        call.replace(token=token)
        site.report.predictor = f"{site.where}: {pred.name}({site.activation.name})"
        site.report.rewrites.append("predictor prefetch")


def _site(node: fx.Node, report: BlockReport, ctx: PassContext, order: dict, paths: dict) -> _Site | str:
    call = MoECall.from_node(node)
    x, ids = call.hidden, call.topk_ids
    *_, block_input = walk_back(x, VIEWS)  # the router's input, before the block's reshapes
    T = tensor_val(x).shape[0]
    H = report.hidden_size
    router = _router_weight(ids, block_input, order, ctx, report.num_experts, H)
    if isinstance(router, str):
        return router
    match = _LAYER.match(report.path)
    if match is None:
        index = re.findall(r"\.?(\d+)(?:\.|$)", report.path)
        if not index:
            return f"no layer index in the block's path {report.path!r}; no predictor"
        return _Site(node, report, int(index[-1]), block_input, node, "block input (no decoder layer found)", router)
    layer_path, index = match.group(1), int(match.group(2))
    activation = _pre_attention(layer_path, node, order, paths, T, H)
    if activation is None:
        return _Site(node, report, index, block_input, node, f"block input (no input of {layer_path} found)", router)
    return _Site(node, report, index, *activation, f"pre-attention of {layer_path}", router)


def _pre_attention(layer_path: str, moe: fx.Node, order: dict, paths: dict, T, H) -> tuple[fx.Node, fx.Node] | None:
    """(the residual entering the layer, the first node of the layer that reads it)."""

    def inside(n: fx.Node) -> bool:
        return paths[n] == layer_path or paths[n].startswith(layer_path + ".")

    for node in moe.graph.nodes:
        if order[node] >= order[moe]:
            return None
        if not inside(node):
            continue
        for arg in node.all_input_nodes:
            v = tensor_val(arg)
            if inside(arg) or v is None or not v.is_floating_point() or v.dim() < 2:
                continue
            if same(v.shape[-1], H) and same(numel(v.shape[:-1]), T):
                return arg, node
    return None


def _router_weight(ids: fx.Node, block_input: fx.Node, order: dict, ctx: PassContext, E: int, H: int):
    """The real ``[E, H]`` router weight read between the block's input and its expert ids, or why not."""
    region = ancestors_since([ids], order[block_input] + 1, order)
    found = set()
    for node in region:
        for arg in node.all_input_nodes:
            *_, root = walk_back(arg, VIEWS)
            v = tensor_val(root)
            is_2d = root.op == "placeholder" and v is not None and v.dim() == 2 and v.is_floating_point()
            if is_2d and same(v.shape[0], E) and same(v.shape[1], H):
                found.add(root)
    if len(found) != 1:
        return f"found {len(found)} [E, H] router weights feeding the expert ids, expected one"
    (weight,) = found
    value = ctx.real_value(weight)
    if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.is_meta:
        return f"the router weight {ctx.param_name(weight)} has no known value to check the predictor file against"
    return value


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    with unset_fake_temporarily():  # a real copy, even while the compiler runs under a fake mode
        return tensor.to(device)
