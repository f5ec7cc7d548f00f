"""JSON-lines input and output of ``moe-compile score``, and resuming an interrupted run.

Input: one request object per line (see :mod:`~moe_compile.serving.requests`); blank
lines are ignored. A line that is not a request (bad JSON, wrong types, no id, an id seen
before) is *malformed*: :func:`read_requests` yields it with its line number and reason.

Output: one object per line, ``{"id": ..., "<output>": [...], ...}`` or
``{"id": ..., "error": "..."}``. A run that is interrupted leaves whole lines plus perhaps
one partial line; :func:`done_ids` drops the partial line and returns the ids already
answered, so a rerun scores only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .requests import MalformedRequest, Request, Score


def read_requests(path: str | Path) -> Iterator[tuple[int, Request | str]]:
    """``(line_number, request or reason it is malformed)`` for each non-blank line of ``path``."""
    first_line: dict[Any, int] = {}
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one malformed line, not the end of the run
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj = decode_json(raw)
            if isinstance(obj, Malformed):
                yield number, obj.reason
                continue
            try:
                request = Request.from_json(obj.value)
            except MalformedRequest as e:
                yield number, str(e)
                continue
            if request.id in first_line:
                yield number, f"duplicate id {request.id!r} (first on line {first_line[request.id]})"
                continue
            first_line[request.id] = number
            yield number, request


@dataclasses.dataclass(frozen=True)
class Decoded:
    value: Any


@dataclasses.dataclass(frozen=True)
class Malformed:
    reason: str


def decode_json(raw: bytes | str) -> Decoded | Malformed:
    """One JSON value from ``raw`` (UTF-8 bytes, or text where undecodable bytes are surrogate escapes), or why not.

    Never raises for bad input: bytes that are not UTF-8, bad JSON, numbers too long to convert
    and nesting too deep for the parser are all reasons.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Malformed(f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
    else:
        bad = _ESCAPED_BYTE.search(raw)
        if bad:
            return Malformed(f"not UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1}")
    try:
        return Decoded(json.loads(raw))
    except json.JSONDecodeError as e:
        return Malformed(f"not JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return Malformed("nested too deeply")
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return Malformed(f"not JSON: {e}")


#: a byte that ``bytes.decode("utf-8", "surrogateescape")`` could not decode
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def done_ids(path: str | Path) -> set[Any]:
    """Ids already answered in the output file ``path`` (empty if there is none).

    A last line without its newline, or one that does not parse, is the trace of an
    interrupted write: it is cut off the file, so its request is scored again.
    """
    p = Path(path)
    if not p.exists():
        return set()
    data = p.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    ids = set()
    lines = data[:keep].splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not an output record; is this the right output file?") from None
            keep -= len(line) + 1  # a garbled last line: cut it too
    if keep < len(data):
        with open(p, "r+b") as f:
            f.truncate(keep)
    return ids


def append_scores(path: str | Path, scores: Iterable[Score]) -> None:
    """Append one JSON line per score and make it durable before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(score.to_json()) + "\n" for score in scores)
        f.flush()
        os.fsync(f.fileno())
