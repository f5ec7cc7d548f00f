"""Offload on a GPU: host copies pinned, prefetches on a side stream, logits exact. Skipped without CUDA.

The CPU tests (tests/test_offload.py) cover the protocol and the byte counts; what only a GPU shows is
that the asynchronous part is real (copies from pinned memory on another stream) and correctly waited on:
ring buffers are NaN-filled when claimed, so a compute that ran before its copy finished would show.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from predictor_helpers import nan_filling, random_predictors

import moe_compile
from moe_compile.runtime import expert_store
from moe_compile.testing import zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, streams)")


@pytest.fixture
def copies(monkeypatch):
    """The host source's copies, one entry per expert asked for: (stream it ran on, pinned)."""
    seen: list[tuple[int, bool]] = []
    copy = expert_store.HostSource._copy

    def recording(self, layer, buffer, experts):
        pinned = all(t.is_pinned() for t in self.host[layer].values())
        seen.extend((torch.cuda.current_stream().cuda_stream, pinned) for _ in experts)
        return copy(self, layer, buffer, experts)

    monkeypatch.setattr(expert_store.HostSource, "_copy", recording)
    monkeypatch.setattr(expert_store.ExpertStore, "_claim", nan_filling(expert_store.ExpertStore._claim))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefetch_copies_pinned_memory_on_a_side_stream(dtype, copies, tmp_path):
    model = zoo.build("qwen3_moe", num_layers=4, dtype=dtype).cuda()
    ids = zoo.make_inputs(model, batch=2, seq=64)  # 128 tokens: the random predictor's union covers most experts
    random_predictors(model, tmp_path / "p.safetensors")
    options = {"inductor": False, "offload": "cpu", "predictor": str(tmp_path / "p.safetensors")}
    with torch.no_grad():
        expected = model(ids).logits  # before compiling: offload releases the model's expert tensors
    allocated = torch.cuda.memory_allocated()
    compiled = torch.compile(model, backend="moe_prefill", options=options)
    main = torch.cuda.current_stream().cuda_stream
    with torch.no_grad(), moe_compile.backend.collect_reports() as report:
        got = compiled(ids).logits
    assert rel_err(got, expected) < (1e-5 if dtype == torch.float32 else 2e-2)
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3]
    assert experts and all(p.untyped_storage().nbytes() == 0 for p in experts)  # device copies freed
    assert report.released_bytes == sum(p.numel() * p.element_size() for p in experts)
    del got
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < allocated  # the experts' device memory went back (the ring is smaller)
    (store,) = report.offload
    assert store.device.type == "cuda" and all(
        t.is_pinned() for layer in store.source.host.values() for t in layer.values()
    )
    assert copies and all(pinned for _, pinned in copies)
    side = [s for s, _ in copies if s != main]
    assert side, "no expert copy ran on a side stream"
    ahead = sum(s.bytes_ahead for s in store.stats())
    assert ahead > 0 and len(side) * min(s.expert_bytes for s in store.stats()) <= ahead


def test_no_predictor_copies_on_demand_on_the_compute_stream(copies):
    model = zoo.build("qwen3_moe", num_layers=2).cuda()
    ids = zoo.make_inputs(model, batch=1, seq=16)
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False, "offload": "cpu"})
    main = torch.cuda.current_stream().cuda_stream
    with torch.no_grad():
        expected = model(ids).logits  # before compiling: offload releases the model's expert tensors
        got = compiled(ids).logits
        assert rel_err(got, expected) < 1e-5
    assert copies and all(s == main for s, _ in copies)
