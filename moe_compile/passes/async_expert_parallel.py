"""Asynchronous expert parallelism (AEP): gather each MoE layer's experts ahead of use.

Runs with ``parallel="aep"``, after the canonical calls exist (and after
:mod:`.lower_triton`, whose target it keeps). Every rank is a data-parallel
replica with its own batch; each rank keeps ``1/W`` of every layer's experts and
all-gathers a layer's experts before the layer runs. No activation leaves a rank.

Contract
--------
Matches: the canonical calls ``moe_compile.moe(x, ids, weights, w_up, w_down, b_up, b_down, spec)``
(or ``moe_triton``) of ``ctx.moe_blocks``, whose expert tensors are graph
inputs with known values.

Requires: torch.distributed initialised (a clear error otherwise); ``E`` divisible
by ``W`` for every block (``ValueError`` naming the block, ``E`` and ``W``); the
same graph on every rank (same blocks in the same order: the gathers pair up
across ranks in order) and the same number of calls on every rank.

Emits, per block ``i`` in graph order (shown for ``W = 2``, ``prefetch_depth = 1``)::

    # before
    w_up_3: "f32[8, 32, 32]" = placeholder          # full experts, graph inputs
    w_down_3: "f32[8, 32, 16]" = placeholder
    ...
    moe_3: "f32[s0, 32]" = moe_compile.moe(x_3, ids_3, wts_3, w_up_3, w_down_3, None, None, spec)

    # after
    moe_shard3_w_up: "f32[4, 32, 32]" = get_attr[moe_shard3_w_up]       # this rank's experts
    view_6 = aten.view(moe_shard3_w_up, [-1]); view_7 = aten.view(view_6, [4, 32, 32])   # for Inductor
    moe_shard3_w_down: "f32[4, 32, 16]" = get_attr[moe_shard3_w_down]
    view_8 = aten.view(moe_shard3_w_down, [-1]); view_9 = aten.view(view_8, [4, 32, 16])
    ...
    moe_1 = moe_compile.moe(...)                                         # block i-2 (= i-depth-1)
    ag_3 = _c10d_functional.all_gather_into_tensor_coalesced(
        [view_7, view_9], 2, "0")                                        # issued: one collective per layer
    ag_3_0 = getitem(ag_3, 0); ag_3_1 = getitem(ag_3, 1)
    ...                                                                  # block i-1, attention of layer i
    wait_3_0 = _c10d_functional.wait_tensor(ag_3_0)                      # waited: just before use
    wait_3_1 = _c10d_functional.wait_tensor(ag_3_1)
    moe_3 = moe_compile.moe(x_3, ids_3, wts_3, wait_3_0, wait_3_1, None, None, spec)

The gather of block ``i`` is issued right after the call of block
``i - depth - 1``, whose gathered weights are dead from there on (FX frees a value
after its last use), or at the graph start for the first ``depth + 1`` blocks; so
at most ``depth + 1`` gathered layers are alive at once: the ring that
``memory_budget`` bounds (the depth is lowered until the ring fits; a single
layer that does not fit is an error). One coalesced collective per layer gathers
all its expert tensors (``all_gather_into_tensor_coalesced``: one NCCL group,
outputs laid out ``[E, ...]`` in expert order, no concatenation copy).
``prefetch_depth="auto"`` asks :func:`moe_compile.planner.auto_prefetch_depth`
(1 where the device is unknown, e.g. CPU).

With ``hot_experts=R`` (:mod:`.sharded_experts` keeps the ``R`` most used experts of the
block resident as ``[R, ...]`` constants and shards the other ``E - R``), the gather
brings ``[E-R, ...]`` and the layer is rebuilt in the order resident + gathered, the
routed ids remapped to it through an ``[E]`` constant (the canonical op is unchanged;
the result is exact, a permutation of the experts)::

    wait_3_0 = _c10d_functional.wait_tensor(ag_3_0)                      # [E-R, 32, 32]
    cat_6 = aten.cat([moe_resident3_w_up_view, wait_3_0])                # [E, 32, 32], permuted
    ...
    index_3 = aten.index(moe_position3_view, [ids_3])                    # ids' = position[ids]
    moe_3 = moe_compile.moe(x_3, index_3, wts_3, cat_6, cat_7, None, None, spec)

A block with every expert resident (``R >= E``) has no gather and reads its constants.
The ring counts the gathered ``[E-R, ...]`` tensors plus one concatenated layer.

The schedule is built on a networkx dependency graph of the compiled graph: for
each block, the *window* is the set of nodes that depend on the issue point and
that the block depends on, which every valid execution order runs between the
gather and the wait; the report gives, per block, where the gather is issued,
where it is waited on, the window's MoE layers and FLOPs (``BlockReport.schedule``
and a ``rewrites`` entry). Then the full expert tensors are released
(:mod:`.sharded_experts`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import operator

import networkx as nx
import torch
import torch.fx as fx

from .. import planner
from ..graph import hint, op_name, set_fake_val, tensor_val, to_networkx
from ..runtime.dist import World
from .moe_call import MoECall, is_moe_call
from .sharded_experts import ShardedBlock, ShardedExpertsPass
from .state import PassContext
from .vocabulary import FLOP_MATMULS

_c10d = torch.ops._c10d_functional
aten = torch.ops.aten


@dataclasses.dataclass
class Slot:
    """When one block's gather is issued and waited on."""

    block: ShardedBlock
    issue_after: ShardedBlock | None  # None: at the graph start
    window_moe_layers: int  # MoE blocks computed between issue and wait in every valid order
    window_flops: int


@dataclasses.dataclass
class _Gather:
    """The nodes :meth:`AsyncExpertParallel._emit` inserted for one block."""

    gather: fx.Node
    waits: list[fx.Node]
    last: fx.Node  # the last node inserted after the issue point
    router: list[fx.Node]  # the call's hidden, ids and weights as they were (computed before the waits)


class AsyncExpertParallel(ShardedExpertsPass):
    name = "async_expert_parallel"
    mode = "aep"

    def rewrite(
        self, gm: fx.GraphModule, ctx: PassContext, blocks: list[ShardedBlock], world: World, start: fx.Node
    ) -> None:
        deps = _Dependencies(gm.graph, [b.node for b in blocks])
        depth, why = self._depth(ctx, blocks, deps, world)
        slots = [
            Slot(b, blocks[i - depth - 1] if i - depth - 1 >= 0 else None, *deps.window(i, depth))
            for i, b in enumerate(blocks)
        ]
        emitted: dict[fx.Node, _Gather] = {}
        for slot in slots:
            if not slot.block.shards:  # every expert resident (hot_experts >= E): nothing to gather
                _use_resident(slot.block)
                continue
            anchor = slot.issue_after.node if slot.issue_after is not None else start
            emitted[slot.block.node] = gathered = self._emit(gm, slot.block, anchor, world)
            last = gathered.last
            if slot.issue_after is None:
                start = last  # the next block gathered at the start goes after this one
            _report(slot, depth)
        if ctx.inductor and can_pin_schedule():
            _pin_schedule(gm, slots, depth, emitted)
        ring = _ring_bytes(blocks, depth)
        ctx.report.notes.append(
            f"aep: prefetch depth {depth} ({why}); at most {min(depth + 1, len(blocks))} gathered layer(s) "
            f"alive at once, {ring / 2**20:.2f} MiB"
        )

    def _depth(
        self, ctx: PassContext, blocks: list[ShardedBlock], deps: _Dependencies, world: World
    ) -> tuple[int, str]:
        requested = ctx.options.prefetch_depth
        if requested == "auto":
            device = tensor_val(blocks[0].node).device
            depth, why = planner.auto_prefetch_depth(
                device,
                world.size,
                gather_bytes=[b.gather_bytes for b in blocks],
                window_flops=lambda i, d: deps.window(i, d)[1],
                num_layers=len(blocks),
                dtype=tensor_val(MoECall.from_node(blocks[0].node).w_up).dtype,
            )
        else:
            depth, why = requested, "requested"
        depth = min(depth, len(blocks) - 1)
        budget = ctx.options.memory_budget
        if budget is not None:
            biggest = max(blocks, key=lambda b: _ring_bytes([b], 0))
            if _ring_bytes([biggest], 0) > budget:
                raise ValueError(
                    f"moe_prefill option memory_budget={budget} bytes cannot hold one gathered MoE layer: "
                    f"block {biggest.report.path} needs {_ring_bytes([biggest], 0)} bytes"
                )
            wanted = depth
            while _ring_bytes(blocks, depth) > budget:
                depth -= 1
            if depth < wanted:
                why += f", lowered from {wanted} to fit memory_budget={budget} bytes"
        return depth, why

    def _emit(self, gm: fx.GraphModule, block: ShardedBlock, anchor: fx.Node, world: World) -> _Gather:
        """Gather after ``anchor``, wait before the block's call."""
        graph = gm.graph
        roles = list(block.shards)
        sent = [block.shards[r] for r in roles]
        dtypes = [tensor_val(s).dtype for s in sent]
        # [fp8] gloo has no float8 types, and one coalesced gather of mixed dtypes (e4m3 weights, fp32 scales)
        # corrupts them: a block with fp8 tensors gathers all of its tensors as their bytes (views: no copy)
        as_bytes = torch.float8_e4m3fn in dtypes
        for j in range(len(sent)) if as_bytes else ():
            with graph.inserting_after(anchor):
                sent[j] = graph.call_function(aten.view.dtype, (sent[j], torch.uint8))
            set_fake_val(sent[j])
            anchor = sent[j]
        with graph.inserting_after(anchor):
            gather = graph.call_function(
                _c10d.all_gather_into_tensor_coalesced.default, (sent, world.size, world.group_name)
            )
        set_fake_val(gather)
        parts, last = [], gather
        for j in range(len(roles)):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (gather, j))
            set_fake_val(last)
            parts.append(last)
        call = MoECall.from_node(block.node)
        router = [n for n in (call.hidden, call.topk_ids, call.topk_weights) if isinstance(n, fx.Node)]
        changes: dict[str, fx.Node] = {}
        waits: list[fx.Node] = []
        with graph.inserting_before(block.node):
            for j, (role, part) in enumerate(zip(roles, parts, strict=True)):
                wait = graph.call_function(_c10d.wait_tensor.default, (part,))  # [E-R, ...]
                set_fake_val(wait)
                waits.append(wait)
                changes[role] = wait
                if as_bytes:  # [fp8] the gathered bytes read back in their dtype
                    changes[role] = graph.call_function(aten.view.dtype, (wait, dtypes[j]))
                    set_fake_val(changes[role])
            if block.resident:  # the full layer in the order resident + gathered, ids remapped to it
                for role in roles:
                    layer = graph.call_function(aten.cat.default, ([block.resident[role], changes[role]],))
                    set_fake_val(layer)  # [E, ...]: a copy of the layer (see docs/parallel.md)
                    changes[role] = layer
                ids = graph.call_function(aten.index.Tensor, (block.position, [call.topk_ids]))
                set_fake_val(ids)  # [T, K]: ids' = position[ids]
                changes["topk_ids"] = ids
        call.replace(**changes)
        return _Gather(gather, waits, last, router)


def can_pin_schedule() -> bool:
    """Whether this torch's Inductor has ``control_deps`` (torch >= 2.10), so the schedule can be pinned."""
    return importlib.util.find_spec("torch._inductor.fx_passes.control_dependencies") is not None


def _pin_schedule(gm: fx.GraphModule, slots: list[Slot], depth: int, emitted: dict[fx.Node, _Gather]) -> None:
    """Make the schedule a set of dependencies that Inductor's scheduler keeps (its ``control_deps``).

    Inductor reorders its nodes (``reorder_for_peak_memory`` sinks each gather to just before its
    wait, which serialises communication and compute). Three orderings pin the schedule, each a
    ``control_deps`` edge as Inductor's own overlap scheduler inserts them:

    - block ``i``'s gather comes after block ``i - depth - 1``'s call (the ring stays ``depth + 1``
      layers: memory is bounded);
    - it comes before block ``i - depth``'s call (issued ``depth`` MoE layers ahead);
    - its waits come after block ``i``'s other inputs (the router), just before the experts run.
    """
    from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
    from torch.utils._ordered_set import OrderedSet

    calls = [slot.block.node for slot in slots]
    after: dict[fx.Node, list[fx.Node]] = {}  # node -> nodes it must run after
    for i, slot in enumerate(slots):
        if slot.block.node not in emitted:  # every expert resident: nothing gathered
            continue
        gathered = emitted[slot.block.node]
        gather, waits = gathered.gather, gathered.waits
        if slot.issue_after is not None:
            after.setdefault(gather, []).append(slot.issue_after.node)
        ahead = calls[max(0, i - depth)]
        if ahead is not slot.block.node:
            after.setdefault(ahead, []).append(gather)
        for wait in waits:
            after.setdefault(wait, []).extend(gathered.router)
    preserve_node_ordering(gm.graph, {node: OrderedSet(deps) for node, deps in after.items()})


class _Dependencies:
    """The networkx dependency graph of a graph, and the compute windows of its MoE blocks."""

    def __init__(self, graph: fx.Graph, moe_nodes: list[fx.Node]):
        self.g = to_networkx(graph)
        self.moe = moe_nodes
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}
        self._descendants: dict[fx.Node, set[fx.Node]] = {}

    def window(self, i: int, depth: int) -> tuple[int, int]:
        """(MoE blocks, FLOPs) that run between block ``i``'s gather and its wait, in every valid order."""
        target = self.moe[i]
        before = self._cached(self._ancestors, nx.ancestors, target)
        j = i - depth - 1
        nodes = before if j < 0 else before & self._cached(self._descendants, nx.descendants, self.moe[j])
        moe = set(self.moe)
        return sum(n in moe for n in nodes), sum(_flops(n) for n in nodes)

    def _cached(self, cache: dict, fn, node: fx.Node) -> set[fx.Node]:
        if node not in cache:
            cache[node] = fn(self.g, node)
        return cache[node]


def _flops(node: fx.Node) -> int:
    """Approximate FLOPs of a node (matmuls, attention, MoE calls; 0 for the rest)."""
    if node.op != "call_function":
        return 0
    name = op_name(node)
    out = tensor_val(node)
    if is_moe_call(node):
        call = MoECall.from_node(node)
        x, ids, w_up, w_down = (tensor_val(n) for n in (call.hidden, call.topk_ids, call.w_up, call.w_down))
        if x is None or w_up is None or w_down is None:
            return 0
        per_row = (w_up.numel() + w_down.numel()) // w_up.shape[0]  # one expert's up + down weights
        return 2 * hint(ids.shape[0]) * hint(ids.shape[1]) * hint(per_row)
    if name in FLOP_MATMULS and out is not None:
        a = tensor_val(node.args[1] if name in ("aten::addmm", "aten::baddbmm") else node.args[0])
        return 2 * hint(out.numel()) * hint(a.shape[-1]) if a is not None else 0
    if "scaled_dot_product" in name:
        q, k = tensor_val(node.args[0]), tensor_val(node.args[1])
        return 4 * hint(q.numel()) * hint(k.shape[-2]) if q is not None and k is not None else 0
    return 0


def _use_resident(block: ShardedBlock) -> None:
    """A block whose experts are all resident reads its ``[E, ...]`` constants (in expert order) directly."""
    MoECall.from_node(block.node).replace(**block.resident)
    block.report.schedule = {"resident_experts": list(block.resident_ids), "gather_bytes": 0,
                             "gather_bytes_without_resident": block.full_bytes}  # fmt: skip
    block.report.rewrites.append(f"aep: all {len(block.resident_ids)} experts resident, no gather")


def _ring_bytes(blocks: list[ShardedBlock], depth: int) -> int:
    """The most bytes of gathered weights alive at once: ``depth + 1`` consecutive layers' gathers.

    With resident experts, plus the first layer's ``[E, ...]`` concatenation (an upper bound: its
    gathered part is dead once copied).
    """
    sizes = [b.gather_bytes for b in blocks]
    cats = [b.full_bytes if b.resident and b.shards else 0 for b in blocks]
    return max(sum(sizes[i : i + depth + 1]) + cats[i] for i in range(len(sizes)))


def _report(slot: Slot, depth: int) -> None:
    issued = f"after {slot.issue_after.report.path}" if slot.issue_after is not None else "at graph start"
    slot.block.report.schedule = {
        "issued_after": slot.issue_after.node.name if slot.issue_after is not None else "graph start",
        "waited_before": slot.block.node.name,
        "prefetch_depth": depth,
        "gather_bytes": slot.block.gather_bytes,
        "gather_bytes_without_resident": slot.block.full_bytes,
        "resident_experts": list(slot.block.resident_ids),
        "window_moe_layers": slot.window_moe_layers,
        "window_flops": slot.window_flops,
    }
    slot.block.report.rewrites.append(f"aep: gather issued {issued}, waited before this block")
    if slot.block.resident_ids:
        b = slot.block
        slot.block.report.rewrites.append(
            f"aep: experts {list(b.resident_ids)} resident, gathering {b.gather_bytes} of {b.full_bytes} bytes"
        )
