"""The sweep over every family, one worker process per family (:func:`run_coverage`), and its table."""

from __future__ import annotations

import logging
import multiprocessing
import traceback

import torch

from .families import family_entry, moe_families
from .family import HEADER, STATUSES, Row, check_family


def _worker_init() -> None:
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def _check_safely(model_type: str) -> Row:
    try:
        return check_family(model_type)
    except BaseException:  # noqa: BLE001  (a worker must always answer)
        return Row(model_type, "not-built", reason="crash: " + traceback.format_exc().splitlines()[-1][:150])


def unbuildable_row(model_type: str, entry: str | None) -> Row | None:
    """The row of a family that is not built at all, from its :func:`~.families.family_entry`; None if it builds."""
    if entry is None:
        return Row(model_type, "not-built", reason="not a MoE family of the installed transformers")
    if entry.startswith("!error"):
        return Row(model_type, "not-built", reason=entry[1:])
    return None


def check_one(model_type: str, keep: dict | None = None) -> Row:
    """One family's row in this process, as :func:`run_coverage` gives it (the per-family tests use it);
    ``keep`` as :func:`~.family.check_family`'s."""
    return unbuildable_row(model_type, family_entry(model_type)) or check_family(model_type, keep)


def run_coverage(
    families: list[str] | None = None, workers: int = 2, timeout: float = 300.0, progress=None
) -> list[Row]:
    """One :class:`Row` per MoE family (all of the installed transformers' by default), in name order.

    Families run in ``workers`` fresh processes (one torch thread each); a family that takes
    longer than ``timeout`` seconds is reported as not-built.
    """
    registry = moe_families()
    names = sorted(families if families is not None else registry)
    rows: dict[str, Row] = {}
    pending = []
    for name in names:
        row = unbuildable_row(name, registry.get(name))
        if row is not None:
            rows[name] = row
        else:
            pending.append(name)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=max(1, workers), initializer=_worker_init, maxtasksperchild=8) as pool:
        futures = {name: pool.apply_async(_check_safely, (name,)) for name in pending}
        deadline_per = timeout
        for name, future in futures.items():
            try:
                rows[name] = future.get(timeout=deadline_per)
            except multiprocessing.TimeoutError:
                rows[name] = Row(name, "not-built", reason=f"timed out after {timeout:.0f} s")
            if progress is not None:
                progress(rows[name])
        pool.terminate()
    return [rows[n] for n in names]


def summary(rows: list[Row]) -> str:
    """The sentence README.md carries: how many families, how many of each status."""
    import transformers

    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] and s != "exact"]
    return (
        f"Coverage on transformers {transformers.__version__}: {counts['exact']} of the {len(rows)} MoE families "
        f"detected and exact" + (f" ({', '.join(parts)}; see docs/coverage.md)" if parts else "") + "."
    )


def format_table(rows: list[Row], markdown: bool = False) -> str:
    cells = [r.cells() for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in cells]
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])
    from ...report import _table

    return _table(HEADER, cells)
