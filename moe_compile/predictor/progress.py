"""Progress bars: tqdm (installed with transformers) on stderr, or nothing when disabled."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar labelled ``desc`` (or ``items`` itself when not ``enabled``)."""
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True) if enabled else items
