"""Helpers of every section: a one-line error, and quiet model building."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


def short(err: BaseException, limit: int = 240) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())  # one line (validation errors span several)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet():
    """Silence transformers' config warnings and stray prints while building tiny models."""
    loggers = [logging.getLogger(n) for n in ("transformers", "torch._dynamo", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
