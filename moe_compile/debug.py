"""Debug dumps: every graph before and after every pass, a picture, a summary.

Turned on by ``options={"debug": True}`` or ``MOE_COMPILE_DEBUG=1``. Layout::

    <debug_dir>/<graph>/00_detect_moe.before.py     readable code of the graph
    <debug_dir>/<graph>/00_detect_moe.after.py
    <debug_dir>/<graph>/00_detect_moe.after.svg     when pydot and Graphviz are installed
    ...
    <debug_dir>/<graph>/summary.md                  pass times, op counts, the report

The same graphs go to PyTorch's structured trace (``TORCH_TRACE=dir``), so
``tlparse`` shows them next to Dynamo's and Inductor's artifacts.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch.fx as fx
from torch._logging import trace_structured

from .graph import op_name

log = logging.getLogger(__name__)


class GraphDumper:
    def __init__(self, root: str, graph_name: str):
        self.dir = Path(root) / graph_name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.graph_name = graph_name
        self.index = 0
        self.rows: list[str] = []
        self._picture_ok = True

    def before(self, gm: fx.GraphModule, pass_name: str) -> None:
        self._write(gm, f"{self.index:02d}_{pass_name}.before")

    def dump(self, gm: fx.GraphModule, pass_name: str, changed: bool, seconds: float) -> None:
        stem = f"{self.index:02d}_{pass_name}.after"
        self._write(gm, stem)
        self._picture(gm, stem)
        self.rows.append(f"| {self.index} | {pass_name} | {'yes' if changed else 'no'} | {seconds * 1e3:.1f} |")
        self.index += 1

    def summary(self, gm: fx.GraphModule, report: object) -> Path:
        counts = collections.Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")
        lines = [
            f"# moe_compile debug summary: {self.graph_name}",
            "",
            "| # | pass | changed | ms |",
            "|---|---|---|---|",
            *self.rows,
            "",
            "## ops in the final graph",
            "",
            *(f"- {name}: {n}" for name, n in counts.most_common()),
            "",
            "## report",
            "",
            "```",
            str(report),
            "```",
        ]
        path = self.dir / "summary.md"
        path.write_text("\n".join(lines) + "\n")
        log.info("moe_compile debug output in %s", self.dir)
        return path

    def _write(self, gm: fx.GraphModule, stem: str) -> None:
        code = gm.print_readable(print_output=False, include_stride=False, include_device=True)
        (self.dir / f"{stem}.py").write_text(code)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"moe_compile_{self.graph_name}_{stem}", "encoding": "string"},
            payload_fn=lambda: code,
        )

    def _picture(self, gm: fx.GraphModule, stem: str) -> None:
        if not self._picture_ok:
            return
        try:
            from torch.fx.passes.graph_drawer import FxGraphDrawer

            dot = FxGraphDrawer(gm, stem).get_dot_graph()
            (self.dir / f"{stem}.svg").write_bytes(dot.create_svg())
        except Exception as exc:  # pydot or Graphviz missing: pictures are optional
            log.info("moe_compile: no graph pictures (%s)", exc)
            self._picture_ok = False
