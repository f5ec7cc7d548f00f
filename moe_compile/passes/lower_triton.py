"""Choose the implementation of each canonical MoE call: Triton kernels or torch.

Matches: ``moe_compile.moe(...)`` calls made by :mod:`.canonicalize_moe`.

Emits: with ``kernels="triton"`` (or ``"auto"`` on a GPU), the same call retargeted
to ``moe_compile.moe_triton(...)`` — same arguments, same result — whose
implementation runs the fused Triton grouped GEMMs of :mod:`moe_compile.kernels`::

    moe = moe_compile.moe(x, ids, w, w_up, w_down, b_up, b_down, spec)
    # becomes
    moe = moe_compile.moe_triton(x, ids, w, w_up, w_down, b_up, b_down, spec)

With ``kernels="torch"`` (or ``"auto"`` off a GPU) nothing changes. The report
says, per block, which implementation runs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import tensor_val
from .base import GraphPass, PassContext


class LowerToTriton(GraphPass):
    name = "lower_triton"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        changed = False
        for node, report in ctx.state.get("moe_blocks", []):
            on_cuda = tensor_val(node.args[0]).device.type == "cuda"
            # calls retargeted before (moe_offload) keep their implementation
            if node.target is not torch.ops.moe_compile.moe.default or ctx.options.kernel_impl(on_cuda) != "triton":
                continue
            from ..kernels import fused_moe  # noqa: F401  (registers moe_compile::moe_triton)

            node.target = torch.ops.moe_compile.moe_triton.default
            report.implementation = "triton"
            report.rewrites.append("triton grouped GEMM")
            changed = True
        return changed
