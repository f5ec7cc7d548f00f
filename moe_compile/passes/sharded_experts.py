"""What the two parallel passes share: shard every canonical MoE call's experts (not a pass itself).

:class:`ShardedExpertsPass` is the base of :mod:`.async_expert_parallel` (AEP) and
:mod:`.expert_parallel` (EP). For the canonical calls in ``ctx.moe_blocks``,
in graph order, it:

1. reads torch.distributed's default group (a clear error when it is not
   initialised): world size ``W``, this rank ``r``;
2. with ``hot_experts=R`` (AEP only): reads the ``routing_stats`` file, checks each
   block against it (:meth:`~moe_compile.routing_stats.RoutingStats.check_block`: the
   block was counted, same ``E``, same router weights; :class:`RoutingStatsError`
   otherwise), picks each block's ``R`` most used experts, and checks once per
   process that every rank picked the same sets (an all-reduce MIN and MAX of a
   checksum of them: ``ValueError`` on every rank when the ranks' files differ);
3. checks that each block's ``E - R`` sharded experts divide by ``W`` (``ValueError``
   naming the block, ``E``, ``R``, ``W`` and the ``R`` that would work);
4. builds this rank's shard of each expert weight and bias (experts
   ``[r*E/W, (r+1)*E/W)``, or of the ``E - R`` non-resident experts in id order,
   :mod:`moe_compile.runtime.shards`) from the real tensors, and the ``[R, ...]``
   resident copies and the ``[E]`` position of each expert in the order
   ``resident + sharded`` (when ``0 < R < E``), and stores each in the graph module as
   a buffer, read by a ``get_attr`` node at the graph start (through a view, for
   Inductor's sake: see :func:`moe_compile.graph.add_constant`);
5. lets the subclass rewrite the calls (:meth:`ShardedExpertsPass.rewrite`);
6. releases the storage of every full expert tensor that no node reads any more
   (the eager model cannot run afterwards) and asks the backend to check the
   world size before every call of the compiled graph, and, with ``hot_experts``, that
   every rank chose the same hot sets before its first call's gathers
   (``ctx.wrap_compiled``, :func:`moe_compile.runtime.dist.guard_compiled`). Compiling
   issues no collective.

A call in ``ctx.presharded`` (a recognised expert-parallel block,
:mod:`.recognize_expert_parallel`) already takes this rank's shards: they are used as
they are, and nothing is released.

A block whose weights are not graph inputs with known values is left replicated
(unchanged) and the report says why.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..graph import add_constant, tensor_val
from ..report import BlockReport, Skipped
from ..routing_stats import RoutingStats
from ..runtime import dist as rdist
from ..runtime import shards
from .base import GraphPass
from .moe_call import ROLES, SCALE_ROLES, MoECall, fp8_refusal
from .state import MoEBlock, PassContext

aten = torch.ops.aten


@dataclasses.dataclass
class ShardedBlock:
    """One canonical call whose expert tensors are sharded on this rank."""

    node: fx.Node  # the canonical moe call
    report: BlockReport
    full: dict[str, fx.Node]  # role -> placeholder of the full tensor [E, ...]
    shards: dict[str, fx.Node]  # role -> this rank's shard [(E-R)/W, ...] (a view of a get_attr); {} when R >= E
    full_bytes: int  # bytes of the full tensors [E, ...]
    shard_bytes: int  # bytes this rank keeps: its shard and the resident copies
    gather_bytes: int  # bytes of the gathered tensors [E-R, ...]: what gathering the layer brings to a rank
    resident_ids: tuple[int, ...] = ()  # the R experts every rank keeps whole (hot_experts)
    resident: dict[str, fx.Node] = dataclasses.field(default_factory=dict)  # role -> [R, ...] (a view of a get_attr)
    #: [E] position of each expert in the order resident + gathered (0 < R < E), for ``ids' = position[ids]``
    position: fx.Node | None = None


class ShardedExpertsPass(GraphPass):
    mode: str = ""  # the value of the `parallel` option the subclass implements
    requires = ("moe_blocks",)
    uses = ("presharded", "released_inputs")
    provides = ("wrap_compiled",)

    def rewrite(
        self, gm: fx.GraphModule, ctx: PassContext, blocks: list[ShardedBlock], world: rdist.World, start: fx.Node
    ) -> None:
        """Rewrite the blocks' calls; ``start``: the last node before the original graph's first computation."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        calls = ctx.moe_blocks
        if not calls:
            return False
        world = rdist.current_world(self.mode)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")  # the shards' get_attrs go before it
        calls = sorted(calls, key=lambda c: order[c[0]])
        hot, agreement = self._hot_experts(ctx, calls)
        blocks = []
        for node, report in calls:
            block = self._shard(gm, ctx, node, report, world, first, len(blocks), hot.get(report.path, ()))
            if block is not None:
                blocks.append(block)
        if not blocks:
            return False
        self.rewrite(gm, ctx, blocks, world, start=first.prev)
        released = self._release(ctx, blocks)
        ctx.report.released_bytes += released
        ctx.wrap_compiled = functools.partial(rdist.guard_compiled, mode=self.mode, world=world, agree=agreement)
        shard_mb = sum(b.shard_bytes for b in blocks) / 2**20
        ctx.report.notes.append(
            f"parallel={self.mode}: rank {world.rank} of {world.size}, {len(blocks)} MoE block(s) sharded, "
            f"{shard_mb:.2f} MiB of expert shards (and resident experts) kept, "
            f"{released / 2**20:.2f} MiB of full expert weights released"
            + (" (the eager model can no longer run)" if released else "")
        )
        return True

    def _hot_experts(
        self, ctx: PassContext, calls: list[MoEBlock]
    ) -> tuple[dict[str, tuple[int, ...]], rdist.Agreement | None]:
        """Block path -> its resident experts (``hot_experts``), checked against the graph; and what the ranks must
        agree on before the compiled graph's first gather (checked at its first call, see :func:`rdist.guard_compiled`).
        """
        r = ctx.options.hot_experts
        if r == 0:
            return {}, None
        path = ctx.options.routing_stats
        with unset_fake_temporarily():
            stats = RoutingStats.load(path)
            params = {
                name: value
                for i, name in ctx.param_names.items()
                if ctx.real_inputs is not None
                and i < len(ctx.real_inputs)
                and isinstance(value := ctx.real_inputs[i], torch.Tensor)
                and not value.is_meta
            }
            for _, report in calls:
                stats.check_block(report.path, report.num_experts, params)
            # NOTE: no collective here: compiling runs under Dynamo's and AOTAutograd's dispatch state (the Python
            # dispatcher on; gloo ranks were seen stuck issuing one here), and a cache hit skips it on some ranks only
            agreement = rdist.Agreement(
                value=stats.checksum(r),  # of every block's hot set in the file, not only this graph's
                what=f"the hot_experts={r} sets chosen from routing_stats={str(path)!r}",
            )
            return {report.path: stats.hot(report.path, r) for _, report in calls}, agreement

    def _shard(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        node: fx.Node,
        report: BlockReport,
        world: rdist.World,
        first: fx.Node,
        index: int,
        resident: tuple[int, ...],
    ) -> ShardedBlock | None:
        # [fp8] AEP's gathers carry the block scales with the weights (as uint8 bytes over the wire); EP's AllToAll
        # runtime and the predicted gather's store run the unquantized op only
        carries_scales = self.name == "async_expert_parallel"
        if not carries_scales and (why := fp8_refusal(node, self.name)) is not None:
            ctx.report.skipped.append(Skipped(report.path, why))
            return None
        if resident and (why := fp8_refusal(node, f"hot_experts={ctx.options.hot_experts}")) is not None:
            ctx.report.skipped.append(Skipped(report.path, why))  # [fp8] resident fp8 experts: not tested yet
            return None
        presharded = ctx.presharded.get(node)
        if presharded is not None:  # a recognised expert-parallel block: its weights are this rank's shards
            return _already_sharded(node, report, presharded, world, self.mode, ctx, resident)
        E, R, W = report.num_experts, len(resident), world.size
        if (E - R) % W:
            if R == 0:
                raise ValueError(
                    f"moe_prefill option parallel={self.mode!r}: block {report.path} has {E} experts, "
                    f"which do not divide evenly over world size {W}; use a world size that divides {E}"
                )
            valid = [v for v in range(E + 1) if (E - v) % W == 0]
            raise ValueError(
                f"moe_prefill option hot_experts={ctx.options.hot_experts}: block {report.path} has E={E} experts; "
                f"the E - R = {E - R} not resident do not divide evenly over world size W={W}; "
                f"use hot_experts in {valid} (R >= E keeps every expert resident)"
            )
        call = MoECall.from_node(node)
        full: dict[str, fx.Node] = {}
        tensors: dict[str, torch.Tensor] = {}
        for role in (*ROLES, *SCALE_ROLES):  # [fp8] the scales of moe_fp8's weights shard by expert alike
            arg = getattr(call, role)
            if arg is None:
                continue
            tensor = _full_tensor(ctx, arg) if isinstance(arg, fx.Node) else None
            if tensor is None or tensor.is_meta or tensor.shape[0] != E:
                reason = f"{role} is not a graph input with a known value; experts left replicated"
                ctx.report.skipped.append(Skipped(report.path, f"parallel={self.mode}: {reason}"))
                return None
            full[role], tensors[role] = arg, tensor
        fake_mode = detect_fake_mode([node.meta.get("val")])
        shard_nodes: dict[str, fx.Node] = {}
        resident_nodes: dict[str, fx.Node] = {}
        for role, tensor in tensors.items():
            with unset_fake_temporarily():
                shard = shards.shard(tensor, W, world.rank, resident) if R < E else None
                kept = shards.resident(tensor, resident) if R else None
            with gm.graph.inserting_before(first):
                if shard is not None:
                    shard_nodes[role] = add_constant(gm, f"moe_shard{index}_{role}", shard, fake_mode)
                if kept is not None:
                    resident_nodes[role] = add_constant(gm, f"moe_resident{index}_{role}", kept, fake_mode)
        position = None
        if 0 < R < E:
            ids = tensor_val(call.topk_ids)
            order = [*resident, *shards.sharded_experts(E, resident)]  # expert ids in the cat's order
            with unset_fake_temporarily():
                pos = torch.empty(E, dtype=ids.dtype)  # [E]: expert id -> its row in cat([resident, gathered])
                pos[torch.tensor(order)] = torch.arange(E, dtype=ids.dtype)
                pos = pos.to(ids.device)
            with gm.graph.inserting_before(first):
                position = add_constant(gm, f"moe_position{index}", pos, fake_mode)
        full_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        gather_bytes = full_bytes // E * (E - R)
        kept_bytes = gather_bytes // W + full_bytes // E * R  # this rank's shard and resident copies
        return ShardedBlock(
            node, report, full, shard_nodes, full_bytes, kept_bytes, gather_bytes, resident, resident_nodes, position
        )

    def _release(self, ctx: PassContext, blocks: list[ShardedBlock]) -> int:
        released = 0
        with unset_fake_temporarily():
            for block in blocks:
                for role, placeholder in block.full.items():
                    if placeholder.users:
                        readers = ", ".join(u.name for u in placeholder.users)
                        ctx.report.notes.append(f"{block.report.path}: full {role} kept (still read by {readers})")
                        continue
                    tensor = _full_tensor(ctx, placeholder)
                    freed = shards.release(tensor)
                    if not freed and not shards.is_released(tensor):
                        note = f"{block.report.path}: full {role} kept (its storage is shared or cannot be resized)"
                        ctx.report.notes.append(note)
                    released += freed
        return released


def _already_sharded(
    node: fx.Node,
    report: BlockReport,
    world_size: int,
    world: rdist.World,
    mode: str,
    ctx: PassContext,
    resident: tuple[int, ...],
) -> ShardedBlock | None:
    """A block whose expert arguments already are this rank's shards ``[E/W, ...]`` (nothing to shard or release)."""
    if world_size != world.size:
        why = f"parallel={mode}: sharded over {world_size} ranks, not {world.size}"
        ctx.report.skipped.append(Skipped(report.path, why))
        return None
    if resident:
        ctx.report.notes.append(
            f"{report.path}: already expert-parallel; hot_experts does not apply (its experts stay sharded as written)"
        )
    shard_nodes = MoECall.from_node(node).experts()
    shard_bytes = sum(v.numel() * v.element_size() for v in (n.meta["val"] for n in shard_nodes.values()))
    full_bytes = shard_bytes * world_size
    return ShardedBlock(node, report, {}, shard_nodes, full_bytes, shard_bytes, gather_bytes=full_bytes)


def _full_tensor(ctx: PassContext, placeholder: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a placeholder, including one released by an earlier compile."""
    value = ctx.real_value(placeholder)
    if value is None:
        index = ctx.placeholder_index(placeholder)
        value = ctx.released_inputs.get(index)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return value
    return None
