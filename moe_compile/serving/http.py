"""A small HTTP scoring endpoint (FastAPI), started by ``moe-compile serve --model DIR --port N``.

Needs the ``serve`` extra (``pip install "moe_compile[serve]"``: FastAPI and uvicorn).

- ``POST /score`` with ``{"requests": [{"id": ..., "tokens": [...], ...}, ...]}`` (the
  request objects of ``moe-compile score``, at most ``max_requests`` per call) answers
  ``{"scores": [...]}`` in the same order: one scored record or ``{"id", "error"}`` per
  request. The body is split into its request objects before any is decoded
  (:func:`parse_call`), so an object that is not UTF-8, not JSON, nested too deep, not a
  request, or that repeats an earlier id of the call gets an error record of its own and
  the others are scored; only a body that is not ``{"requests": [...]}`` is refused (400).
- ``GET /health`` answers ``{"status": "ok", ...}`` with the engine's counters once the
  engine is warm; while it compiles the graphs serving needs (:meth:`PrefillEngine.warmup`,
  run at startup) it answers 503 ``{"status": "warming up"}``, and 503 ``{"status":
  "failed", "error": ...}`` if that failed. Calls made while warming up wait for it.

One engine serves all connections: calls are scored one at a time (a lock), each as one
:meth:`~moe_compile.serving.PrefillEngine.score` call, so the requests of a call are
batched and share prefixes with each other and with earlier calls (the prefix cache).
"""

# no `from __future__ import annotations`: FastAPI must resolve the endpoint's annotations
import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from typing import Any

from .engine import PrefillEngine
from .jsonl import Decoded, Malformed, decode_json
from .requests import MalformedRequest, Request

#: most request objects in one POST /score
MAX_REQUESTS = 1024

logger = logging.getLogger(__name__)


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
            records[i] = {"id": request.id,
                          "error": f"malformed request: duplicate id {request.id!r} (first at index {first[request.id]})"}  # fmt: skip
            continue
        first[request.id] = i
        valid.append((i, request))
    return records, valid


def _plain_id(rid: Any) -> bool:
    """Whether ``rid`` can be echoed as the id of an error record."""
    if isinstance(rid, str):
        return not re.search("[\\ud800-\\udfff]", rid)
    return isinstance(rid, int) and not isinstance(rid, bool)


def create_app(engine: PrefillEngine, max_requests: int = MAX_REQUESTS, warmup: bool = True):
    """The FastAPI application serving ``engine``.

    ``warmup``: on startup, run :meth:`PrefillEngine.warmup` in a thread (compiling every graph
    serving needs); until it is done ``GET /health`` answers 503 ``{"status": "warming up"}``
    and ``POST /score`` calls wait for it; if it fails, both answer 503 with the error.
    """
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi import Request as HTTPRequest
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError as e:
        raise ImportError('the HTTP endpoint needs the serve extra: pip install "moe_compile[serve]"') from e

    lock = threading.Lock()
    state: dict[str, Any] = {"status": "warming up" if warmup else "ok", "error": None}

    def warm() -> None:
        start = time.perf_counter()
        try:
            with lock:
                engine.warmup()
        except Exception as e:  # noqa: BLE001  (reported by /health and /score, not raised into the server)
            state.update(status="failed", error=f"{type(e).__name__}: {e}")
            logger.error("warm-up failed: %s", state["error"])
            return
        state["status"] = "ok"
        logger.info("warm-up done in %.1f s: ready", time.perf_counter() - start)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if warmup:
            threading.Thread(target=warm, name="moe-compile-warmup", daemon=True).start()
        yield

    app = FastAPI(title="moe_compile prefill scoring", lifespan=lifespan)

    def score_objects(objects: list[Decoded | Malformed]) -> dict[str, Any]:  # runs in a worker thread
        records, valid = check_call(objects)
        with lock:  # waits for the warm-up
            if state["status"] == "failed":
                raise HTTPException(503, f"the engine's warm-up failed: {state['error']}")
            scores = engine.score([request for _, request in valid])
        for (i, _), s in zip(valid, scores):
            records[i] = s.to_json()
        return {"scores": records}

    @app.post("/score")
    async def score(call: HTTPRequest) -> dict[str, Any]:
        try:
            objects = parse_call(await call.body())
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None
        if len(objects) > max_requests:
            raise HTTPException(413, f"{len(objects)} requests in one call; at most {max_requests}")
        return await run_in_threadpool(score_objects, objects)

    @app.get("/health")
    def health():
        model = type(engine.model).__name__
        if state["status"] != "ok":
            body = {"status": state["status"], "model": model}
            if state["error"] is not None:
                body["error"] = state["error"]
            return JSONResponse(body, status_code=503)
        stats = dataclasses.asdict(engine.stats)
        return {"status": "ok", "model": model, "hit_rate": engine.stats.hit_rate, **stats}

    return app


def serve(engine: PrefillEngine, host: str, port: int, warmup: bool = True) -> None:
    """Serve ``engine`` on ``host:port`` until interrupted (``warmup``: see :func:`create_app`)."""
    app = create_app(engine, warmup=warmup)  # raises a clear ImportError without the serve extra
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
