"""offload_experts: every canonical call's experts handed to an expert store in host memory (moe_offload)."""

import torch
from custom_moe import TinyLM

from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.passes.moe_call import MoECall
from moe_compile.passes.offload_experts import OffloadExperts
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import run


def _harness():
    return PassHarness(DetectMoE(), CanonicalizeMoE(), OffloadExperts())


def test_calls_read_their_experts_from_one_store():
    torch.manual_seed(0)
    model = TinyLM(layers=2).eval()
    harness = run(_harness(), model, torch.randint(0, 64, (2, 5)), options={"offload": "cpu"})
    harness.check_after_ops({"moe_compile::moe": 0, "moe_compile::moe_offload": 2})
    (store,) = harness.record.ctx.stores
    offload = torch.ops.moe_compile.moe_offload.default
    calls = [MoECall.from_node(n) for n in harness.record.after.nodes if n.target is offload]
    assert [(c.store, c.layer, c.token) for c in calls] == [(store.handle, 0, None), (store.handle, 1, None)]
    full = sum(b.w_up.numel() * 4 + b.w_down.numel() * 4 for b in model.blocks)
    assert [s.calls for s in store.stats()] == [1, 1] and store.host_bytes == full
    # the store holds its own copies; the model's expert tensors were released
    assert all(t.untyped_storage().nbytes() == 0 for b in model.blocks for t in (b.w_up, b.w_down))
    assert harness.report.released_bytes == full


def test_near_miss_nothing_canonical_nothing_offloaded():
    torch.manual_seed(0)
    harness = run(_harness(), TinyLM(post_norm=True).eval(), torch.randint(0, 64, (2, 5)), options={"offload": "cpu"})
    assert harness.record.changed["offload_experts"] is False and harness.record.ctx.stores == []
    harness.check_after_ops({"moe_compile::moe_offload": 0, "aten::bmm": 4})
    assert all("not canonical" in s.reason for s in harness.report.skipped)
