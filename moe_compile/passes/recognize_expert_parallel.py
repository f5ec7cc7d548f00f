"""Recognise MoE blocks that already run expert-parallel (AllToAll) and, with ``parallel="aep"``, rewrite them.

Runs after :mod:`.canonicalize_moe`, which has already turned an EP block's *local*
experts (one expert per received row, weight 1) into a canonical call over this
rank's ``E_r = E/W`` experts, verified on probe inputs.

Contract
--------
Matches (shape legend: ``T`` tokens, ``K`` top-k, ``S = T*K``, ``R`` rows received,
``W`` ranks; :class:`moe_compile.reference.ExpertParallelExperts` is written this way,
and ``moe_compile.prepare`` puts Hugging Face's ``AllToAllEP`` experts in this form)::

    ids_S    = view(topk_ids_TK, [-1])
    order_S  = sort(ids_S)[1]                                  # or argsort
    sorted_S = index(ids_S, [order_S])
    owner_S  = div(sorted_S, E_r, floor)
    send_W   = index_add(zeros([W]), 0, owner_S, ones)          # pairs per owner rank
    recv_W   = wait(all_to_all_single(send_W, [1]*W, [1]*W))    # count exchange
    s0..sW-1, r0..rW-1 = _local_scalar_dense(select(cat([send_W, recv_W]), 0, j))   # host sync
    x_RH     = wait(all_to_all_single(index(x_TH, [div(order_S, K)]), [r..], [s..]))   # dispatch
    ids_R    = wait(all_to_all_single(sub(sorted_S, mul(owner_S, E_r)), [r..], [s..]))
    y_RH     = moe_compile.moe(x_RH, ids_R[:, None], ones_R1, w_up_l, w_down_l, ...)   # local experts
    y_SH     = wait(all_to_all_single(y_RH, [s..], [r..]))      # combine
    out_TH   = sum(mul(view(index_copy(empty, 0, order_S, y_SH), [T, K, H]), weights_TK[..., None]), 1)

on the default process group, with this rank's local expert weights ``[E_r, ...]``
as graph inputs. Every piece is checked structurally (the same ``order`` sorts the
dispatch and unsorts the combine; the splits are the per-owner counts and their
exchange; combine splits are dispatch splits swapped; local ids are ``id - owner*E_r``;
the local call's routing weights are ones). A near miss is left untouched and
``ctx.report.skipped`` says which piece is missing.

Emits, with ``parallel="aep"`` (``W = 2``, ``E = 8``)::

    # before: the dispatch -> local experts -> combine chain above (4 all_to_all_single)
    # after
    moe = moe_compile.moe(x_TH, topk_ids_TK, weights_TK, w_up_l, w_down_l, None, None, spec)   # global ids
    # w_up_l: "f32[4, 32, 32]" placeholder; the call is recorded in ctx.presharded
    # (node -> W), so :mod:`.async_expert_parallel` gathers the shards into [E, ...] ahead of
    # use and waits right before this call, as for any AEP block: no all_to_all remains

The old chain is erased, with its waits and the runtime asserts on its split sizes
(both impure to FX's dead-code elimination). With ``parallel="ep"`` or none, the block is left as written (it is the
baseline) and the report notes that an EP block was recognised; its local call is
taken out of ``ctx.moe_blocks`` under ``parallel="ep"`` so that no pass
shards the already-sharded experts again.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..graph import op_name, reshape_like, set_fake_val, tensor_val, walk_back
from ..report import BlockReport, Skipped
from ..runtime import dist as rdist
from .base import GraphPass
from .moe_call import MoECall
from .state import MoEBlock, PassContext
from .vocabulary import ALL_TO_ALL as A2A
from .vocabulary import VIEWS, WAIT

aten = torch.ops.aten


class _Miss(Exception):
    """A piece of the EP pattern is missing: the message says which."""


@dataclasses.dataclass
class EPBlock:
    """One recognised expert-parallel block."""

    local: fx.Node  # the canonical call of the local experts
    x: fx.Node  # [T, H] (or [..., H]) hidden states of this rank's tokens
    topk_ids: fx.Node  # [T, K] global expert ids
    topk_weights: fx.Node  # [T, K]
    out: fx.Node  # the weighted sum [T, H]
    world_size: int
    group_name: str
    count_exchange: fx.Node  # the all_to_all_single of the counts


def _through(node: object, names: set[str]) -> fx.Node:
    """``node`` walked back through ops in ``names``."""
    if not isinstance(node, fx.Node):
        raise _Miss(f"expected a tensor, found {node!r}")
    *_, root = walk_back(node, names)
    return root


def _expect(node: object, name: str, what: str) -> fx.Node:
    if not isinstance(node, fx.Node) or op_name(node) != name:
        found = op_name(node) if isinstance(node, fx.Node) else repr(node)
        raise _Miss(f"{what}: expected {name}, found {found}")
    return node


def _collective(node: fx.Node, what: str) -> fx.Node:
    """The all_to_all_single whose waited result ``node`` is (through views and waits)."""
    return _expect(_through(node, VIEWS | {WAIT}), A2A, what)


def _single_user_chain(node: fx.Node, names: set[str]) -> fx.Node:
    """Follow ``node``'s only user while it is an op in ``names`` (or a sum over one element); the last node reached."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if op_name(user) not in names and not _sums_one(user):
            break
        node = user
    return node


def _sums_one(node: fx.Node) -> bool:
    """A sum over dimensions of size 1 (the local experts' sum over k = 1): a reshape."""
    if op_name(node) != "aten::sum" or len(node.args) < 2:
        return False
    shape = tensor_val(node.args[0]).shape
    return all(shape[d] == 1 for d in node.args[1])


def _only_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise _Miss(f"{what}: {node.name} has {len(node.users)} users, expected 1")
    return next(iter(node.users))


def _is_ones(node: fx.Node) -> bool:
    root = _through(node, VIEWS)
    name = op_name(root)
    if name in ("aten::ones", "aten::ones_like", "aten::new_ones"):
        return True
    return name in ("aten::full", "aten::full_like", "aten::new_full") and root.args[-1] == 1


def _match(local: fx.Node, world: rdist.World) -> EPBlock:
    call = MoECall.from_node(local)
    x_R, ids_R1, ones_R1 = call.hidden, call.topk_ids, call.topk_weights
    E_r = tensor_val(call.w_up).shape[0]
    if tensor_val(ids_R1).shape[1] != 1 or not _is_ones(ones_R1):
        raise _Miss("the local experts do not run one expert per row with weight 1")
    dispatch = _collective(x_R, "the local experts' input is not an all_to_all_single's output (no dispatch)")
    ids_a2a = _collective(ids_R1, "the local expert ids do not arrive by all_to_all_single")
    send, recv = dispatch.args[2], dispatch.args[1]  # in splits: what this rank sends; out splits: receives
    group = dispatch.args[3]
    W = len(send)
    if list(ids_a2a.args[1]) != list(recv) or list(ids_a2a.args[2]) != list(send):
        raise _Miss("the ids and the hidden rows are dispatched with different split sizes")
    if group != world.group_name or world.size != W:
        raise _Miss(f"the AllToAlls run on group {group!r} of {W} ranks, not the default group of {world.size}")

    # combine: the local output goes back with the dispatch's splits swapped
    after_local = _only_user(_single_user_chain(local, VIEWS), "combine")
    combine = _expect(after_local, A2A, "no combine after the local experts")
    if list(combine.args[1]) != list(send) or list(combine.args[2]) != list(recv) or combine.args[3] != group:
        raise _Miss("the combine's split sizes are not the dispatch's swapped")
    y_S = _single_user_chain(combine, VIEWS | {WAIT})
    # unsort: index_copy(empty_like(y_S), 0, order, y_S); the empty_like only reads y_S's shape
    users = [u for u in y_S.users if op_name(u) not in ("aten::empty_like", "aten::new_empty")]
    unsort = users[0] if len(users) == 1 else None
    if unsort is None or op_name(unsort) != "aten::index_copy" or unsort.args[1] != 0 or unsort.args[3] is not y_S:
        found = ", ".join(op_name(u) for u in users)
        raise _Miss(f"the combined rows are not put back in token order (index_copy), found {found}")
    order = unsort.args[2]

    # dispatch input: this rank's rows, sorted by expert with the same order
    rows = _through(dispatch.args[0], VIEWS)
    rows = _expect(rows, "aten::index", "the dispatched rows are not gathered by the sort order")
    x_T, (pair_to_token,) = rows.args
    token_of = _expect(pair_to_token, "aten::div", "dispatched rows: row index")
    if token_of.args[0] is not order or token_of.kwargs.get("rounding_mode") != "floor":
        raise _Miss("the dispatched rows are not x[order // K] for the combine's order")
    K = token_of.args[1]
    if not isinstance(order, fx.Node) or order.target is not operator.getitem or order.args[1] != 1:
        raise _Miss("the order is not the permutation of a sort of the expert ids")
    sort = order.args[0]
    if op_name(sort) != "aten::sort":
        raise _Miss("the order is not the permutation of a sort of the expert ids")
    ids_S = sort.args[0]
    topk_ids = _expect(ids_S, "aten::view", "the sorted ids are not the flattened top-k ids").args[0]
    ids_v = tensor_val(topk_ids)
    if ids_v is None or ids_v.dim() != 2 or ids_v.shape[1] != K or ids_v.is_floating_point():
        raise _Miss(f"the sorted ids are not an integer [T, {K}] tensor")

    # local ids: sorted_ids - owner * E_r, with owner = sorted_ids // E_r
    sub = _expect(_through(ids_a2a.args[0], VIEWS), "aten::sub", "local ids")
    sorted_ids, scaled = sub.args[:2]
    owner = _owner(sorted_ids, order, ids_S, E_r, scaled)
    _check_counts(send, recv, owner, W, group)

    # after the unsort: [T, K, H] * weights[..., None], summed over k
    view = _only_user(unsort, "weighted sum")
    mul = _only_user(_single_user_chain(view, VIEWS) if op_name(view) in VIEWS else view, "weighted sum")
    if op_name(mul) != "aten::mul":
        raise _Miss(f"the combined rows are not weighted by the routing weights (found {op_name(mul)}, expected mul)")
    other = next((a for a in mul.args if isinstance(a, fx.Node) and a is not mul.args[0]), None)
    weights = _through(other, VIEWS) if other is not None else None
    wv = tensor_val(weights) if weights is not None else None
    if wv is None or not wv.is_floating_point() or list(wv.shape) != list(ids_v.shape):
        raise _Miss("the combined rows are not multiplied by [T, K] routing weights")
    out = _only_user(mul, "weighted sum")
    if op_name(out) != "aten::sum" or list(out.args[1]) != [1]:
        raise _Miss("the weighted rows are not summed over k")
    return EPBlock(local, x_T, topk_ids, weights, out, W, group, _count_exchange(recv))


def _owner(sorted_ids: fx.Node, order: fx.Node, ids_S: fx.Node, E_r: int, scaled: fx.Node) -> fx.Node:
    if op_name(sorted_ids) != "aten::index" or sorted_ids.args[0] is not ids_S or sorted_ids.args[1] != [order]:
        raise _Miss("the local ids are not computed from the sorted expert ids")
    mul = _expect(scaled, "aten::mul", "local ids")
    owner = mul.args[0]
    if mul.args[1] != E_r or op_name(owner) != "aten::div" or owner.args[:2] != (sorted_ids, E_r):
        raise _Miss(f"the local ids are not id - (id // {E_r}) * {E_r}: experts are not split in contiguous ranges")
    return owner


def _split_source(split: object) -> tuple[fx.Node, int]:
    """A split size read on the host: ``_local_scalar_dense(select(counts, 0, j))`` -> (counts, j)."""
    dense = _expect(split, "aten::_local_scalar_dense", "a split size is not read back from a count tensor")
    select = _expect(dense.args[0], "aten::select", "a split size")
    if select.args[1] != 0:
        raise _Miss("a split size is not an element of a count vector")
    return select.args[0], select.args[2]


def _check_counts(send: list, recv: list, owner: fx.Node, W: int, group: str) -> None:
    counts = {_split_source(s)[0] for s in [*send, *recv]}
    if len(counts) != 1:
        raise _Miss("the split sizes do not come from one count vector")
    cat = _expect(counts.pop(), "aten::cat", "the split sizes")
    if [_split_source(s)[1] for s in [*send, *recv]] != list(range(2 * W)):
        raise _Miss("the split sizes are not the send counts followed by the received counts")
    send_W, recv_W = cat.args[0]
    add = _expect(send_W, "aten::index_add", "the send counts")
    counts_owners = add.args[1] == 0 and add.args[2] is owner and _is_ones(add.args[3])
    if not counts_owners or op_name(add.args[0]) != "aten::zeros":
        raise _Miss("the send counts are not the number of pairs per owner rank")
    exchange = _collective(recv_W, "the received counts")
    if exchange.args[0] is not send_W or list(exchange.args[1]) != [1] * W or exchange.args[3] != group:
        raise _Miss("the received counts are not the AllToAll of the send counts")


def _count_exchange(recv: list) -> fx.Node:
    cat, _ = _split_source(recv[0])
    return _collective(cat.args[0][1], "the received counts")


def _remove_old_chain(gm: fx.GraphModule, block: EPBlock) -> None:
    """Erase the block's old chain, now unused: its waits, and the asserts on its split sizes, are impure to FX."""
    seen, stack = set(), [block.count_exchange]
    while stack:  # everything downstream of the count exchange, up to the old output
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.users)
    impure = (WAIT, "aten::_assert_scalar", "aten::sym_constrain_range", "aten::sym_constrain_range_for_size")
    removable = {n for n in seen if op_name(n) in impure}
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in removable and n.is_impure())


class RecognizeExpertParallel(GraphPass):
    name = "recognize_expert_parallel"
    requires = ("moe_blocks",)
    provides = ("moe_blocks", "presharded")  # EP blocks replaced by their rewrite, or taken out

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        blocks = ctx.moe_blocks
        if not blocks or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return False
        if not any(op_name(n) == A2A for n in gm.graph.nodes):
            return False
        world = rdist.current_world("recognize")
        mode = ctx.options.parallel
        changed = False
        for local, report in list(blocks):
            if op_name(local) != "moe_compile::moe":
                continue
            try:
                ep = _match(local, world)
            except _Miss as miss:
                if op_name(_through(MoECall.from_node(local).hidden, VIEWS | {WAIT})) != A2A:
                    continue  # not fed by an AllToAll: an ordinary block
                # it looks like an EP block's local experts: left exactly as written, never sharded again
                why = f"expert-parallel block not recognised, left as written: {miss}"
                ctx.report.skipped.append(Skipped(report.path, why))
                if mode is not None:
                    blocks.remove((local, report))
                continue
            path = report.path.rpartition(".")[0] if report.path.endswith(".experts") else report.path
            what = (
                f"expert-parallel block (AllToAll dispatch/combine over {ep.world_size} ranks, "
                f"{report.num_experts} local experts)"
            )
            if mode != "aep":
                ctx.report.notes.append(f"{path}: recognised an {what}; left as written (parallel={mode!r})")
                if mode is not None:  # no parallel pass may shard these experts again
                    blocks.remove((local, report))
                continue
            node, new_report = self._rewrite(gm, ep), self._report(report, ep, path, what)
            blocks[blocks.index((local, report))] = MoEBlock(node, new_report)
            ctx.report.blocks[ctx.report.blocks.index(report)] = new_report
            ctx.presharded[node] = ep.world_size
            changed = True
        return changed

    def _report(self, local: BlockReport, ep: EPBlock, path: str, what: str) -> BlockReport:
        return dataclasses.replace(
            local,
            path=path,
            num_experts=local.num_experts * ep.world_size,
            top_k=tensor_val(ep.topk_ids).shape[1],
            router=local.router if local.router != "custom selection" else "-",
            rewrites=[f"recognised {what}", "rewritten to one canonical call on global ids"],
            weights=dict(local.weights),
            schedule={},
        )

    def _rewrite(self, gm: fx.GraphModule, ep: EPBlock) -> fx.Node:
        graph = gm.graph
        H = tensor_val(ep.x).shape[-1]
        with graph.inserting_before(ep.out):
            x = graph.call_function(aten.reshape.default, (ep.x, [-1, H]))
            set_fake_val(x)
            local = MoECall.from_node(ep.local)  # global ids and routing weights, this rank's expert shards
            changes = {"hidden": x, "topk_ids": ep.topk_ids, "topk_weights": ep.topk_weights}
            moe = MoECall.insert(graph, torch.ops.moe_compile.moe.default, **{**local.named(), **changes})
            set_fake_val(moe)
            moe.meta["moe_block"] = ep.local.meta.get("moe_block")
            result = reshape_like(graph, moe, ep.out, ep.x)
        ep.out.replace_all_uses_with(result)
        _remove_old_chain(gm, ep)
        return moe
