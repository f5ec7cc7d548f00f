"""AEP serving on 2 gloo ranks: lockstep behind rank 0, exact scores under uneven load, clear errors when a rank fails."""

import pytest
from aep_serving_workers import aep_parity_worker, dead_rank_worker
from dist_workers import spawn

pytestmark = pytest.mark.slow  # multi-process runs with compiles


@pytest.mark.parametrize("families", [("tiny_moe", "qwen3_moe"), ("deepseek_v3",)])
def test_aep_lockstep_scores_equal_eager_under_uneven_load(families):
    rank0, rank1 = spawn(aep_parity_worker, 2, families, timeout_s=900, group_timeout_s=120)
    for name in families:
        r0, r1 = rank0[name], rank1[name]
        assert len(r0["errors"]) == 17 and max(r0["errors"]) < 1e-5, (name, r0["errors"])
        owners = dict(r0["ranks"])
        # the four shared-prefix calls all went to rank 0: rank 1 ran only padding for four steps
        assert {owners[f"c{c}r{i}"] for c in range(4) for i in range(3)} == {0}, owners
        assert 1 in owners.values(), owners  # the fresh prompts of the last call reached rank 1
        assert r1["padding_batches"] >= 4 and r1["steps"] == r0["steps"] == 6  # warm-up + 5 calls
        assert r0["messages"]["bad-token"].startswith("token id") and "outside the prompt" in r0["messages"]["bad-read"]


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_fails_every_call_and_health_within_the_timeout(how):
    group_timeout_s = 5
    rank0, rank1 = spawn(dead_rank_worker, 2, how, timeout_s=600, group_timeout_s=group_timeout_s)
    assert rank1 == {"left": True}
    status, body = rank0["call"]
    assert status == 503 and body["detail"].startswith("AEP serving failed on rank 0 of 2"), rank0
    assert ("Timed out" if how == "hang" else "Connection") in body["detail"], body
    assert rank0["seconds"] < group_timeout_s + 15, rank0
    for key in ("later", "rerank"):
        status, body = rank0[key]
        assert status in (503, 501) and ("AEP serving failed" in body["detail"] or status == 501), rank0[key]
    status, body = rank0["health"]
    assert status == 503 and body["status"] == "failed" and "AEP serving failed" in body["error"], body
