"""AEP with a predictor: gather the union of all ranks' predicted experts ahead, the rest on demand.

Runs with ``parallel="aep"`` and ``predictor=PATH``, instead of :mod:`.async_expert_parallel`
and before :mod:`.insert_predictors` (which then drives the prefetch). Like AEP, every rank is a
data-parallel replica with its own batch and keeps ``1/W`` of every layer's experts; unlike it, a
layer's gather brings only the experts some rank's predictor expects (when that is fewer than all),
and the routed experts no rank predicted follow on demand. Outputs do not depend on the predictor.

Contract
--------
Matches: the canonical calls ``moe_compile.moe(x, ids, weights, w_up, w_down, b_up, b_down, spec)``
of ``ctx.moe_blocks`` whose expert tensors are graph inputs with known values.

Requires: what :mod:`.sharded_experts` requires (torch.distributed initialised, ``E`` divisible by
``W``, the same graph and the same number of calls on every rank); ``memory_budget``, when set,
must hold the ring of two layer buffers (``ValueError`` naming both sizes); ``prefetch_depth`` is
refused by :class:`~moe_compile.options.Options` (the prefetch goes at the start of the layer that
uses it, before attention: one layer of window, the predictor's input decides when).

Emits: this rank's shards (:mod:`.sharded_experts`), one
:class:`~moe_compile.runtime.expert_store.ExpertStore` for the graph whose source is a
:class:`~moe_compile.runtime.expert_store.RanksSource` (fetches are all-gathers over the ranks),
and each call retargeted to ``moe_compile.moe_offload`` exactly as :mod:`.offload_experts` does;
then the full expert tensors are released (shown for layer 1, ``W = 2``)::

    # before
    w_up_1: "f32[8, 256, 128]" = placeholder; w_down_1: "f32[8, 128, 128]" = placeholder
    moe_1: "f32[s0, 128]" = moe_compile.moe(x_1, ids_1, wts_1, w_up_1, w_down_1, None, None, spec)

    # after this pass (the store holds this rank's [4, ...] shards; the full tensors are released)
    moe_1: "f32[s0, 128]" = moe_compile.moe_offload(x_1, ids_1, wts_1, None, store=0, layer=1, spec)

    # after insert_predictors
    predict_experts_1: "i64[s0, 2]" = moe_compile.predict_experts(reshape_9, w1, b1, w2, b2, 2, 1e-06)
    offload_prefetch_1: "i64[1]" = moe_compile.offload_prefetch(predict_experts_1, 0, 1)   # union, async gather
    ...                                                                                    # attention
    moe_1 = moe_compile.moe_offload(x_1, ids_1, wts_1, offload_prefetch_1, 0, 1, spec)    # wait, on demand

The graph holds no collective node: the collectives run inside the two ops, in the same order on
every rank (per layer: the prefetch's union and gather, then the on-demand union and gather). A
block without a predictor (no decoder layer, no router found: the report says why) fetches every
routed expert on demand. The expert compute is the torch implementation of the canonical op on the
layer buffer (no Triton lowering in this mode, as with ``offload``). The store's per-layer counts
(bytes gathered ahead, used, on demand, padding) are in ``ctx.report.offload``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ..graph import tensor_val, walk_back
from ..runtime.dist import World
from ..runtime.expert_store import RanksSource, new_store
from .moe_call import MoECall
from .offload_experts import keep_store, to_store_call
from .sharded_experts import ShardedBlock, ShardedExpertsPass
from .state import PassContext
from .vocabulary import VIEWS


class PredictedGather(ShardedExpertsPass):
    name = "predicted_gather"
    mode = "aep"
    provides = ("wrap_compiled", "stores")

    def rewrite(
        self, gm: fx.GraphModule, ctx: PassContext, blocks: list[ShardedBlock], world: World, start: fx.Node
    ) -> None:
        device = tensor_val(MoECall.from_node(blocks[0].node).hidden).device
        store = new_store(device, RanksSource(world, device))
        for block in blocks:
            shards = {role: _shard_tensor(gm, ctx, node) for role, node in block.shards.items()}  # [E/W, ...]
            to_store_call(block.node, block.report, store, shards, "aep: predicted experts ahead, the rest on demand")
        budget = ctx.options.memory_budget
        if budget is not None and store.buffer_bytes > budget:
            raise ValueError(
                f"moe_prefill option memory_budget={budget} bytes cannot hold the ring of two gathered MoE layers "
                f"that parallel='aep' with a predictor keeps: it needs {store.buffer_bytes} bytes"
            )
        keep_store(ctx, store)
        ctx.report.notes.append(
            f"aep with predictor: {len(blocks)} MoE layer(s); per layer the union over {world.size} ranks of the "
            f"predicted experts is gathered at the layer's start, the routed rest on demand; ring of 2 layer "
            f"buffers, {store.buffer_bytes / 2**20:.2f} MiB"
        )


def _shard_tensor(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> torch.Tensor:
    """The tensor behind a shard node: a graph buffer (``view(view(get_attr))``,
    :func:`moe_compile.graph.add_constant`), or, for a block that was already expert-parallel
    (:mod:`.recognize_expert_parallel`), the graph input."""
    *_, root = walk_back(node, VIEWS)
    if root.op == "placeholder":
        value = ctx.real_value(root)
        if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor):
            raise ValueError(f"predicted gather: the expert shard {ctx.param_name(root)} has no known value")
        return value
    return gm.get_buffer(root.target)
