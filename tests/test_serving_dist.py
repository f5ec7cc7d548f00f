"""Two data-parallel ranks (gloo, 127.0.0.1): routed scoring equals eager on every rank."""

import pytest
from dist_workers import spawn
from serving_helpers import request_mix, routed_parity_worker

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # multi-process run with compiles


def test_two_ranks_score_their_share_and_match_eager():
    results = spawn(routed_parity_worker, 2)
    for rank, r in enumerate(results):
        assert r["error"] < 1e-5, (rank, r)
    assert results[0]["ranks"] == results[1]["ranks"]  # every rank gathered the same, full answer
    owners = results[0]["ranks"]
    assert set(owners) == {0, 1} and len(owners) == len(request_mix())
    assert [r["local_requests"] for r in results] == [owners.count(0), owners.count(1)]
    assert all(r["cached_tokens"] > 0 for r in results)  # each rank reused the prefixes routed to it
