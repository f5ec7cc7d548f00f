"""Detect MoE blocks in an inference ATen graph, by data flow.

Matches (per block)::

    expert weights  w_up [E, ., .], w_down [E, ., .]    placeholders (parameters)
    dispatch        x [T, H] rows gathered / sorted by expert id (index, sort, histc…)
    up              matmul(x rows, w_up)      grouped_mm | grouped_mm_fallback | bmm | mm
    activation      silu | gelu | relu | relu² | GPT-OSS clamp+sigmoid | tanh softcaps …, optional bias add
    down            matmul(act, w_down)
    combine         mul(down, routing weights [T, K]) -> scatter back -> sum over K -> out

Found by structure, never by class name:

1. expert weights are 3D placeholders ``[E, ., .]`` whose values reach a matmul,
   directly or through views and an ``index`` by expert id;
2. an up matmul is paired with the first expert matmul that depends on it (down);
3. ``x`` is found by walking back from the up matmul's other operand through
   views and row gathers; ``T`` and ``H`` follow from its shape;
4. ``topk_ids`` is the latest integer ``[T, K]`` tensor that the up or the down
   matmul depends on (looked for among the ancestors of both, from ``x`` on:
   the ids may reach the block only through the down matmul's grouping; else
   among those that ``x`` does not depend on: a router that reads the residual
   stream before the experts' own pre-norm, as in Gemma 4); the
   routing weights are the ``[T, K]`` float tensor that
   multiplies the down matmul's output (walking back through views, casts and
   the sort permutation);
5. the block's output is the first node, on the down matmul's post-dominator
   chain, holding ``T*H`` elements (for ``K = 1``: on the chain after the
   multiplication by the routing weights).

Dense, input-scaled form (Llama 4)::

    up/down         bmm over all E experts of repeat(x, [E, 1]) * scores.T.reshape(-1, 1)
    scores [T, E]   f(scatter(full(c), 1, ids, topk values)), f elementwise with f(c) == 0
    combine         sum over E

is matched when no ids feed the experts and the input is such a product
(:func:`_input_scaled`): the experts outside a token's top k get an exactly zero
input, so the block is the canonical op with ``scale_input`` on the same ids.

Emits: nothing in the graph. Provides ``ctx.detected``
(:class:`~.state.DetectedMoE`): each match (:class:`MoEMatch`) in ``matches``; a
near miss goes to ``ctx.report.skipped`` with its reason. :mod:`.canonicalize_moe`
verifies and rewrites the matches. ``moe_compile::moe`` calls already in the graph
(modules that ``moe_compile.prepare`` stacked) are recorded as :class:`CanonicalCall`
in ``canonical``, so that they are reported and lowered too.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..graph import (
    ancestors_since,
    common_module_path,
    descendants_until,
    module_path,
    numel,
    op_name,
    post_dominators,
    same,
    same_shape,
    tensor_val,
    to_networkx,
    walk_back,
)
from ..report import Skipped
from ..spec import PARAMETRIC, ExpertSpec
from .base import GraphPass
from .moe_call import MoECall
from .state import CanonicalCall, DetectedMoE, MoEMatch, PassContext
from .vocabulary import ACTIVATION_OPS, GATHERS, MATMULS, VIEWS


class _NotMoE(Exception):
    """Two expert matmuls that do not form a block the canonical op computes: the message says why."""


def _expert_weight_uses(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, int, bool]]:
    """matmul node -> (weight placeholder, operand position, gathered by index)."""
    uses: dict[fx.Node, tuple[fx.Node, int, bool]] = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = tensor_val(ph)
        if v is None or v.dim() != 3 or not v.is_floating_point() or not all(isinstance(d, int) for d in v.shape):
            continue  # expert weights are static [E, ., .]; a dynamic dim is a sequence length
        E = v.shape[0]
        if E < 2:
            continue
        frontier = [(ph, False)]
        while frontier:
            node, gathered = frontier.pop()
            for user in node.users:
                name = op_name(user)
                if name in MATMULS:
                    pos = next(i for i, a in enumerate(user.args) if a is node)
                    if pos < 2 or (name == "aten::addmm" and pos < 3):
                        uses.setdefault(user, (ph, pos, gathered))
                elif name in VIEWS:
                    if gathered or _keeps_experts(user, E):  # hidden states [B, S, H] are flattened to [B*S, H]
                        frontier.append((user, gathered))
                elif name == "aten::index" and user.args[0] is node:
                    frontier.append((user, True))
    return uses


def _keeps_experts(node: fx.Node, E: int) -> bool:
    """An expert weight [E, ., .] keeps its expert dimension until a row gather picks experts."""
    v = tensor_val(node)
    return v is not None and v.dim() >= 3 and isinstance(v.shape[0], int) and v.shape[0] == E


def _find_hidden(mm: fx.Node, weight_pos: int) -> fx.Node | None:
    """The tensor whose rows the up matmul multiplies, before any view or row gather."""
    other = [a for i, a in enumerate(mm.args[:2]) if i != weight_pos and isinstance(a, fx.Node)]
    if not other:
        return None
    *_, root = walk_back(other[0], VIEWS | GATHERS)
    return root


def _find_ids(ancestors: set[fx.Node], T: object, E: int, order: dict) -> fx.Node | None:
    """The latest integer [T, K] tensor among the experts' ancestors: this block's expert ids."""
    best = None
    for node in ancestors:
        v = tensor_val(node)
        if v is None or v.is_floating_point() or v.dtype == torch.bool or v.dim() != 2:
            continue
        fits = same(v.shape[0], T) and isinstance(v.shape[1], int) and 1 <= v.shape[1] <= E
        if fits and (best is None or order[node] > order[best]):
            best = node
    return best


def _experts_as_table_rows(gm: fx.GraphModule, order: dict, ctx: PassContext) -> list[tuple[str, str]]:
    """Near misses with no expert matmul to start from: top-k ids picking rows of a weight table by ``embedding``.

    Doge's retrieval experts are rows of two ``nn.Embedding(E, H)`` tables, picked by product-key
    top-k ids (rank-1 experts, ``I = 1``). The detector starts from ``[E, ., .]`` weights reaching a
    matmul, so it would pass such a block by in silence; this names it instead.
    """
    found: dict[str, list[str]] = {}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default):
        table, ids = node.args[:2]
        tv, iv = tensor_val(table), tensor_val(ids)
        if table.op != "placeholder" or tv is None or iv is None or iv.dim() < 2:
            continue
        window = ancestors_since([ids], max(0, order[ids] - 64), order)
        if any(op_name(n) == "aten::topk" for n in window):
            where = module_path(node).rpartition(".")[0] or "<model>"  # the module owning the tables
            found.setdefault(where, []).append(ctx.param_name(table))
    return [
        (where, f"top-k ids pick rows of {' and '.join(tables)} by embedding lookup: experts stored as table rows "
         "(e.g. Doge's rank-1 retrieval experts); the detector needs expert weights [E, ., .] reaching a matmul")
        for where, tables in found.items()
    ]  # fmt: skip


def _not_through(hidden: fx.Node, nodes: list[fx.Node], order: dict) -> set[fx.Node]:
    """Ancestors of ``nodes`` that are not ancestors of ``hidden``: computed beside the experts' input.

    Gemma 4 and MuseSpark route from the residual stream and then norm (or project) it for the
    experts, so this block's ids are computed *before* ``hidden`` in graph order yet do not feed it,
    while every earlier layer's ids do feed it (through the residual). Unbounded: only used when the
    windowed search after ``hidden`` found nothing.
    """
    return ancestors_since(nodes, 0, order) - ancestors_since([hidden], 0, order)


def _find_routing_weights(down_mm: fx.Node, T: object, K: int, order: dict) -> tuple[fx.Node, fx.Node] | None:
    """The [T, K] float tensor multiplied into the down projection's output, and the ``mul`` node."""
    downstream = descendants_until(down_mm, order[down_mm] + 64, order)
    frontier, seen = [down_mm], set()
    for _ in range(8):  # the combine is a few nodes after the down matmul
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                nxt.append(user)
                if op_name(user) != "aten::mul":
                    continue
                for arg in user.all_input_nodes:
                    if arg in downstream:
                        continue
                    found = _token_order_weights(arg, T, K)
                    if found is not None:
                        return found, user
        frontier = nxt
    return None


#: row gathers that reorder rows (the sort permutation), unlike masked_fill / repeat_interleave
_PERMUTES = {"aten::index", "aten::index_select", "aten::gather"}


def _token_order_weights(arg: fx.Node, T: object, K: int) -> fx.Node | None:
    """The ``[T, K]`` float tensor, in token order, that ``arg`` is a view or row gather of.

    Walking back from the weighting, a ``[T, K]``-shaped value met before a row gather (the
    sort permutation) is in the experts' order, not the tokens': with ``K = 1`` the sorted
    weights ``w[perm].unsqueeze(-1)`` are ``[T, 1]`` too. So when the chain passes a gather,
    the first ``[T, K]`` value after it is taken (not a later one: with ``K = E`` the router's
    full score matrix, gathered into the top-k weights, is ``[T, K]`` as well).
    """
    chain = list(walk_back(arg, VIEWS | GATHERS))
    fits = [i for i, n in enumerate(chain) if (v := tensor_val(n)) is not None and v.is_floating_point()
            and same_shape(v.shape, (T, K))]  # fmt: skip
    if not fits:
        return None
    gathers = [i for i, n in enumerate(chain[:-1]) if op_name(n) in _PERMUTES]
    if gathers:
        after = [i for i in fits if i > gathers[0]]
        if after:
            return chain[after[0]]
    return chain[fits[0]]


#: elementwise ops a routing score may pass through after the scatter (the value outside the top k is mapped too)
_SCORE_MAPS = {"aten::sigmoid", "aten::_to_copy", "prims::convert_element_type", "aten::clone", "aten::mul",
               "aten::div", "aten::relu", "aten::exp"}  # fmt: skip
#: how the dense score starts: filled with one constant (argument 1), then the top-k values scattered in
_FILLS = {"aten::full_like": 1, "aten::full": 1, "aten::new_full": 1}
_ZERO_FILLS = {"aten::zeros_like", "aten::zeros", "aten::new_zeros"}


def _input_scaled(mul: fx.Node, E: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(x [T, H], ids [T, K], scores [T, E])`` of experts run densely on a score-scaled input (Llama 4).

    Matches ``repeat(x, [E, 1]) * scores.transpose(0, 1).reshape(-1, 1)`` where ``scores`` is an
    elementwise map ``f`` of ``scatter(full(c), 1, ids, values)`` with ``f(c) == 0``: every token is
    run through every expert, scaled by a score that is exactly zero for the experts outside its top k,
    so (with no biases, checked by the probe) those experts add exactly zero and the block is
    ``sum_k expert_{ids[t,k]}(scores[t, ids[t,k]] * x[t])``. Raises :class:`_NotMoE` saying which
    piece is missing.
    """
    pieces = [a for a in mul.args if isinstance(a, fx.Node)]
    if len(pieces) != 2:
        raise _NotMoE("the experts' input is scaled by a constant, and no expert ids feed the experts")
    roots = [list(walk_back(a, VIEWS)) for a in pieces]
    rep = next((i for i, chain in enumerate(roots) if op_name(chain[-1]) == "aten::repeat"), None)
    if rep is None:
        raise _NotMoE(
            "the experts' input is scaled before the experts and no expert ids feed them; the scaled input is "
            "not a token-for-every-expert repeat (as in Llama 4), so which expert a row belongs to is unknown"
        )
    repeat = roots[rep][-1]
    reps = list(repeat.args[1])
    x = repeat.args[0]
    xv = tensor_val(x)
    if xv is None or xv.dim() != 2 or len(reps) != 2 or reps[0] != E or reps[1] != 1:
        raise _NotMoE(f"the experts' input repeats the tokens {reps} times, not once per expert ([{E}, 1])")
    chain = roots[1 - rep]
    scores = next((n for n in chain if (v := tensor_val(n)) is not None and v.dim() == 2
                   and same_shape(v.shape, (xv.shape[0], E))), None)  # fmt: skip
    if scores is None or not any(op_name(n) in ("aten::transpose", "aten::t", "aten::permute") for n in chain):
        raise _NotMoE("the experts' input is scaled by something other than a transposed [tokens, experts] score")
    # back from the score through elementwise maps to the scatter of the top-k values
    maps, node = [], scores
    while op_name(node) in _SCORE_MAPS:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            break
        maps.append(node)
        node = tensors[0]
    if op_name(node) != "aten::scatter" or node.args[1] not in (1, -1) or not isinstance(node.args[2], fx.Node):
        raise _NotMoE("the experts' input is scaled by a dense score that is not a scatter of top-k values")
    base, ids = node.args[0], node.args[2]
    if op_name(base) in _FILLS:
        fill = base.args[_FILLS[op_name(base)]]
    elif op_name(base) in _ZERO_FILLS:
        fill = 0.0
    else:
        raise _NotMoE("the dense score's entries outside the top k are not one constant (not a full/zeros)")
    with unset_fake_temporarily():  # f(c): the score of an expert outside the top k, computed for real
        outside = torch.full((1,), float(fill), dtype=tensor_val(base).dtype)
        for m in reversed(maps):
            prev = next(a for a in m.args if isinstance(a, fx.Node))
            kwargs = {k: v for k, v in m.kwargs.items() if k != "device"}
            outside = m.target(*[outside if a is prev else a for a in m.args], **kwargs)
        outside = outside.item()
    if outside != 0.0:
        raise _NotMoE(
            f"the experts' input is scaled by a dense score that is {outside:g}, not 0, outside the top k: "
            "every expert contributes, which is dense compute, not a top-k MoE"
        )
    iv = tensor_val(ids)
    if iv is None or iv.is_floating_point() or iv.dim() != 2 or not same(iv.shape[0], xv.shape[0]):
        raise _NotMoE("the dense score is scattered at indices that are not [tokens, k]")
    # a token's ids must be distinct (a repeated id is one dense expert but two sparse pairs): a top-k's are
    source = list(walk_back(ids, VIEWS))[-1]
    if not (op_name(source) == "getitem" and op_name(source.args[0]) == "aten::topk" and source.args[1] == 1):
        raise _NotMoE("the dense score is scattered at indices that do not come from a top-k (maybe not distinct)")
    return x, ids, scores


def _find_output(down_mm: fx.Node, ipdom: dict, T: object, H: int) -> fx.Node | None:
    node, target = down_mm, numel((T, H))
    for _ in range(64):
        node = ipdom.get(node)
        if node is None or node.op == "output":
            return None
        v = tensor_val(node)
        if v is not None and v.is_floating_point() and same(numel(v.shape), target) and same(v.shape[-1], H):
            return node
    return None


def _spec_candidates(between: set[fx.Node], gated: bool, transposed: list[bool]) -> list[ExpertSpec]:
    """Expert specs that could explain the ops between the up and down matmuls, likeliest first."""
    names = {op_name(n) for n in between}
    acts: list[str] = []
    softcaps = _softcap_pairs(between) if gated else []
    if softcaps:
        acts.append("swiglu_softcap")
    if gated and "aten::sigmoid" in names and names & {"aten::clamp", "aten::clamp_max"}:
        acts.append("swiglu_oai")
    if "aten::relu" in names and any(_is_square(n) for n in between):
        acts.append("relu2")
    for op, act in ACTIVATION_OPS.items():
        if op in names:
            if op == "aten::gelu":
                approx = [n.kwargs.get("approximate") for n in between if op_name(n) == op]
                act = "gelu_tanh" if "tanh" in approx else "gelu"
            acts.append(act)
    if "aten::sigmoid" in names:
        acts.append("silu")  # silu decomposed as x * sigmoid(x)
    acts += ["silu", "gelu", "gelu_tanh", "relu", "relu2"]
    if not gated:
        acts = [a for a in acts if a not in PARAMETRIC]
    layouts = ["interleaved", "concat"] if any(_is_strided_slice(n) for n in between) else ["concat", "interleaved"]
    # swiglu_oai constants: the clamp bound, and the scale inside sigmoid(alpha * gate)
    clamps = [a for n in between if op_name(n) in ("aten::clamp", "aten::clamp_max") for a in n.args[1:]]
    limit = max((float(a) for a in clamps if isinstance(a, (int, float))), default=ExpertSpec.limit)
    scales = [a for n in between if op_name(n) == "aten::mul" and any(op_name(u) == "aten::sigmoid" for u in n.users)
              for a in n.args if isinstance(a, float)]  # fmt: skip
    alpha = scales[0] if scales else ExpertSpec.alpha
    default_caps = [(ExpertSpec.gate_softcap, ExpertSpec.up_softcap)]
    # a clamp between the projections that is not GPT-OSS's: a plain gated activation bounded before or after
    clamp_modes = ["none"]
    if gated and clamps:
        clamp_modes = ["none", "before", "after"] if "swiglu_oai" in acts else ["before", "after", "none"]
    return [
        ExpertSpec(
            act, gated, layout, tr, alpha=alpha, limit=limit, gate_softcap=caps[0], up_softcap=caps[1],
            clamp=clamp if act not in PARAMETRIC else "none",
        )
        for clamp in clamp_modes
        for act in dict.fromkeys(acts)
        if clamp == "none" or act not in PARAMETRIC
        for caps in (softcaps if act == "swiglu_softcap" else default_caps)
        for tr in transposed
        for layout in (layouts if gated else ["concat"])
    ]  # fmt: skip


def _is_square(node: fx.Node) -> bool:
    """``x ** 2`` (``pow``), ``x * x`` or ``square``: the second half of relu²."""
    name = op_name(node)
    if name == "aten::pow":
        return len(node.args) > 1 and node.args[1] == 2
    if name == "aten::mul":
        return len(node.args) == 2 and node.args[0] is node.args[1]
    return name == "aten::square"


def softcap_of(tanh: fx.Node) -> tuple[fx.Node, float] | None:
    """``tanh(x / c) * c`` (or ``tanh(x * (1/c)) * c``) around ``tanh``: ``(x, c)``, else None."""
    inner = tanh.args[0]
    if not isinstance(inner, fx.Node) or len(inner.args) < 2 or not isinstance(inner.args[1], (int, float)):
        return None
    if op_name(inner) == "aten::div" and inner.args[1]:
        source, cap = inner.args[0], float(inner.args[1])
    elif op_name(inner) == "aten::mul" and inner.args[1]:
        source, cap = inner.args[0], 1.0 / float(inner.args[1])
    else:
        return None
    # the factor after the tanh is c itself, exactly (1/(1/c) may differ from c in the last bit)
    after = [a for u in tanh.users if op_name(u) == "aten::mul" for a in u.args if isinstance(a, (int, float))]
    if after:
        cap = float(after[0])
    return (source, cap) if isinstance(source, fx.Node) and cap > 0 else None


def _softcap_pairs(between: set[fx.Node]) -> list[tuple[float, float]]:
    """(gate cap, up cap) guesses for a softcapped SwiGLU: ``cap(gate) * sigmoid(gate) * cap(up)``.

    Needs two softcapped ``tanh`` nodes and a ``sigmoid``; the cap whose input the sigmoid also
    reads is the gate's. When that does not tell (casts in between), both orders are guesses.
    """
    caps = [found for n in between if op_name(n) == "aten::tanh" and (found := softcap_of(n)) is not None]
    sigmoid_inputs = {n.args[0] for n in between if op_name(n) == "aten::sigmoid"}
    if len(caps) != 2 or not sigmoid_inputs:
        return []
    (a_src, a), (b_src, b) = caps
    if a_src in sigmoid_inputs and b_src not in sigmoid_inputs:
        return [(a, b)]
    if b_src in sigmoid_inputs and a_src not in sigmoid_inputs:
        return [(b, a)]
    return list(dict.fromkeys([(a, b), (b, a)]))


def _is_strided_slice(node: fx.Node) -> bool:
    return op_name(node) == "aten::slice" and len(node.args) > 4 and node.args[4] == 2


def describe_router(ids: fx.Node, weights: fx.Node, hidden: fx.Node, order: dict) -> str:
    """A short description of the router math between the block's input and (ids, weights)."""
    region = ancestors_since([ids, weights], order[hidden] + 1, order)
    region = {n for n in region if n.op == "call_function"}
    topks = sorted((n for n in region if op_name(n) == "aten::topk"), key=order.__getitem__)
    first_topk = topks[0] if topks else None
    before = ancestors_since([first_topk], order[hidden] + 1, order) - {first_topk} if first_topk else set()
    after = (descendants_until(first_topk, max(order[ids], order[weights]), order) & region) if first_topk else set()

    parts = []
    names = {op_name(n) for n in region}
    if "aten::sigmoid" in names:
        parts.append("sigmoid")
    elif any(_is_softmax(n) for n in before):
        parts.append("softmax")
    if any(op_name(n) == "aten::add" and any(a.op == "placeholder" for a in n.all_input_nodes) for n in before):
        parts[-1:] = [(parts[-1] if parts else "logits") + " + bias correction"]
    if len(topks) > 1:
        parts.append("group-limited top-k")
    elif topks:
        parts.append("top-k")
    else:
        picks = sorted(n.split("::")[-1] for n in names if "max" in n)
        parts.append(f"custom selection ({', '.join(picks)}; e.g. sparsemixer)" if picks else "custom selection")
    if any(_is_softmax(n) for n in after):
        parts.append("softmax")
    if any(op_name(n) == "aten::div" and _is_sum(n.args[1]) for n in after):
        parts.append("renormalise")
    scales = [a for n in after if op_name(n) == "aten::mul" for a in n.args if isinstance(a, float) and a != 1.0]
    if scales:
        parts.append(f"x {scales[-1]:g}")
    return " -> ".join(parts)


def _is_softmax(node: fx.Node) -> bool:
    """``_softmax``, or its decomposition in Inductor's graph: ``exp(x - max) / sum(exp(x - max))``."""
    if op_name(node) == "aten::_softmax":
        return True
    if op_name(node) != "aten::div" or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    num, den = node.args[:2]
    return op_name(num) == "aten::exp" and op_name(den) == "aten::sum" and den.args[0] is num


def _is_sum(node: object) -> bool:
    """A sum over k, possibly plus an epsilon (``sum + 1e-20``)."""
    if not isinstance(node, fx.Node):
        return False
    while isinstance(node, fx.Node) and op_name(node) in ("aten::add", "aten::clamp", "aten::clamp_min"):
        node = node.args[0]  # sum + eps, sum.clamp(min=eps)
    return isinstance(node, fx.Node) and op_name(node) == "aten::sum"


def _has_shared_experts(out: fx.Node, hidden: fx.Node, order: dict) -> bool:
    """A dense branch computed from the block's input is added to the block's output."""
    prev = out
    for _ in range(6):
        users = list(prev.users)
        if len(users) != 1:
            return False
        node = users[0]
        if op_name(node) == "aten::add":
            # the other summand must be a dense MLP of the block's input (a matmul in between),
            # not a scaled copy of the input itself (MiniMax: norm(x) * a + moe(norm(x)) * b)
            for other in node.all_input_nodes:
                if other is prev:
                    continue
                branch = ancestors_since([other], order[hidden], order)
                if hidden in branch and any(op_name(n) in MATMULS for n in branch):
                    return True
            return False
        scaled = op_name(node) == "aten::mul" and any(isinstance(a, (int, float)) for a in node.args)
        if op_name(node) not in VIEWS and not scaled:  # e.g. x routed_scaling_factor before the add
            return False
        prev = node
    return False


class DetectMoE(GraphPass):
    name = "detect_moe"
    provides = ("detected",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        detected = ctx.detected = DetectedMoE()
        matches = detected.matches
        canonical = gm.graph.find_nodes(op="call_function", target=torch.ops.moe_compile.moe.default)
        fp8 = gm.graph.find_nodes(op="call_function", target=torch.ops.moe_compile.moe_fp8.default)  # [fp8] prepare's
        if fp8:
            position = {n: i for i, n in enumerate(gm.graph.nodes)}
            canonical = sorted([*canonical, *fp8], key=position.__getitem__)
        uses = _expert_weight_uses(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for where, reason in _experts_as_table_rows(gm, order, ctx):
            ctx.report.skipped.append(Skipped(where, reason))
        if not uses and not canonical:
            return False
        ipdom = post_dominators(to_networkx(gm.graph), gm.graph)
        for node in canonical:
            call = MoECall.from_node(node)
            *_, block_input = walk_back(call.hidden, VIEWS)  # before the router's reshapes
            detected.canonical.append(
                CanonicalCall(
                    node=node,
                    path=module_path(node).rpartition(".")[0] or node.name,  # the experts module's parent
                    router=describe_router(call.topk_ids, call.topk_weights, block_input, order),
                    shared_experts=_has_shared_experts(node, block_input, order),
                )
            )
        expert_mms = sorted(uses, key=order.__getitem__)
        paired: set[fx.Node] = set()
        for up_mm in expert_mms:
            if up_mm in paired:
                continue
            E = tensor_val(uses[up_mm][0]).shape[0]  # a down weight has as many experts (a dense group of 2 is
            down_mm = next((m for m in expert_mms if order[m] > order[up_mm] and m not in paired  # no later layer's)
                            and tensor_val(uses[m][0]).shape[0] == E
                            and up_mm in ancestors_since([m], order[up_mm], order)), None)  # fmt: skip
            if down_mm is None:
                continue
            w_up, up_pos, gathered = uses[up_mm]
            w_down, _, _ = uses[down_mm]
            where = common_module_path([up_mm, down_mm]) or up_mm.name
            paired.update({up_mm, down_mm})  # matched or not, these two matmuls are one block's
            try:
                matches.append(self._match(ipdom, order, up_mm, down_mm, w_up, up_pos, w_down, gathered, where))
            except _NotMoE as miss:
                ctx.report.skipped.append(Skipped(where, str(miss)))
        return False

    def _match(self, ipdom, order, up_mm, down_mm, w_up, up_pos, w_down, gathered, where) -> MoEMatch:
        """The block these two matmuls belong to; :class:`_NotMoE` saying which piece is missing."""
        up_v, down_v = tensor_val(w_up), tensor_val(w_down)
        E = up_v.shape[0]
        if down_v.shape[0] != E:
            raise _NotMoE(f"up and down expert weights disagree on the number of experts ({E} vs {down_v.shape[0]})")
        hidden = _find_hidden(up_mm, up_pos)
        hv = tensor_val(hidden)
        if hv is None or not hv.is_floating_point():
            raise _NotMoE("could not find the hidden states that enter the experts")
        H = hv.shape[-1]
        # the layouts whose up weight takes H and whose down weight gives H ([E, N, H]/[E, H, I], or transposed)
        layouts = ((False, up_v.shape[2], down_v.shape[1]), (True, up_v.shape[1], down_v.shape[2]))
        transposed = [t for t, up_in, down_out in layouts if same(up_in, H) and same(down_out, H)]
        if not transposed:
            raise _NotMoE(f"expert weight {tuple(up_v.shape)} does not contract the hidden size {H}")
        T = numel(hv.shape[:-1])
        ids = _find_ids(ancestors_since([up_mm, down_mm], order[hidden], order), T, E, order)
        if ids is None:  # routed before the experts' input was computed (a router reading the un-normed residual)
            ids = _find_ids(_not_through(hidden, [up_mm, down_mm], order), T, E, order)
        dense_scores = ids is None and op_name(hidden) == "aten::mul"
        if dense_scores:  # every expert on every token, input scaled by a mostly-zero score (Llama 4)
            hidden, ids, weights = _input_scaled(hidden, E)
            T = numel(tensor_val(hidden).shape[:-1])
            weighting = None
        elif ids is None:
            raise _NotMoE("no integer [tokens, k] expert-index tensor feeds the experts (routing not top-k style)")
        K = tensor_val(ids).shape[1]
        if not dense_scores:
            found = _find_routing_weights(down_mm, T, K, order)
            if found is None:
                raise _NotMoE(
                    "routing weights are not applied to the experts' outputs (e.g. they scale the input instead)"
                )
            weights, weighting = found
        # with one expert per token the down matmul's output already has T*H elements: start after the weighting
        out = _find_output(weighting if K == 1 and weighting is not None else down_mm, ipdom, T, H)
        if out is None:
            raise _NotMoE(
                "the experts' outputs do not merge into one [tokens, hidden] tensor (something else uses them)"
            )
        I = down_v.shape[1] if transposed[0] else down_v.shape[2]  # noqa: E741
        N = up_v.shape[2] if transposed[0] else up_v.shape[1]
        if not isinstance(I, int) or not isinstance(N, int) or N not in (I, 2 * I):
            raise _NotMoE(f"expert weight shapes {tuple(up_v.shape)} / {tuple(down_v.shape)} are not an up/down pair")
        between = descendants_until(up_mm, order[down_mm], order) & ancestors_since([down_mm], order[up_mm], order)
        between -= {up_mm, down_mm}
        candidates = _spec_candidates(between, N == 2 * I, transposed)
        if dense_scores:
            candidates = [dataclasses.replace(c, scale_input=True) for c in candidates]
        return MoEMatch(
            path=common_module_path([ids, out]) or where,
            hidden=hidden,
            topk_ids=ids,
            topk_weights=weights,
            w_up=w_up,
            w_down=w_down,
            up_mm=up_mm,
            down_mm=down_mm,
            out=out,
            num_experts=E,
            top_k=K,
            hidden_size=int(H),
            intermediate_size=int(I),
            candidates=candidates,
            router=describe_router(ids, weights, hidden, order),
            shared_experts=_has_shared_experts(out, hidden, order),
            source="dense" if dense_scores else "batched" if gathered else "grouped",
            dense_scores=dense_scores,
        )
