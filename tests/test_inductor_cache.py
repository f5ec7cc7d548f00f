"""Inductor's caches serve the moe_prefill passes across processes; the report survives a cache hit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_compile
from moe_compile import inductor_cache

SCRIPT = """
import json, sys, torch
import moe_compile
from moe_compile.testing import zoo
from torch._dynamo.utils import counters

options = json.loads(sys.argv[1])
torch.manual_seed(0)
model = zoo.build("qwen3_moe", num_layers=2)
ids = zoo.make_inputs(model, seq=5)
compiled = torch.compile(model, backend="moe_prefill", options={"inductor": True, **options})
with torch.no_grad():
    expected = model(ids).logits  # before compiling: offload releases the model's experts
with torch.no_grad(), moe_compile.backend.collect_reports() as report:
    got = compiled(ids).logits
print(json.dumps({
    "err": float((got - expected).abs().max() / expected.abs().max()),
    "blocks": [[b.path, b.implementation, b.rewrites, b.activation] for b in report.blocks],
    "notes": report.notes,
    "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
    "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
    "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
    "fx_bypass": counters["inductor"]["fxgraph_cache_bypass"],
    "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
}))
"""


def _run(cache_dir, options):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(options)], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three processes, two Inductor compiles
def test_second_process_hits_the_cache_and_reports_the_same_blocks(tmp_path):
    first = _run(tmp_path, {})
    assert first["err"] < 1e-5 and len(first["blocks"]) == 2
    assert first["fx_hit"] == first["aot_hit"] == 0 and first["fx_miss"] >= 1
    second = _run(tmp_path, {})
    assert second["err"] < 1e-5
    assert second["fx_hit"] + second["aot_hit"] >= 1 and second["fx_miss"] == 0, second
    assert second["blocks"] == first["blocks"]  # the report, rebuilt from the file beside the cache entry
    assert any("served by Inductor's cache" in n for n in second["notes"]), second["notes"]
    other = _run(tmp_path, {"kernels": "torch"})  # an option that changes the passes' identity: a miss
    assert other["fx_hit"] == other["aot_hit"] == 0 and other["fx_miss"] >= 1, other
    assert other["err"] < 1e-5 and other["blocks"] == first["blocks"]


@pytest.mark.slow  # one Inductor compile
def test_offload_is_never_cached(tmp_path):
    """The graph calls an expert store by handle: a cached graph would not recreate the store."""
    got = _run(tmp_path, {"offload": "cpu"})
    assert got["err"] < 1e-5 and got["fx_bypass"] >= 1 and got["aot_bypass"] >= 1, got
    assert got["fx_hit"] == got["aot_hit"] == 0


def test_pass_identity_follows_the_options_and_the_sources(monkeypatch):
    base = moe_compile.Options.from_user({})
    uuid = inductor_cache.pass_uuid(base)
    assert uuid is not None and uuid == inductor_cache.pass_uuid(moe_compile.Options.from_user({}))  # stable
    assert inductor_cache.pass_uuid(moe_compile.Options.from_user({"kernels": "torch"})) != uuid
    assert inductor_cache.pass_uuid(moe_compile.Options.from_user({"debug_dir": "elsewhere"})) == uuid
    for state in ({"offload": "cpu"}, {"parallel": "aep"}, {"debug": True}):  # runtime state: never cached
        assert inductor_cache.pass_uuid(moe_compile.Options.from_user(state)) is None
    monkeypatch.setattr(inductor_cache, "source_hash", lambda: "another source")
    assert inductor_cache.pass_uuid(base) != uuid


def test_the_key_covers_the_sources_the_passes_and_the_backend_import(tmp_path):
    """Derived from the import graph: a pass, the op's maths or a kernel changes the key; the HTTP server does not."""
    import shutil

    root = tmp_path / "moe_compile"
    shutil.copytree(Path(moe_compile.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    files = {p.relative_to(root).as_posix() for p in inductor_cache.source_files(root)}
    assert {"passes/canonicalize_moe.py", "backend.py", "moe_math.py", "kernels/grouped_gemm.py", "spec.py"} <= files
    assert {"serving/http.py", "serving/engine.py", "cli.py", "predictor/cli.py", "testing/zoo/families.py"}.isdisjoint(
        files
    )
    key = inductor_cache.hash_sources(root)
    assert key == inductor_cache.hash_sources(root)  # stable
    (root / "serving" / "http.py").write_text((root / "serving" / "http.py").read_text() + "\n# an edit\n")
    assert inductor_cache.hash_sources(root) == key
    for edited in ("passes/lower_triton.py", "moe_math.py", "kernels/grouped_gemm.py"):
        path = root / edited
        path.write_text(path.read_text() + "\n# an edit\n")
        assert inductor_cache.hash_sources(root) != key, edited
        key = inductor_cache.hash_sources(root)


def test_report_round_trips_beside_the_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    report = moe_compile.Report(
        blocks=[moe_compile.BlockReport("model.layers.0.mlp", 8, 2, 32, 16, "SiLU-gated", "fused", "softmax", False)],
        skipped=[moe_compile.Skipped("model.layers.1.mlp", "why")],
        notes=["a note"],
    )
    inductor_cache.save_report("k", report)
    back = inductor_cache.load_report("k", "graph_7")
    assert back.blocks == report.blocks and back.skipped == report.skipped and back.notes[0] == "a note"
    assert "graph_7: served by Inductor's cache" in back.notes[-1]
    missing = inductor_cache.load_report("other", "graph_8")
    assert missing.blocks == [] and "report was not found" in missing.notes[0]


def test_a_pass_harness_is_never_served_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from moe_compile import backend
    from moe_compile.testing.pass_harness import PassHarness

    uuids = []
    original = backend._InductorPostGradHook.__init__

    def recording(self, run, uuid):
        uuids.append(uuid)
        original(self, run, uuid)

    monkeypatch.setattr(backend._InductorPostGradHook, "__init__", recording)
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda gm, inputs, config_patches: gm)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    backend.compile_graph(gm, [torch.randn(1, 2)], moe_compile.Options.from_user({"inductor": True}))
    backend.compile_graph(
        gm, [torch.randn(1, 2)], moe_compile.Options.from_user({"inductor": True}), pipeline=PassHarness()._pipeline
    )
    assert uuids[0] is not None and uuids[1] is None
