"""Choose the implementation of each canonical MoE call: Triton kernels or torch.

Matches: the ``moe_compile.moe(...)`` calls of ``ctx.moe_blocks`` (made by :mod:`.canonicalize_moe`).

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
from .base import GraphPass
from .moe_call import MoECall
from .state import PassContext


class LowerToTriton(GraphPass):
    name = "lower_triton"
    requires = ("moe_blocks",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        changed = False
        for node, report in ctx.moe_blocks:
            on_cuda = tensor_val(MoECall.from_node(node).hidden).device.type == "cuda"
            if node.target is torch.ops.moe_compile.moe_fp8.default and ctx.options.kernel_impl(on_cuda) == "triton":
                node.target = torch.ops.moe_compile.moe_fp8_triton.default  # [fp8] the same schema
                report.implementation = "triton"
                report.rewrites.append("triton fp8 grouped GEMM")
                changed = True
                continue
            # calls retargeted before (moe_offload) keep their implementation
            if node.target is not torch.ops.moe_compile.moe.default or ctx.options.kernel_impl(on_cuda) != "triton":
                continue
            node.target = torch.ops.moe_compile.moe_triton.default  # the same schema
            report.implementation = "triton"
            report.rewrites.append("triton grouped GEMM")
            changed = True
        return changed
