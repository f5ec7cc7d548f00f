"""Token alignment: the device version against the Python loop, layout invariants, no host sync."""

import pytest
import torch

from moe_compile.kernels.align import align, padded_bound

from .kernel_testing import DEVICE
from .references import align_reference

_GEN = torch.Generator().manual_seed(0)  # never the global RNG: other test files rely on it
CASES = {
    "random": (torch.randint(0, 8, (13, 2), generator=_GEN), 8),
    "one_token": (torch.tensor([[3, 1]]), 8),
    "empty_experts": (torch.tensor([[5, 1], [1, 5], [5, 1]]), 8),
    "first_and_last_expert": (torch.tensor([[0, 7], [7, 0]]), 8),
    "all_on_one_expert": (torch.full((9, 1), 2), 4),
    "top8_e160": (torch.stack([torch.randperm(160, generator=_GEN)[:8] for _ in range(11)]), 160),
    "e60_int32": (torch.randint(0, 60, (16, 4), dtype=torch.int32, generator=_GEN), 60),
    "no_tokens": (torch.zeros(0, 2, dtype=torch.long), 8),
}


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_align_matches_reference(case, block_m, device):
    topk_ids, E = CASES[case]
    topk_ids = topk_ids.to(device)
    got = align(topk_ids, E, block_m)
    want = align_reference(topk_ids, E, block_m)
    for name, g, w in zip(got._fields, got, want, strict=True):
        assert g.dtype == torch.int32, name
        assert torch.equal(g, w), f"{name}: {g.tolist()} != {w.tolist()}"


def test_align_invariants(device):
    topk_ids = torch.randint(0, 12, (16, 3), generator=_GEN).to(device)
    S, block_m = topk_ids.numel(), 4
    pair_ids, block_expert, num_blocks = align(topk_ids, 12, block_m)
    assert pair_ids.numel() == padded_bound(S, 12, block_m) == block_expert.numel() * block_m
    valid = pair_ids[pair_ids < S].long()
    assert sorted(valid.tolist()) == list(range(S))  # every pair exactly once
    n = int(num_blocks)
    experts_P = block_expert[:n].repeat_interleave(block_m)
    real = pair_ids[: n * block_m] < S
    assert torch.equal(topk_ids.reshape(-1)[pair_ids[: n * block_m][real].long()], experts_P[real].long())
    assert bool((pair_ids[n * block_m :] == S).all())


def test_align_never_reads_values_on_host():
    """On the meta device any ``.item()`` / ``.tolist()`` would raise: the launch path is sync-free."""
    pair_ids, block_expert, num_blocks = align(torch.randint(0, 60, (16, 8), generator=_GEN).to("meta"), 60, 16)
    assert pair_ids.shape == (padded_bound(128, 60, 16),) and num_blocks.shape == (1,)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA sync debug mode")
def test_align_no_cuda_sync():
    topk_ids = torch.randint(0, 60, (64, 8), generator=_GEN).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        align(topk_ids, 60, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_align_errors():
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        align(torch.zeros(4, dtype=torch.long), 8, 16)
    with pytest.raises(TypeError, match="int32 or int64"):
        align(torch.zeros(4, 2), 8, 16)
