"""An fp8 checkpoint loaded for AEP on 2 gloo ranks: each rank reads only its experts' fp8 weights and scales,
the AEP compile runs on those shards and equals a whole load, ``moe-compile score --parallel aep`` equals the
single-process score, and a scale missing from one rank's slice fails every rank with the same error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from dist_workers import spawn
from fp8_dist_workers import fp8_load_error_worker, fp8_sharded_load_worker
from safetensors.torch import load_file, save_file
from test_fp8_loading import OVERRIDES, run_cli

from moe_compile.testing import zoo
from moe_compile.testing.fp8 import save_fp8_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.ranks, pytest.mark.timeout(600)]  # multi-process runs with compiles

E, W = 8, 2  # the zoo's qwen3_moe: 8 experts; 2 ranks own experts 0-3 and 4-7


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    model = zoo.build("qwen3_moe", dtype=torch.bfloat16, overrides=OVERRIDES)
    root = tmp_path_factory.mktemp("fp8_aep")
    for layout in ("per_expert", "stacked"):
        save_fp8_checkpoint(model, root / layout, layout=layout)
    return root


def test_each_rank_reads_only_its_experts_fp8_bytes_and_scales_and_aep_equals_a_whole_load(fp8_dirs):
    paths = [str(fp8_dirs / layout) for layout in ("per_expert", "stacked")]
    results = spawn(fp8_sharded_load_worker, W, paths, timeout_s=480)
    for rank, per_path in enumerate(results):
        own = set(range(rank * E // W, (rank + 1) * E // W))
        for path, facts in zip(paths, per_path, strict=True):
            where = (rank, path)
            assert facts["stored_fp8_dtypes"] == ["torch.float32", "torch.float8_e4m3fn"], where
            assert not facts["mismatched"], (where, facts["mismatched"])  # bytes and scales: the stored slices
            # resident fp8 expert bytes (weights and scales, measured from the registered shards) = 1/W of the total
            assert facts["kept_bytes"] * W == facts["stored_expert_bytes"], (where, facts)
            assert facts["full_storage_bytes"] == 0, where  # the [E, ...] tensors hold no memory
            assert all(s == (E // W, *p[1:]) and p[0] == E for s, p in facts["shard_shapes"]), facts["shard_shapes"]
            info = facts["info"]
            assert (info.world_size, info.rank) == (W, rank) and info.expert_bytes * W == info.full_expert_bytes
            # what was read of the expert tensors: this rank's experts only
            reads = facts["expert_reads"]
            assert reads, where
            for key, start, stop in reads:
                expert = re.search(r"\.experts\.(\d+)\.", key)
                if expert is not None:  # per-expert tensors: only those of this rank's experts
                    assert int(expert.group(1)) in own and start is None, (where, key)
                else:  # stacked [E, ...] tensors: only this rank's rows
                    assert (start, stop) == (min(own), max(own) + 1), (where, key, start, stop)
            # the AEP compile gathered the fp8 shards as loaded: the same arithmetic as the whole eager model
            assert facts["blocks"] and all(q.startswith("fp8") for q in facts["blocks"]), facts["blocks"]
            assert not facts["skipped"], facts["skipped"]
            assert facts["released_bytes"] == 0  # nothing full was ever there to release
            assert facts["equal"], (where, facts["error"])


def test_a_scale_missing_from_one_ranks_slice_fails_every_rank_naming_it(fp8_dirs, tmp_path):
    key = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"  # expert 5: rank 1's
    bad = tmp_path / "noscale"
    bad.mkdir()
    tensors = load_file(str(fp8_dirs / "per_expert" / "model.safetensors"))
    del tensors[key]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((fp8_dirs / "per_expert" / "config.json").read_text())
    errors = spawn(fp8_load_error_worker, W, str(bad), group_timeout_s=60)
    for err in errors:
        assert err.startswith(f"CheckpointError: loading {bad} failed on rank 1 of 2"), err
        assert f"{key} is missing (the block scales of an fp8 weight)" in err, err


def test_torchrun_score_parallel_aep_on_an_fp8_checkpoint_equals_the_single_process_score(fp8_dirs, tmp_path):
    path = fp8_dirs / "per_expert"
    requests = [{"id": f"r{i}", "tokens": [3 + i, 9, 17 + i] * (2 + i % 3), "labels": [5, 6]} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    common = ["--model", str(path), "--input", str(tmp_path / "in.jsonl"), "--dtype", "float32",
              "--block-size", "8", "--token-budget", "64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moe_compile.cli", "score", *common, "--output", str(tmp_path / "aep.jsonl"),
           "--parallel", "aep", "--chunk", "3", "--dist-timeout", "120"]  # fmt: skip
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank kept half of the fp8 experts (weights and scales) the checkpoint holds
    stored = load_file(str(path / "model.safetensors"))
    half = sum(t.nbytes for k, t in stored.items() if ".experts." in k) // 2
    assert f"experts {half / 2**20:.2f} MiB" in done.stdout, done.stdout[-2000:]
    assert run_cli(["score", *common, "--output", str(tmp_path / "one.jsonl")]) == 0
    aep, one = ({r["id"]: r for r in map(json.loads, (tmp_path / f).read_text().splitlines())} for f in
                ("aep.jsonl", "one.jsonl"))  # fmt: skip
    assert sorted(aep) == sorted(one) == sorted(r["id"] for r in requests)
    assert {aep[r["id"]]["rank"] for r in requests} == {0, 1}  # both ranks scored
    for r in requests:
        got, want = torch.tensor(aep[r["id"]]["logprobs"]), torch.tensor(one[r["id"]]["logprobs"])
        assert (got - want).abs().max().item() < 1e-4, (r["id"], got, want)
