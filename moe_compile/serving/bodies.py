"""Request bodies of the HTTP front end: the native ``{"requests": [...]}`` body, split per object, and helpers.

:func:`parse_call` splits a ``POST /score`` body into its request objects before any is
decoded, so one object that is not UTF-8, not JSON, nested too deep, holds a lone
surrogate or is not a request is an error of that object alone (:func:`check_call`);
only a body that is not ``{"requests": [...]}`` at all is a :class:`BadCall` (HTTP 400).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .jsonl import Decoded, Malformed, decode_json
from .requests import MalformedRequest, Request


class BadCall(ValueError):
    """A body that is not ``{"requests": [...]}`` at all (HTTP 400); the message says where."""


def parse_call(body: bytes) -> list[Decoded | Malformed]:
    """The request objects of a ``POST /score`` body: each decoded, or a :class:`Malformed` with the reason.

    The body is split into its request objects before any is decoded, so one object that is
    not UTF-8, not JSON, or nested too deep for the parser is an error of that object alone.
    """
    text = body.decode("utf-8", "surrogateescape")  # undecodable bytes -> U+DC80..U+DCFF, caught per object
    try:
        whole = None if _ESCAPED.search(text) else json.loads(text)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("requests"), list):
        return [Decoded(obj) for obj in whole["requests"]]  # the common case: the whole body parses
    return [decode_json(segment) for segment in _split(text)]


_ESCAPED = re.compile("[\\udc80-\\udcff]")
_WS = re.compile(r"\s*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SPECIAL = re.compile(r'["\[\]{}]')
_SCALAR_END = re.compile(r"[\s,\]}]")


def _split(text: str) -> list[str]:
    """The source text of each element of the body's ``"requests"`` array (no element is decoded here)."""
    i = _WS.match(text, 0).end()
    if text[i : i + 1] != "{":
        raise BadCall('the body must be a JSON object {"requests": [...]}')
    i = _WS.match(text, i + 1).end()
    segments = None
    while text[i : i + 1] != "}":
        end = _value_end(text, i)
        key = decode_json(text[i:end])
        if not (text[i : i + 1] == '"' and not isinstance(key, Malformed) and isinstance(key.value, str)):
            raise BadCall(f"expected a key at character {i}")
        i = _expect(text, _WS.match(text, end).end(), ":")
        if key.value == "requests":
            if text[i : i + 1] != "[":
                raise BadCall(f"'requests' must be a list of request objects (character {i})")
            segments, i = [], _WS.match(text, i + 1).end()
            while text[i : i + 1] != "]":
                end = _value_end(text, i)
                segments.append(text[i:end])
                i = _WS.match(text, end).end()
                if text[i : i + 1] == ",":
                    i = _WS.match(text, i + 1).end()
                elif text[i : i + 1] != "]":
                    raise BadCall(f"expected ',' or ']' at character {i}")
            i += 1
        else:
            i = _value_end(text, i)
        i = _WS.match(text, i).end()
        if text[i : i + 1] == ",":
            i = _WS.match(text, i + 1).end()
        elif text[i : i + 1] != "}":
            raise BadCall(f"expected ',' or '}}' at character {i}")
    if text[_WS.match(text, i + 1).end() :]:
        raise BadCall(f"extra data after the object (character {i + 1})")
    if segments is None:
        raise BadCall('the body has no "requests" list')
    return segments


def _expect(text: str, i: int, char: str) -> int:
    if text[i : i + 1] != char:
        raise BadCall(f"expected {char!r} at character {i}")
    return _WS.match(text, i + 1).end()


def _value_end(text: str, i: int) -> int:
    """Where the JSON value starting at ``text[i]`` ends: strings and brackets matched, nothing decoded."""
    c = text[i : i + 1]
    if c == '"':
        m = _STRING.match(text, i)
        if m is None:
            raise BadCall(f"unterminated string at character {i}")
        return m.end()
    if c in ("[", "{"):
        depth, j = 0, i
        while True:
            m = _SPECIAL.search(text, j)
            if m is None:
                raise BadCall(f"unclosed bracket at character {i}")
            if m.group() == '"':
                s = _STRING.match(text, m.start())
                if s is None:
                    raise BadCall(f"unterminated string at character {m.start()}")
                j = s.end()
                continue
            depth += 1 if m.group() in "[{" else -1
            j = m.end()
            if depth == 0:
                return j
    m = _SCALAR_END.search(text, i)
    end = m.start() if m else len(text)
    if end == i:
        raise BadCall(f"expected a value at character {i}")
    return end


def check_call(objects: list[Decoded | Malformed]) -> tuple[list[dict[str, Any] | None], list[tuple[int, Request]]]:
    """Error records (None where the object is a request) and the valid requests with their indices.

    An object is an error when it is malformed (:func:`parse_call`, :meth:`Request.from_json`) or
    repeats the id of an earlier request of the call.
    """
    records: list[dict[str, Any] | None] = [None] * len(objects)
    valid: list[tuple[int, Request]] = []
    first: dict[Any, int] = {}
    for i, obj in enumerate(objects):
        if isinstance(obj, Malformed):
            records[i] = {"id": None, "error": f"malformed request: {obj.reason}"}
            continue
        obj = obj.value
        try:
            request = Request.from_json(obj)
        except MalformedRequest as e:
            rid = obj.get("id") if isinstance(obj, dict) else None
            records[i] = {"id": rid if _plain_id(rid) else None, "error": f"malformed request: {e}"}
            continue
        if request.id in first:
            error = f"malformed request: duplicate id {request.id!r} (first at index {first[request.id]})"
            records[i] = {"id": request.id, "error": error}
            continue
        first[request.id] = i
        valid.append((i, request))
    return records, valid


def _plain_id(rid: Any) -> bool:
    """Whether ``rid`` can be echoed as the id of an error record."""
    if isinstance(rid, str):
        return not re.search("[\\ud800-\\udfff]", rid)
    return isinstance(rid, int) and not isinstance(rid, bool)


def decode_body(body: bytes) -> dict[str, Any]:
    """A JSON object body, or :class:`BadCall` saying why not."""
    decoded = decode_json(body.decode("utf-8", "surrogateescape"))
    if isinstance(decoded, Malformed):
        raise BadCall(decoded.reason)
    if not isinstance(decoded.value, dict):
        raise BadCall(f"the body must be a JSON object, not {type(decoded.value).__name__}")
    return decoded.value


def check_keys(body: dict[str, Any], known: frozenset, required: Sequence[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadCall(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    missing = [k for k in required if k not in body]
    if missing:
        raise BadCall(f"missing key(s) {', '.join(map(repr, missing))}")


def text_value(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadCall(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise BadCall(f"{what} is empty")
    return value
