"""benchmarks/serving_http.py --smoke: a real ``moe-compile serve`` on loopback, 1 and 8 concurrent clients:
every call answered once, scores equal one at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # a server process and a few hundred HTTP calls

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_http_benchmark_smoke_loses_nothing_and_scores_equal(tmp_path):
    pytest.importorskip("fastapi")
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serving_http.py"), "--smoke", "--no-compile", "--json", str(out)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | level | req/s |" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["level"] for r in rows] == ["one at a time", "1 clients", "8 clients"]
    for r in rows:
        assert r["calls"] == 32 and r["lost"] == 0 and r["non_200"] == 0 and r["duplicated"] == 0, r
        assert r["max_rel_err"] < 1e-5 and r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0, r
