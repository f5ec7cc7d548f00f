"""JSON-lines input and output of ``moe-compile score``, and resuming an interrupted run.

Input: one request object per line (see :mod:`~moe_compile.serving.requests`); blank
lines are ignored. A line that is not a request (bad JSON, wrong types, no id, an id seen
before) is *malformed*: :func:`read_requests` yields it with its line number and reason.

Output: one object per line, ``{"id": ..., "<output>": [...], ...}`` or
``{"id": ..., "error": "..."}``. A run that is interrupted leaves whole lines plus perhaps
one partial line; :class:`ScoresOutput` refuses a file that is not such an output (the
input, a notes file) and one another run is writing, drops the partial line and gives the
ids already answered, so a rerun scores only the rest.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .requests import JSON_KEYS, MalformedRequest, Request, Score


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


class OutputError(ValueError):
    """An output file that ``moe-compile score`` must not write: the message says why and what to do."""


#: keys of every success record, besides the id and one of JSON_KEYS' values
_RECORD_KEYS = frozenset({"read", "tokens", "cached_tokens", "rank"})
#: how every record line starts (``json.dumps`` of a score's dict: the id first)
_RECORD_START = b'{"id": '


def is_record(obj: Any) -> bool:
    """Whether ``obj`` (one decoded output line) is a record that ``moe-compile score`` writes."""
    if not isinstance(obj, dict) or "id" not in obj:
        return False
    if set(obj) == {"id", "error"} or set(obj) == {"id", "custom_id", "response", "error"}:  # native; OpenAI batch
        return True
    return set(obj) >= _RECORD_KEYS and any(key in obj for key in JSON_KEYS.values())


class ScoresOutput:
    """The output file of one ``moe-compile score`` run, locked while the run writes it.

    Opening checks, before anything is written or cut: the directory exists; the file is not
    the input (same file, also through a link or another path); it is absent, empty, or a
    scores file of this tool (every whole line a record :func:`is_record`); no other run holds
    it (``fcntl.flock``, non-blocking: a second run on the same output stops at once). A
    partial last line (an interrupted write: it starts like a record but is cut or does not
    parse) is cut, so its request is scored again. Each failure raises :class:`OutputError`.

    ``done``: the ids already answered (an OpenAI batch output line's ``custom_id``); :meth:`append`
    adds records durably.
    """

    def __init__(self, path: str | Path, input_path: str | Path | None = None) -> None:
        self.path = p = Path(path)
        if not p.parent.is_dir():
            raise OutputError(f"{path}: the directory {str(p.parent)!r} does not exist; create it first")
        if p.exists() and not p.is_file():
            raise OutputError(f"{path} is not a regular file")
        if input_path is not None and p.exists() and os.path.samefile(p, input_path):
            raise OutputError(f"{path} is the input file; the scores need a file of their own")
        self._file = open(p, "a+b")  # noqa: SIM115  (held open, and locked, until close())
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OutputError(
                f"another run is writing {path} (it holds the file's lock); wait for it to finish or give "
                "another --output"
            ) from None
        try:
            self.done = self._read_done()
        except BaseException:
            self.close()
            raise

    def _read_done(self) -> set[Any]:
        f = self._file
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
        lines = data[:keep].splitlines()
        ids = set()
        for number, line in enumerate(lines, start=1):
            obj = decode_json(line)
            if isinstance(obj, Decoded) and is_record(obj.value):
                ids.add(obj.value.get("custom_id", obj.value["id"]))  # a batch line is done by its custom_id
            elif number == len(lines) and line.startswith(_RECORD_START):
                keep -= len(line) + 1  # a garbled last line of an interrupted write: cut it too
            else:
                raise self._not_scores(number)
        tail = data[keep:]
        if tail and not (tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail)):
            raise self._not_scores(len(lines) + 1)
        if keep < len(data):
            f.truncate(keep)
        return ids

    def _not_scores(self, number: int) -> OutputError:
        return OutputError(
            f"{self.path} is not a scores file of moe-compile score (line {number} is not one of its records); "
            "it is left as it is: give a new or an earlier scores file as --output"
        )

    def append(self, scores: Iterable[Score]) -> None:
        """Append one JSON line per score and make it durable before returning."""
        self._file.writelines((json.dumps(score.to_json()) + "\n").encode() for score in scores)
        self._file.flush()
        os.fsync(self._file.fileno())

    def append_lines(self, lines: Iterable[dict[str, Any]]) -> None:
        """Append JSON lines (OpenAI batch output lines) and make them durable before returning."""
        self._file.writelines((json.dumps(line) + "\n").encode() for line in lines)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Release the lock and close the file."""
        self._file.close()
