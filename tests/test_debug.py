"""Debug output: structured-trace artifacts and graph pictures."""

import importlib.util
import shutil
import subprocess
import sys

import pytest

SCRIPT = """
import torch, moe_compile
from moe_compile.testing import zoo
model = zoo.build("qwen3_moe", num_layers=1)
with torch.no_grad():
    options = {"debug": True, "debug_dir": sys_argv_dir}
    torch.compile(model, backend="moe_prefill", options=options)(zoo.make_inputs(model))
"""


def test_structured_trace_carries_the_pass_graphs(tmp_path):
    trace = tmp_path / "trace"
    code = SCRIPT.replace("sys_argv_dir", repr(str(tmp_path / "dbg")))
    env = {"TORCH_TRACE": str(trace), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = "".join(p.read_text() for p in trace.iterdir())
    for stem in ("00_detect_moe.before", "01_canonicalize_moe.after", "02_lower_triton.after"):
        assert f"moe_compile_graph_0_{stem}" in logs
    assert "torch.ops.moe_compile.moe.default" in logs


@pytest.mark.skipif(
    importlib.util.find_spec("pydot") is None or shutil.which("dot") is None,
    reason="graph pictures need pydot and Graphviz",
)
def test_pictures_when_graphviz_is_installed(tmp_path):
    code = SCRIPT.replace("sys_argv_dir", repr(str(tmp_path)))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    (graph_dir,) = tmp_path.iterdir()
    assert (graph_dir / "01_canonicalize_moe.after.svg").read_text().startswith("<?xml")
