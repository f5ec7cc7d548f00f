"""No module or package that pytest puts on ``sys.path`` may shadow an installed distribution.

Under pytest, ``tests/`` (it has no ``__init__.py``: its conftest's folder is prepended) and the repository root
(``python -m pytest`` runs from it) are on ``sys.path``. A ``tests/kernels/`` package once answered to the name
``kernels`` there, and transformers 5.25, which imports Hugging Face's ``kernels``, failed to load in every
test. This test lists every top-level name those two folders provide and checks it against the top-level
import names of the installed distributions and of the standard library.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN_DISTRIBUTIONS = {"moe_compile", "moe-compile"}


def top_level_names(folder: Path) -> dict[str, Path]:
    """The names ``import NAME`` finds in ``folder``: modules (``NAME.py``) and regular packages."""
    names = {}
    for entry in folder.iterdir():
        if entry.suffix == ".py" and entry.is_file():
            names[entry.stem] = entry
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
    return names


def shadowed(names: dict[str, Path], root: Path = ROOT) -> list[str]:
    installed = importlib.metadata.packages_distributions()
    problems = []
    for name, path in sorted(names.items()):
        owners = set(installed.get(name, ())) - OWN_DISTRIBUTIONS
        if owners:
            problems.append(f"{path.relative_to(root)} shadows {name!r} of the installed {sorted(owners)}")
        elif name in sys.stdlib_module_names:
            problems.append(f"{path.relative_to(root)} shadows the standard library's {name!r}")
    return problems


def test_top_level_names_on_the_test_path_shadow_nothing_installed():
    names = {**top_level_names(ROOT), **top_level_names(ROOT / "tests")}
    assert "conftest" in names and "moe_compile" in names, "the scan missed the folders pytest puts on sys.path"
    problems = shadowed(names)
    assert not problems, "rename these (pytest puts their folders first on sys.path):\n" + "\n".join(problems)


def test_the_scan_catches_a_shadowing_package(tmp_path):
    """The check itself can fail: a folder holding a ``kernels`` package and a ``json`` module is caught."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "kernel_tests").mkdir()
    (tmp_path / "kernel_tests" / "__init__.py").write_text("")
    problems = shadowed(top_level_names(tmp_path), root=tmp_path)
    if "kernels" in importlib.metadata.packages_distributions():
        assert any("'kernels'" in p for p in problems), problems
    assert any("'json'" in p for p in problems), problems
    assert not any("kernel_tests" in p for p in problems), problems
