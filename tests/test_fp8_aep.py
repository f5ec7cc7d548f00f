"""AEP on 2 gloo ranks with block-fp8 experts: equal to the single-rank fp8 result; half of bf16's gathered bytes.
EP refuses fp8 blocks with a reason."""

import pytest
from dist_workers import spawn
from fp8_dist_workers import fp8_aep_worker

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # multi-process run


def test_aep_fp8_equals_single_rank_and_gathers_half_of_bf16():
    H, I, E = 160, 72, 8  # qwen3_moe zoo: 8 experts
    results = spawn(fp8_aep_worker, 2, {"hidden_size": H, "moe_intermediate_size": I})
    for rank, r in enumerate(results):
        fp8, bf16 = r["fp8"], r["bf16"]
        assert fp8["blocks"] and all(q.startswith("fp8") for _, q in fp8["blocks"]), (rank, fp8)
        assert not fp8["skipped"], (rank, fp8["skipped"])
        # the gathers move the e4m3 bytes and fp32 scales exactly: the same arithmetic as on one rank
        assert fp8["equal"], (rank, fp8["error"])
        assert bf16["error"] < 1e-5, (rank, bf16["error"])
        # per layer, the gathered layer (all E experts): weights at 1 byte instead of 2, plus the scales
        weights_bf16 = E * (2 * I * H + H * I) * 2
        scales = E * (2 * 2 + 2 * 1) * 4  # gate_up [2, 2] and down [2, 1] blocks per expert, fp32
        assert bf16["gather_bytes"] == [weights_bf16] * len(bf16["blocks"])
        assert fp8["gather_bytes"] == [weights_bf16 // 2 + scales] * len(fp8["blocks"])
        ep = r["ep"]  # EP refuses fp8 blocks with the reason; they stay replicated and exact
        assert len(ep["skipped"]) == len(fp8["blocks"]) and all("block-fp8" in w for w in ep["skipped"]), ep
        assert ep["equal"], rank
