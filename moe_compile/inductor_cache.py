"""The passes' identity for Inductor's caches, and the report kept beside a cache entry.

Inductor's FX graph cache (and AOTAutograd's cache, which requires it) key a compiled graph on the
graph before the post-grad passes, the Inductor config and each custom pass's ``uuid()``
(:class:`torch._inductor.custom_graph_pass.CustomGraphPass`; a pass whose ``uuid()`` is None
bypasses the cache). The ``moe_prefill`` passes run as Inductor's post-grad custom pre-pass, so
their ``uuid`` (:func:`pass_uuid`) is a hash of

- the source of every module the compiled graph and its report depend on: the passes, the backend and
  this module, and every module of the package they import, directly or not, lazily or not
  (:func:`source_files`, from :mod:`moe_compile.import_graph`: the ops they emit, the kernels, the
  runtime those ops call, the spec encoding...; any change to one of them is a new identity, as vLLM's
  ``InductorPass.hash_source`` and PyTorch's ``get_hash_for_files`` do, while an edit to, say, the
  HTTP server or the predictor's command line leaves the cache valid), and
- the options that change the rewritten graph (every option but ``debug`` / ``debug_dir``).

No identity (no caching) when the passes leave runtime state that a cached graph would not
recreate: ``offload`` and ``predictor`` (expert stores, referenced by handle from the graph),
``parallel`` (shards kept as constants, the world-size check wrapped around the compiled callable),
``debug`` (the dumps are written by the passes), and a pipeline other than the default
(:class:`moe_compile.testing.pass_harness.PassHarness` records the graphs as the passes run).

On a cache hit the passes do not run, so the report is stored beside the cache entry: a JSON file
under ``<TORCHINDUCTOR_CACHE_DIR>/moe_compile_reports/``, keyed by :func:`report_key` (the pass
identity, Dynamo's graph code, which names the module paths, and the inputs' shapes, strides and
dtypes). The backend writes it after the passes ran and reads it when they did not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import import_graph
from .options import Options
from .report import BlockReport, Report, Skipped

__all__ = ["load_report", "pass_uuid", "report_key", "save_report", "source_files", "source_hash"]

#: the modules whose import closure decides the compiled graph (the passes, the backend) and its stored report
KEY_ROOTS = ("passes", "backend", "inductor_cache")

#: options that do not change the rewritten graph
_NOT_IN_KEY = ("debug", "debug_dir")


def source_files(root: Path = import_graph.ROOT) -> list[Path]:
    """The package's sources in the key: :data:`KEY_ROOTS` and everything they import (in path order)."""
    package = import_graph.PACKAGE
    graph = import_graph.imports(root, package)
    needed = import_graph.closure(graph, [f"{package}.{name}" for name in KEY_ROOTS])
    files = import_graph.modules(root, package)
    return sorted(files[name] for name in needed)


def hash_sources(root: Path = import_graph.ROOT) -> str:
    """sha256 of :func:`source_files` of the package at ``root`` (paths relative to it, and contents)."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def source_hash() -> str:
    """:func:`hash_sources` of the installed package (computed once per process)."""
    return hash_sources()


def pass_uuid(options: Options) -> str | None:
    """The passes' identity under ``options`` (see the module docstring); None where nothing may be cached."""
    if options.offload is not None or options.parallel is not None or options.predictor is not None or options.debug:
        return None
    fields = {f.name: repr(getattr(options, f.name)) for f in dataclasses.fields(options) if f.name not in _NOT_IN_KEY}
    digest = hashlib.sha256(source_hash().encode())
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return f"moe_compile-{digest.hexdigest()}"


def report_key(uuid: str, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> str:
    """The key of the report of Dynamo's graph ``gm`` compiled with the passes ``uuid``."""
    digest = hashlib.sha256(uuid.encode())
    digest.update(gm.code.encode())
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            digest.update(f"{tuple(value.shape)}|{value.stride()}|{value.dtype}|{value.device.type}".encode())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "moe_compile_reports"


def save_report(key: str, report: Report) -> None:
    """Store ``report`` beside the cache entry (atomically: a concurrent reader sees the old file or the new)."""
    data = {
        "blocks": [dataclasses.asdict(b) for b in report.blocks],
        "skipped": [dataclasses.asdict(s) for s in report.skipped],
        "notes": list(report.notes),
        "pass_times": dict(report.pass_times),
        "released_bytes": report.released_bytes,
    }
    directory = _dir()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(directory / f"{key}.json")


def load_report(key: str, graph_name: str) -> Report:
    """The report stored beside the cache entry that served this compile, with a note saying so.

    Missing (the cache entry came from a graph with other module paths, or the file was removed):
    a report without blocks whose note says why.
    """
    path = _dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return Report(
            graphs=1,
            notes=[f"{graph_name}: served by Inductor's cache; its moe_compile report was not found ({path})"],
        )
    return Report(
        blocks=[BlockReport(**b) for b in data["blocks"]],
        skipped=[Skipped(**s) for s in data["skipped"]],
        graphs=1,
        notes=[*data["notes"], f"{graph_name}: served by Inductor's cache (passes not rerun; report from {path.name})"],
        pass_times=data["pass_times"],
        released_bytes=data["released_bytes"],
    )
