"""Expert parallelism with AllToAll (``parallel="ep"``): the baseline AEP is measured against.

Runs with ``parallel="ep"``, after the canonical calls exist (and after
:mod:`.lower_triton`: its choice becomes the implementation of the local experts).
Every rank keeps ``1/W`` of every layer's experts and its own batch; tokens travel
to the experts (dispatch AllToAll), outputs travel back (combine AllToAll).

Contract
--------
Matches: the canonical calls of ``ctx.moe_blocks`` whose expert tensors
are graph inputs with known values.

Requires: what :mod:`.sharded_experts` requires (torch.distributed initialised,
``E`` divisible by ``W``), and every rank calling the compiled model the same
number of times.

Emits, per block (shown for ``W = 2``)::

    # before
    moe_3: "f32[s0, 32]" = moe_compile.moe(x_3, ids_3, wts_3, w_up_3, w_down_3, None, None, spec)

    # after
    moe_shard3_w_up: "f32[4, 32, 32]" = get_attr[moe_shard3_w_up]       # this rank's experts
    view_6 = aten.view(moe_shard3_w_up, [-1]); view_7 = aten.view(view_6, [4, 32, 32])   # for Inductor
    moe_shard3_w_down: "f32[4, 32, 16]" = get_attr[moe_shard3_w_down]
    view_8 = aten.view(moe_shard3_w_down, [-1]); view_9 = aten.view(view_8, [4, 32, 16])
    ...
    moe_3: "f32[s0, 32]" = moe_compile.moe_ep(x_3, ids_3, wts_3, view_7, view_9, None, None, spec, "0", 2, "torch")

``moe_compile::moe_ep`` (:mod:`moe_compile.ops.ep`, run by :mod:`moe_compile.runtime.ep`) exchanges counts (a host
sync), dispatches, runs the local experts and combines, per call; the full expert
tensors are then released.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import set_fake_val
from ..runtime.dist import World
from .moe_call import MoECall
from .sharded_experts import ShardedBlock, ShardedExpertsPass
from .state import PassContext


class ExpertParallel(ShardedExpertsPass):
    name = "expert_parallel"
    mode = "ep"

    def rewrite(
        self, gm: fx.GraphModule, ctx: PassContext, blocks: list[ShardedBlock], world: World, start: fx.Node
    ) -> None:
        for block in blocks:
            MoECall.from_node(block.node).replace(
                torch.ops.moe_compile.moe_ep.default,
                **block.shards,
                group_name=world.group_name,
                world_size=world.size,
                impl=block.report.implementation,
            )
            set_fake_val(block.node)
            block.report.rewrites.append(f"ep: all_to_all dispatch/combine over {world.size} ranks")
