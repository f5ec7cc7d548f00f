"""The package's structure: its import graph is acyclic and layered, and no file grows past 700 lines.

The import graph (:mod:`moe_compile.import_graph`) counts every import: at the top of a module, inside a
function (lazy) and under ``if TYPE_CHECKING:``. A module may import modules of its own layer or of a lower
one, never of a higher one. The layers are :data:`LAYERS`, bottom first; docs/architecture.md draws them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_compile import import_graph

#: (layer, the module prefixes in it), bottom first; a module belongs to its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the op's semantics and the small value types every layer uses; they import nothing of the package
    ("spec & maths", ("spec", "moe_math", "verify", "import_graph", "options", "report", "graph", "file_format",
                      "planner", "quant")),  # quant: fp8's format and W8A8 arithmetic (quant.fp8)
    ("kernels", ("kernels",)),  # Triton: they import the maths, never the ops
    ("runtime", ("runtime", "predictor", "reference", "routing_stats")),  # what the ops call at run time
    ("ops", ("ops",)),  # the custom ops: names, schemas, fakes, dispatch
    ("passes", ("passes", "debug")),
    ("backend", ("backend", "inductor_cache", "explain", "testing.pass_harness")),
    ("api", ("prepare", "", "quant.prepare_fp8", "quant.loading")),  # "": the package itself (``import moe_compile``)
    ("serving", ("serving",)),
    ("testing", ("testing",)),
    ("cli", ("cli", "serving.cli", "predictor.cli")),
]  # fmt: skip
PACKAGE = import_graph.PACKAGE
MAX_LINES = 700


def layer_of(module: str) -> int:
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = rel == prefix or rel.startswith(prefix + ".") or prefix == ""
            if matches and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a higher layer by a lower one, with both layers named."""
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if layer_of(b) > layer_of(a):
                found.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    return found


def test_the_import_graph_is_acyclic():
    graph = import_graph.imports()
    cycle = import_graph.find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    assert backward_imports(import_graph.imports()) == []


def test_the_checks_see_lazy_and_type_checking_imports(tmp_path):
    """On a small package: a cycle through a lazy import, and a backward import under TYPE_CHECKING, are found."""
    pkg = tmp_path / PACKAGE
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "spec.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .kernels import k\n")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "k.py").write_text("def f():\n    from ..ops import g\n")
    (pkg / "ops.py").write_text("from .kernels import k\n")
    graph = import_graph.imports(pkg, PACKAGE)
    assert graph[f"{PACKAGE}.spec"] == {f"{PACKAGE}.kernels", f"{PACKAGE}.kernels.k"}
    cycle = import_graph.find_cycle(graph)
    assert cycle is not None and {f"{PACKAGE}.ops", f"{PACKAGE}.kernels.k"} <= set(cycle), cycle
    assert any(line.startswith(f"{PACKAGE}.spec (spec & maths) imports {PACKAGE}.kernels") for line in
               backward_imports(graph)), backward_imports(graph)  # fmt: skip
    assert f"{PACKAGE}.kernels.k (kernels) imports {PACKAGE}.ops (ops)" in backward_imports(graph)


@pytest.mark.parametrize(
    "path", sorted(import_graph.ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(import_graph.ROOT))
)
def test_no_file_exceeds_700_lines(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(import_graph.ROOT)} has {lines} lines: split it by concept"
