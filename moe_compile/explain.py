"""``moe_compile.explain``: compile a model with the backend and say what was done."""

from __future__ import annotations

from typing import Any

import torch

from .backend import collect_reports, compile_graph, register_root
from .options import Options
from .report import Report


def explain(model: torch.nn.Module, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile ``model`` with ``moe_prefill``, run it once on the inputs, return the report.

    ``report.blocks`` has one entry per MoE block rewritten, ``report.skipped``
    the candidates left alone with the reason; ``print(report)`` shows a table.
    """
    opts = Options.from_user(options)

    def backend(gm, example_inputs, **kw):  # a fresh backend object: Dynamo compiles anew for it
        return compile_graph(gm, example_inputs, opts)

    register_root(model)  # block paths read as model's module paths, also after graph breaks
    with collect_reports() as report, torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    if report.graphs > 1:
        report.notes.append(
            f"the model compiled into {report.graphs} graphs (graph breaks); "
            "if MoE blocks are missing, try moe_compile.prepare(model) first"
        )
    return report
