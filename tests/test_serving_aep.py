"""AEP serving on 2 gloo ranks: lockstep behind rank 0, exact scores under uneven load.

A rank that fails gives clear errors.
"""

import pytest
from aep_serving_workers import aep_parity_worker, dead_rank_worker, front_worker
from dist_workers import spawn

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # multi-process runs with compiles


@pytest.mark.parametrize("families", [("tiny_moe", "qwen3_moe"), ("deepseek_v3",)])
@pytest.mark.timeout(960)  # spawn's own limit is 900 s: the ranks' stacks come first
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
@pytest.mark.timeout(660)  # spawn's own limit is 600 s: the ranks' stacks come first
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


@pytest.mark.timeout(660)  # torchrun's own limit is 600 s: the ranks' stacks come first
def test_torchrun_score_parallel_aep_writes_eager_scores(tmp_path):
    """The documented command: torchrun --nproc-per-node 2 --no-python moe-compile score --parallel aep."""
    import json
    import os
    import subprocess
    import sys

    import torch
    from serving_helpers import eager_value, rel_err

    from moe_compile.serving import Request
    from moe_compile.testing import zoo

    model = zoo.build("qwen3_moe", num_layers=1)
    model.save_pretrained(tmp_path / "model")
    prefix = list(range(3, 30))
    requests = [{"id": f"r{i}", "tokens": prefix + [40 + i] * (1 + i), "labels": [5, 6]} for i in range(6)]
    requests += [{"id": f"s{i}", "tokens": [60 + i, 61, 62 + i, 9], "labels": [7]} for i in range(3)]
    requests.append({"id": "bad", "tokens": [5, 100000]})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--no-python", "moe-compile", "score", "--model", str(tmp_path / "model"), "--parallel", "aep",
           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--block-size", "8",
           "--token-budget", "64", "--chunk", "4", "--dist-timeout", "120",
           "--prefix-cache-tokens", "auto"]  # fmt: skip  # the ranks agree on the sizes over the control group
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--token-budget 64, --prefix-cache-tokens 65536 (on cpu 'auto' keeps the defaults" in done.stderr
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()) if "id" in r}
    assert sorted(records) == sorted(r["id"] for r in requests)
    assert "outside the vocabulary" in records["bad"]["error"]
    for r in requests[:-1]:
        expected = eager_value(model, Request(id=r["id"], tokens=tuple(r["tokens"]), labels=tuple(r["labels"])))
        assert rel_err(torch.tensor(records[r["id"]]["logprobs"]), expected) < 1e-5, r["id"]
    assert {records[r["id"]]["rank"] for r in requests[:-1]} == {0, 1}  # both ranks scored


@pytest.mark.timeout(960)
def test_the_front_end_batches_concurrent_calls_on_rank_0_and_reports_metrics_per_rank():
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    rank0, rank1 = spawn(front_worker, 2, timeout_s=900, group_timeout_s=120)
    assert len(rank0["errors"]) == 24 and max(rank0["errors"]) < 1e-5, rank0["errors"]
    assert rank0["ranks"] == [0, 1]  # the concurrent calls' requests were spread over both ranks
    assert rank0["metrics_prompt_tokens"] == {0: rank0["prompt_tokens"], 1: rank1["prompt_tokens"]}
    assert rank1["prompt_tokens"] > 0


def test_out_of_memory_under_aep_fails_its_batch_or_the_lockstep_clearly_over_a_gloo_control_group():
    from aep_serving_workers import oom_worker

    rank0, rank1 = spawn(oom_worker, 2, timeout_s=600, group_timeout_s=None)
    for facts in (rank0, rank1):
        assert facts["control_is_separate"] and facts["lockstep_control"], facts
        assert (facts["control_backend"], facts["control_size"]) == ("gloo", 2)
        # every lockstep message went over the control group; the default group only carried the experts' gathers
        assert facts["control_calls"] == ["all_reduce", "barrier", "broadcast_object_list", "gather_object"], facts
        assert facts["other_calls"] == [], facts
    # the head's OOM: only request "boom" failed, on whichever rank had it; every other score is exact
    assert list(rank0["errors"]) == ["boom"] and rank0["oom_flags"] == ["boom"], rank0
    assert rank0["errors"]["boom"].startswith("out of device memory running this request's batch"), rank0
    assert rank0["max_err"] < 1e-5 and rank0["ranks"] == [0, 1], rank0
    # the decoder's OOM on rank 1: the lockstep fails, rank 0 names the cause within the group's timeout
    assert rank1.get("decoder_oom") and rank1["cause_is_oom"], rank1
    assert "ran out of device memory inside the compiled decoder" in rank1["left_with"], rank1
    assert rank0["third"].startswith("AEP serving failed on rank 0 of 2"), rank0
    assert "the cause, from another rank: rank 1 of 2 ran out of device memory inside the compiled decoder" in (
        rank0["third"]), rank0  # fmt: skip
    assert "smaller --token-budget" in rank0["third"] and rank0["health"] == rank0["third"]
    assert rank0["seconds"] < 60, rank0
