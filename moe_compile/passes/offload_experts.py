"""Offload every MoE layer's experts to host memory (``offload="cpu"``); the device keeps a ring of two.

Contract
--------
Matches: the canonical calls of ``ctx.moe_blocks`` (``moe_compile.moe``), in graph order,
whose expert tensors are graph inputs with known values.

Emits: one :class:`~moe_compile.runtime.expert_store.ExpertStore` for the graph, which takes the
expert tensors of each block (host copies it owns: pinned on CUDA, plain on CPU) and holds two
device buffers, one per layer parity. Each call is retargeted to
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

Release: once the store holds a layer's host copies, the model's own expert tensors are released
(``untyped_storage().resize_(0)``, :func:`moe_compile.runtime.shards.release`, as the parallel
passes do): shape, dtype and strides stay, which is all Dynamo's guards read, so the compiled model
keeps running, and the device memory they held is freed (``report.released_bytes``; on CPU the host
copy takes the same memory, so nothing is saved there). **The eager model cannot run afterwards**:
PyTorch raises on the first read of a released tensor ("... out of bounds for storage of size 0"
or "... data is not allocated yet"). A tensor that shares its storage, or whose storage cannot be
resized (memory-mapped), is kept, with a note. A recompile (a new input shape) sees the released
tensors through :mod:`.released_weights` and the store takes the cached host copies again
(:func:`~moe_compile.runtime.expert_store.sources.host_copy`).

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

from ..graph import set_fake_val, tensor_val
from ..report import BlockReport, Skipped
from ..runtime import expert_store, shards
from .base import GraphPass
from .moe_call import MoECall, fp8_refusal
from .state import PassContext


class OffloadExperts(GraphPass):
    name = "offload_experts"
    requires = ("moe_blocks",)
    uses = ("released_inputs",)  # a recompile: the tensors the first compile released
    provides = ("stores",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> bool:
        blocks = ctx.moe_blocks
        if not blocks:
            return False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        store = expert_store.new_store(tensor_val(MoECall.from_node(blocks[0].node).hidden).device)
        released = 0
        for node, report in sorted(blocks, key=lambda b: order[b.node]):
            if (why := fp8_refusal(node, f"offload={ctx.options.offload}")) is not None:  # [fp8]
                ctx.report.skipped.append(Skipped(report.path, why))
                continue
            tensors = {role: _real(ctx, arg) for role, arg in MoECall.from_node(node).experts().items()}
            unknown = [role for role, t in tensors.items() if t is None]
            if unknown:
                reason = f"offload: {', '.join(unknown)} not a graph input with a known value; experts stay resident"
                ctx.report.skipped.append(Skipped(report.path, reason))
                continue
            to_store_call(node, report, store, tensors, f"offload={ctx.options.offload}")
            released += _release(ctx, report.path, tensors)
        if not store.layers:
            return False
        keep_store(ctx, store)
        where = "pinned host copies" if store.device.type == "cuda" else "host copies (on CPU: no memory saved)"
        ctx.report.released_bytes += released
        ctx.report.notes.append(
            f"offload={ctx.options.offload}: {len(store.layers)} MoE layer(s), {store.host_bytes / 2**20:.2f} MiB of "
            f"experts kept as {where}; device ring of 2 layer buffers, {store.buffer_bytes / 2**20:.2f} MiB; "
            + (
                f"{released / 2**20:.2f} MiB of the model's expert tensors released (the eager model can no longer run)"
                if released or not ctx.released_inputs
                else "the model's expert tensors were released by an earlier compile"
            )
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


def _release(ctx: PassContext, path: str, tensors: dict[str, torch.Tensor]) -> int:
    """Release the model's expert tensors the store now holds copies of; the bytes freed."""
    freed = 0
    with unset_fake_temporarily():
        for role, tensor in tensors.items():
            n = shards.release(tensor)
            if not n and not shards.is_released(tensor):
                ctx.report.notes.append(f"{path}: {role} kept (its storage is shared or cannot be resized)")
            freed += n
    return freed


def _real(ctx: PassContext, node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a placeholder, including one an earlier offload compile released."""
    value = ctx.real_value(node)
    if value is None and (index := ctx.placeholder_index(node)) is not None:
        value = ctx.released_inputs.get(index)
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and not value.is_meta:
        return value
    return None
