"""What the two parallel passes share: shard every canonical MoE call's experts (not a pass itself).

:class:`ShardedExpertsPass` is the base of :mod:`.async_expert_parallel` (AEP) and
:mod:`.expert_parallel` (EP). For the canonical calls in ``ctx.state["moe_blocks"]``,
in graph order, it:

1. reads torch.distributed's default group (a clear error when it is not
   initialised): world size ``W``, this rank ``r``;
2. checks that each block's ``E`` experts divide by ``W`` (``ValueError`` naming
   the block, ``E`` and ``W``);
3. builds this rank's shard of each expert weight and bias (experts
   ``[r*E/W, (r+1)*E/W)``, :mod:`moe_compile.runtime.shards`) from the real tensors
   and stores it in the graph module as a buffer, read by a ``get_attr`` node at the
   graph start (through a view, for Inductor's sake: see :func:`.base.add_constant`);
4. lets the subclass rewrite the calls (:meth:`ShardedExpertsPass.rewrite`);
5. releases the storage of every full expert tensor that no node reads any more
   (the eager model cannot run afterwards) and asks the backend to check the
   world size before every call of the compiled graph
   (``ctx.state["wrap_compiled"]``, :func:`moe_compile.runtime.dist.guard_compiled`).

A call in ``ctx.state["moe_presharded"]`` (a recognised expert-parallel block,
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

from ..report import BlockReport, Skipped
from ..runtime import dist as rdist
from ..runtime import shards
from .base import GraphPass, PassContext, add_constant

aten = torch.ops.aten
#: the canonical op's expert tensors, by argument position
ROLES = {"w_up": 3, "w_down": 4, "b_up": 5, "b_down": 6}


@dataclasses.dataclass
class ShardedBlock:
    """One canonical call whose expert tensors are sharded on this rank."""

    node: fx.Node  # the canonical moe call
    report: BlockReport
    full: dict[str, fx.Node]  # role -> placeholder of the full tensor [E, ...]
    shards: dict[str, fx.Node]  # role -> this rank's shard [E/W, ...] (a view of a get_attr)
    full_bytes: int  # bytes of the full tensors: what gathering the layer brings to a rank
    shard_bytes: int


class ShardedExpertsPass(GraphPass):
    mode: str = ""  # the value of the `parallel` option the subclass implements

    def rewrite(
        self, gm: fx.GraphModule, ctx: PassContext, blocks: list[ShardedBlock], world: rdist.World, start: fx.Node
    ) -> None:
        """Rewrite the blocks' calls; ``start``: the last node before the original graph's first computation."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        calls = ctx.state.get("moe_blocks", [])
        if not calls:
            return False
        world = rdist.current_world(self.mode)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")  # the shards' get_attrs go before it
        blocks = []
        for node, report in sorted(calls, key=lambda c: order[c[0]]):
            block = self._shard(gm, ctx, node, report, world, first, index=len(blocks))
            if block is not None:
                blocks.append(block)
        if not blocks:
            return False
        self.rewrite(gm, ctx, blocks, world, start=first.prev)
        released = self._release(ctx, blocks)
        ctx.state["wrap_compiled"] = functools.partial(rdist.guard_compiled, mode=self.mode, world=world)
        shard_mb = sum(b.shard_bytes for b in blocks) / 2**20
        ctx.report.notes.append(
            f"parallel={self.mode}: rank {world.rank} of {world.size}, {len(blocks)} MoE block(s) sharded, "
            f"{shard_mb:.2f} MiB of expert shards kept, {released / 2**20:.2f} MiB of full expert weights "
            "released (the eager model can no longer run)"
        )
        return True

    def _shard(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        node: fx.Node,
        report: BlockReport,
        world: rdist.World,
        first: fx.Node,
        index: int,
    ) -> ShardedBlock | None:
        presharded = ctx.state.get("moe_presharded", {}).get(node)
        if presharded is not None:  # a recognised expert-parallel block: its weights are this rank's shards
            return _already_sharded(node, report, presharded, world, self.mode, ctx)
        E = report.num_experts
        if E % world.size:
            raise ValueError(
                f"moe_prefill option parallel={self.mode!r}: block {report.path} has {E} experts, "
                f"which do not divide evenly over world size {world.size}; use a world size that divides {E}"
            )
        full: dict[str, fx.Node] = {}
        tensors: dict[str, torch.Tensor] = {}
        for role, pos in ROLES.items():
            arg = node.args[pos]
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
        for role, tensor in tensors.items():
            with unset_fake_temporarily():
                shard = shards.shard(tensor, world.size, world.rank)
            with gm.graph.inserting_before(first):
                shard_nodes[role] = add_constant(gm, f"moe_shard{index}_{role}", shard, fake_mode)
        full_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return ShardedBlock(node, report, full, shard_nodes, full_bytes, full_bytes // world.size)

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
    node: fx.Node, report: BlockReport, world_size: int, world: rdist.World, mode: str, ctx: PassContext
) -> ShardedBlock | None:
    """A block whose expert arguments already are this rank's shards ``[E/W, ...]`` (nothing to shard or release)."""
    if world_size != world.size:
        ctx.report.skipped.append(Skipped(report.path, f"parallel={mode}: sharded over {world_size} ranks, not {world.size}"))
        return None
    shard_nodes = {role: node.args[pos] for role, pos in ROLES.items() if isinstance(node.args[pos], fx.Node)}
    shard_bytes = sum(v.numel() * v.element_size() for v in (n.meta["val"] for n in shard_nodes.values()))
    return ShardedBlock(node, report, {}, shard_nodes, shard_bytes * world_size, shard_bytes)


def _full_tensor(ctx: PassContext, placeholder: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a placeholder, including one released by an earlier compile."""
    value = ctx.real_value(placeholder)
    if value is None:
        index = ctx.placeholder_index(placeholder)
        value = ctx.state.get("released_inputs", {}).get(index)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return value
    return None
