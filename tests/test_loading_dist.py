"""Sharded loading on gloo ranks: each rank reads only its experts, and the compiled AEP / EP model equals eager.

One process is the reference: each rank computes the eager logits of its own fresh batch on a whole
load, then loads its shards (moe_compile.loading.load_model(parallel=...)) and compiles.
"""

from __future__ import annotations

import shutil

import pytest
from dist_workers import spawn
from loading_workers import load_error_worker, sharded_parity_worker
from test_loading import save

from moe_compile.routing_stats import collect_routing_stats
from moe_compile.testing import zoo

pytestmark = [pytest.mark.slow, pytest.mark.ranks, pytest.mark.timeout(600)]  # gloo ranks, torchrun agents


def test_two_ranks_load_their_experts_only_and_aep_ep_equal_eager(tmp_path):
    cases, E = [], 8
    for family, layout, parallel in (
        ("qwen3_moe", "per_expert", "aep"),
        ("gpt_oss", "stacked", "aep"),  # biases too
        ("mixtral", "multi_file", "ep"),
    ):
        path = tmp_path / f"{family}_{layout}"
        save(zoo.build(family, num_layers=2), path, layout)
        cases.append((str(path), parallel, 0, None))
    results = spawn(sharded_parity_worker, 2, cases)
    # moe-compile plan's memory model against what rank 0 measured (Qwen3-MoE, AEP, depth 1, 64-token cache)
    from transformers import AutoConfig

    from moe_compile import planner

    setting = planner.Setting(
        gpus=2, gpu="h100", link="nvlink", tokens_per_gpu=64, dtype="fp32", prefix_cache_tokens=64
    )
    predicted = planner.memory_parts(planner.model_shape(AutoConfig.from_pretrained(cases[0][0])), setting, depth=1)
    measured = results[0][0]["memory"]
    for part in ("expert_bytes", "ring_bytes", "prefix_cache_bytes"):
        assert predicted[part] == measured[part], (part, predicted, measured)
    assert abs(predicted["dense_bytes"] - measured["dense_bytes"]) <= 0.01 * measured["dense_bytes"]  # + rotary buffers
    for rank, per_case in enumerate(results):
        for case, facts in zip(cases, per_case, strict=True):
            assert facts["err"] < 1e-5, (rank, case, facts["err"])
            assert facts["full_storage_bytes"] == 0, case  # no [E, ...] tensor holds memory
            assert facts["released_bytes"] == 0  # nothing full was ever there to release
            info = facts["info"]
            assert info.world_size == 2 and info.rank == rank
            assert info.expert_bytes * 2 == info.full_expert_bytes, case  # exactly 1/W of the experts
            for name, shapes in facts["registered"].items():
                assert facts["shapes"][name][0] == E
                assert shapes == [(E // 2, *facts["shapes"][name][1:])], (name, shapes)
            assert any("MoE block(s) sharded" in n for n in facts["notes"]), facts["notes"]
            # each rewrite was checked on probe inputs with this rank's own experts (the full ones never existed)
            assert any("verified on this rank's own expert rows" in n for n in facts["notes"]), facts["notes"]
            assert facts["verified"] and all(v.startswith("probe rel err") for v in facts["verified"])
            memory = facts["memory"]  # what /health and score's summary say
            assert memory["expert_bytes"] == info.expert_bytes and memory["dense_bytes"] > 0
            layer = info.full_expert_bytes // 2  # 2 MoE layers of equal size: depth 1 keeps 2 gathered layers
            assert memory["ring_bytes"] == 2 * layer, memory
            assert (memory["prefix_cache_bytes"] > 0) == (facts["cache_off"] is None), facts["cache_off"]


def test_hot_experts_are_loaded_directly_on_every_rank(tmp_path):
    model = zoo.build("qwen3_moe", num_layers=2)
    model.save_pretrained(tmp_path / "model")
    stats = collect_routing_stats(model, zoo.make_inputs(model, batch=4, seq=16, seed=3))
    stats.save(tmp_path / "routing.safetensors")
    R, E, W = 2, 8, 2
    (per_case,) = zip(
        *spawn(sharded_parity_worker, W, [(str(tmp_path / "model"), "aep", R, str(tmp_path / "routing.safetensors"))]),
        strict=True,
    )
    for facts in per_case:
        assert facts["err"] < 1e-5 and facts["full_storage_bytes"] == 0
        for name, shapes in facts["registered"].items():
            rest = facts["shapes"][name][1:]
            assert shapes == sorted([((E - R) // W, *rest), (R, *rest)]), (name, shapes)
        info = facts["info"]
        assert info.expert_bytes == info.full_expert_bytes // E * (R + (E - R) // W)
        assert facts["memory"]["ring_bytes"] == 2 * info.full_expert_bytes // 2 // E * (E - R)  # 2 layers of E - R


def test_an_expert_count_that_does_not_divide_over_the_ranks_fails_on_every_rank(tmp_path):
    zoo.build("qwen3_moe", num_layers=1).save_pretrained(tmp_path)
    errors = spawn(load_error_worker, 3, [str(tmp_path)] * 3)
    for err in errors:
        assert err.startswith("CheckpointError: loading") and "failed on rank 0 of 3" in err, err
        assert "E=8 experts do not divide evenly over 3 ranks; use a world size that divides 8" in err, err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_shard_file_on_one_rank_fails_every_rank_naming_the_file(tmp_path, damage):
    good = tmp_path / "good"
    zoo.build("qwen3_moe", num_layers=2).save_pretrained(good, max_shard_size="40KB")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-100])
    errors = spawn(load_error_worker, 2, [str(good), str(bad)], group_timeout_s=60)  # only rank 1's copy is bad
    for err in errors:
        assert "failed on rank 1 of 2" in err and str(victim) in err, err
        assert ("shard file missing" if damage == "missing" else "truncated or damaged") in err, err


def test_two_torchrun_agents_as_two_nodes_score_aep_from_a_sharded_load(tmp_path):
    """ "Two nodes" on localhost: two torchrun agents (--nnodes 2, c10d rendezvous), one rank each, gloo."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import torch
    from serving_helpers import eager_value, rel_err

    from moe_compile.serving import Request

    model = zoo.build("qwen3_moe", num_layers=2)
    save(model, tmp_path / "model", "multi_file")
    requests = [{"id": f"r{i}", "tokens": [3 + i, 9, 17 + i] * (2 + i % 3), "labels": [5, 6]} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "-m",
                "moe_compile.cli",
                "score",
                "--model",
                str(tmp_path / "model"),
                "--parallel",
                "aep",
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--block-size",
                "8",
                "--token-budget",
                "64",
                "--chunk",
                "3",
                "--dist-timeout",
                "120",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outs = [a.communicate(timeout=500) for a in agents]
    for agent, (_, err) in zip(agents, outs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    assert "memory per rank (tensor bytes)" in outs[0][0]  # node 0 holds global rank 0: it writes and reports
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(records) == sorted(r["id"] for r in requests)
    for r in requests:
        expected = eager_value(model, Request(id=r["id"], tokens=tuple(r["tokens"]), labels=tuple(r["labels"])))
        assert rel_err(torch.tensor(records[r["id"]]["logprobs"]), expected) < 1e-5, r["id"]
    assert {records[r["id"]]["rank"] for r in requests} == {0, 1}
