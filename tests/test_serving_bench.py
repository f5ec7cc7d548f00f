"""benchmarks/serving.py --smoke: replicas, aep and ep on 2 gloo ranks give the same scores; its output's structure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ranks,
]  # two spawned ranks, three compiles: minutes on a loaded 2-core machine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_serving_benchmark_smoke_modes_agree(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--json", str(out)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| shared prefix | mode | req/s |" in done.stdout and "aep vs replicas" in done.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    expected = [(m, s) for m in ("replicas", "aep", "ep") for s in (0, 0.5, 0.9)]
    assert [(r["mode"], r["shared"]) for r in rows] == expected
    n = result["args"]["requests"]
    full = rows[0]["expert_bytes"][0]  # replicas: every rank holds every expert
    for r in rows:
        assert sum(r["requests"]) == n and len(r["requests"]) == 2 and r["rps"] > 0 and r["tps"] > 0, r
        assert len(r["engines"]) == 2 and sum(e["requests"] for e in r["engines"]) == n, r
        if r["mode"] == "replicas":
            assert r["expert_bytes"] == [full, full] and full > 0, r
        else:  # 1/W of the experts per rank
            assert r["expert_bytes"] == [full / 2, full / 2], r
    hits = {r["shared"]: r["hit"] for r in rows if r["mode"] == "replicas"}
    assert hits[0] == 0 and hits[0.9] > hits[0.5] > 0, hits  # shared prefixes are found in the cache
    for entry in result["agreement"]:  # exactness: all modes compute the same scores (and equal HF eager)
        assert max(entry["between_modes"].values()) < 1e-5, entry
        assert max(entry["vs_hf"].values()) < 1e-5, entry
