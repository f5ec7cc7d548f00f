"""Offload every MoE layer's experts to host memory (``offload="cpu"``); the device keeps a ring of two.

Contract
--------
Matches: the canonical calls of ``ctx.moe_blocks`` (``moe_compile.moe``), in graph order,
whose expert tensors are graph inputs with known values.

Emits: one :class:`~moe_compile.runtime.expert_store.ExpertStore` for the graph, which takes the
expert tensors of each block (host memory: pinned copies on CUDA, the parameters themselves on
CPU) and holds two device buffers, one per layer parity. Each call is retargeted to
``moe_compile.moe_offload``, which fetches the routed experts into the buffer and computes there;
the expert placeholders are no longer read by the graph (shown for the second MoE layer, ``layer=1``)::

    # before
    w_up_1: "f32[8, 256, 128]" = placeholder; w_down_1: "f32[8, 128, 128]" = placeholder
    moe_1: "f32[s0, 128]" = moe_compile.moe(x_1, ids_1, wts_1, w_up_1, w_down_1, None, None, spec)

    # after (w_up_1, w_down_1 unused)
    moe_1: "f32[s0, 128]" = moe_compile.moe_offload(x_1, ids_1, wts_1, None, store=0, layer=1, spec)

The ``None`` token means "everything on demand"; :mod:`.insert_predictors` (next in the pipeline)
replaces it with a prefetch driven by the layer's predictor. ``moe_offload`` runs the torch
implementation of the canonical op (no Triton lowering in this mode).

Requires: no ``parallel`` option (checked by :class:`~moe_compile.options.Options`). A block whose
expert tensors are unknown (meta device, placeholders not lining up) stays resident, with the
reason in ``report.skipped``. The store goes to ``ctx.report.offload`` (live copy counts, a weak
reference) and to ``ctx.stores``: the backend's compiled callable holds it, so the store
lives exactly as long as the compiled graph.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ..graph import tensor_val
from ..report import BlockReport, Skipped
from ..runtime import expert_store
from .base import GraphPass, PassContext, set_fake_val
from .moe_call import MoECall


class OffloadExperts(GraphPass):
    name = "offload_experts"
    requires = ("moe_blocks",)
    provides = ("stores",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        blocks = ctx.moe_blocks
        if not blocks:
            return False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        store = expert_store.new_store(tensor_val(MoECall.from_node(blocks[0].node).hidden).device)
        for node, report in sorted(blocks, key=lambda b: order[b.node]):
            tensors = {role: _real(ctx, arg) for role, arg in MoECall.from_node(node).experts().items()}
            unknown = [role for role, t in tensors.items() if t is None]
            if unknown:
                reason = f"offload: {', '.join(unknown)} not a graph input with a known value; experts stay resident"
                ctx.report.skipped.append(Skipped(report.path, reason))
                continue
            to_store_call(node, report, store, tensors, f"offload={ctx.options.offload}")
        if not store.layers:
            return False
        keep_store(ctx, store)
        where = "pinned host copies" if store.device.type == "cuda" else "the parameters, in host memory"
        ctx.report.notes.append(
            f"offload={ctx.options.offload}: {len(store.layers)} MoE layer(s), {store.host_bytes / 2**20:.2f} MiB of "
            f"experts kept as {where}; device ring of 2 layer buffers, {store.buffer_bytes / 2**20:.2f} MiB"
        )
        return True


def to_store_call(
    node: fx.Node, report: BlockReport, store: expert_store.ExpertStore, tensors: dict, what: str
) -> None:
    """Hand a canonical call's expert tensors to ``store`` as its next layer; retarget it to ``moe_offload``."""
    layer = len(store.layers)
    with unset_fake_temporarily():
        store.add_layer(layer, report.path, tensors)
    # token None: no prefetch (insert_predictors adds it)
    MoECall.from_node(node).replace(
        torch.ops.moe_compile.moe_offload.default, token=None, store=store.handle, layer=layer
    )
    set_fake_val(node)
    report.implementation = f"{store.source.name} (torch)"
    report.rewrites.append(f"{what} (ring slot {layer % 2})")


def keep_store(ctx: PassContext, store: expert_store.ExpertStore) -> None:
    """The compiled graph keeps ``store`` alive (``ctx.stores``); the report sees it while it lives."""
    ctx.stores.append(store)
    ctx.report.offload.append(store)


def _real(ctx: PassContext, node: fx.Node) -> torch.Tensor | None:
    value = ctx.real_value(node)
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and not value.is_meta:
        return value
    return None
