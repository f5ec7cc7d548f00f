"""The import graph of a package, read from its sources (``ast``): every import, lazy and ``TYPE_CHECKING`` alike.

An edge ``a -> b`` means module ``a`` imports module ``b`` of the same package somewhere in its source: at the
top, inside a function (a lazy import) or under ``if TYPE_CHECKING:``. ``from .pkg import name`` is an edge to
``pkg`` (its ``__init__`` runs and provides ``name``) and, when ``name`` is a submodule, to ``pkg.name`` too;
``from .. import mod`` from inside the package is an edge to ``mod`` alone (the ancestor package is already
being imported). Two users: :func:`moe_compile.inductor_cache.source_hash` (the sources the compiled graph
depends on: the closure of the passes and the backend) and ``tests/test_architecture.py`` (acyclic, and
layered).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

__all__ = ["closure", "find_cycle", "imports", "modules"]

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT.name


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root`` (packages by their ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # ``import a.b.c`` runs a, a.b and a.b.c; the deepest of them in the package is what is used
                inside = [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known]
                out.update(inside[-1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base not in known:
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known.keys()
            out |= subs
            ancestor = name == base or name.startswith(base + ".")
            if not ancestor or len(subs) < len(node.names):  # a name the package's __init__ provides
                out.add(base)
    out.discard(name)
    return out


def imports(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (see the module docstring)."""
    known = modules(root, package)
    return {name: _edges(name, path, known) for name, path in known.items()}


def closure(graph: dict[str, set[str]], roots: Iterable[str]) -> set[str]:
    """``roots`` and every module they import, directly or not."""
    seen: set[str] = set()
    stack = [r for r in roots if r in graph]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph[name] - seen)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None
