"""Hide expert weights that an earlier parallel or offload compile released, so no pass reads freed memory.

Runs first, only with ``parallel="aep"`` / ``"ep"`` or ``offload="cpu"``.

Matches: graph inputs whose real value is a tensor with elements but no storage:
the full expert tensors of a sharded load (:mod:`moe_compile.loading`), and the full
expert weights that :mod:`.async_expert_parallel`, :mod:`.expert_parallel` or
:mod:`.offload_experts` released when this model was first compiled
(``storage().resize_(0)``). A recompile (a new input shape, say) sees them again.

Emits: nothing in the graph. In ``ctx.real_inputs`` their values become unknown
(``None``), so :mod:`.canonicalize_moe` verifies its rewrites on the rows this rank
holds of them (its shards and resident experts, tiled to ``[E, ...]``; random weights
of the same shapes where it holds none) instead of the freed ones; the tensors themselves go to
``ctx.released_inputs`` (placeholder index -> tensor), where the parallel
passes find them and, through them, the shards cached at the first compile
(:mod:`moe_compile.runtime.shards`), and the offload pass the host copies
(:func:`moe_compile.runtime.expert_store.sources.host_copy`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime import shards
from .base import GraphPass
from .state import PassContext


class HideReleasedWeights(GraphPass):
    name = "released_weights"
    provides = ("released_inputs",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        if ctx.real_inputs is None:
            return False
        released = {
            i: value
            for i, value in enumerate(ctx.real_inputs)
            if isinstance(value, torch.Tensor)
            and not isinstance(value, torch._subclasses.FakeTensor)
            and not value.is_meta
            and shards.is_released(value)
        }
        for i in released:
            ctx.real_inputs[i] = None
        if released:
            ctx.released_inputs = released
            ctx.report.notes.append(
                f"{len(released)} expert tensor(s) were released by an earlier parallel compile or never loaded "
                "whole (a sharded load): rewrites verified on this rank's own expert rows, shards reused"
                if ctx.options.offload is None
                else f"{len(released)} expert tensor(s) were released by an earlier offload compile: "
                "rewrites verified with random weights, host copies reused"
            )
        return False
