"""A small HTTP scoring endpoint (FastAPI), started by ``moe-compile serve --model DIR --port N``.

Needs the ``serve`` extra (``pip install "moe_compile[serve]"``: FastAPI and uvicorn).

- ``POST /score`` with ``{"requests": [{"id": ..., "tokens": [...], ...}, ...]}`` (the
  request objects of ``moe-compile score``, at most ``max_requests`` per call) answers
  ``{"scores": [...]}`` in the same order: one scored record or ``{"id", "error"}`` per
  request. The body is split into its request objects before any is decoded
  (:func:`parse_call`), so an object that is not UTF-8, not JSON, nested too deep, not a
  request, or that repeats an earlier id of the call gets an error record of its own and
  the others are scored; only a body that is not ``{"requests": [...]}`` is refused (400).
- ``POST /rerank``, ``/v1/rerank``, ``/v2/rerank`` (the Cohere/Jina shape, as vLLM serves it):
  ``{"model"?, "query", "documents": [str | {"text"}], "top_n"?, "return_documents"?}`` ->
  ``{"id", "model", "usage": {"total_tokens"}, "results": [{"index", "relevance_score",
  "document"?: {"text"}}]}``, the results sorted by relevance, highest first, at most ``top_n``
  (absent or 0: all). ``return_documents`` defaults to true.
- ``POST /v1/score`` (vLLM's score API): ``{"model"?, "text_1": str | [str], "text_2": str | [str]}``
  -> ``{"id", "object": "list", "created", "model", "data": [{"index", "object": "score",
  "score"}], "usage": {...}}``; a single ``text_1`` is paired with every ``text_2``, else the
  lists pair up one to one and must be equally long.

  Both read a relevance score in ``[0, 1]`` from the causal LM after a configurable template
  (:mod:`~moe_compile.serving.relevance`). A body in the wrong shape, a ``model`` that is not
  the served one, or a pair that cannot be scored (too long, ...) is answered 4xx with a
  ``detail`` message naming what is wrong; nothing of such a call is scored.
- ``GET /health`` answers ``{"status": "ok", ...}`` with the engine's counters once the
  engine is warm; while it compiles the graphs serving needs (:meth:`PrefillEngine.warmup`,
  run at startup) it answers 503 ``{"status": "warming up"}``, and 503 ``{"status":
  "failed", "error": ...}`` if that failed. Calls made while warming up wait for it.

One engine serves all connections through a batching queue (:mod:`~moe_compile.serving.queue`):
the requests of concurrent calls share the engine's steps (up to its token budget) and their
prefixes; a call past ``max_concurrent_requests`` in flight is answered 429, a call whose client
disconnects has its requests that have not started dropped, and one that takes longer than
``request_timeout`` seconds is answered 504.
"""

# no `from __future__ import annotations`: FastAPI must resolve the endpoint's annotations
import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from .engine import PrefillEngine
from .jsonl import Decoded, Malformed, decode_json
from .queue import BatchQueue, Cancelled, wait_async
from .relevance import PairError, RelevanceScorer, RelevanceTemplate
from .requests import MalformedRequest, Request, Score

#: most request objects in one POST /score (and most documents / pairs in a rerank or score call)
MAX_REQUESTS = 1024
#: scoring calls in flight at once before a new one is answered 429 (TEI's default)
MAX_CONCURRENT = 512
#: keys of a rerank body: those that change the answer, then those accepted and ignored (Cohere's client sends them)
_RERANK_KEYS = frozenset({"model", "query", "documents", "top_n", "return_documents"})
_RERANK_IGNORED = frozenset({"max_tokens_per_doc", "priority", "user"})
_SCORE_KEYS = frozenset({"model", "text_1", "text_2", "user"})

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


def _decode_body(body: bytes) -> dict[str, Any]:
    """A JSON object body, or :class:`BadCall` saying why not."""
    decoded = decode_json(body.decode("utf-8", "surrogateescape"))
    if isinstance(decoded, Malformed):
        raise BadCall(decoded.reason)
    if not isinstance(decoded.value, dict):
        raise BadCall(f"the body must be a JSON object, not {type(decoded.value).__name__}")
    return decoded.value


def _check_keys(body: dict[str, Any], known: frozenset, required: Sequence[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadCall(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    missing = [k for k in required if k not in body]
    if missing:
        raise BadCall(f"missing key(s) {', '.join(map(repr, missing))}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadCall(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise BadCall(f"{what} is empty")
    return value


def parse_rerank(body: dict[str, Any], max_documents: int) -> tuple[str, list[str], int | None, bool]:
    """``(query, documents, top_n, return_documents)`` of a rerank body; :class:`BadCall` naming the problem."""
    _check_keys(body, _RERANK_KEYS | _RERANK_IGNORED, ("query", "documents"))
    query = _text(body["query"], "'query'")
    documents = body["documents"]
    if not isinstance(documents, list) or not documents:
        raise BadCall("'documents' must be a non-empty list of strings (or of {\"text\": ...} objects)")
    if len(documents) > max_documents:
        raise BadCall(f"{len(documents)} documents in one call; at most {max_documents}")
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict) and set(doc) == {"text"}:
            doc = doc["text"]
        texts.append(_text(doc, f"documents[{i}]"))
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
        raise BadCall(f"'top_n' must be an integer >= 0 (0: all), not {top_n!r}")
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise BadCall(f"'return_documents' must be true or false, not {return_documents!r}")
    return query, texts, top_n or None, return_documents


def parse_score(body: dict[str, Any], max_pairs: int) -> list[tuple[str, str]]:
    """The (text_1, text_2) pairs of a vLLM score body; :class:`BadCall` naming the problem."""
    _check_keys(body, _SCORE_KEYS, ("text_1", "text_2"))
    sides = []
    for key in ("text_1", "text_2"):
        value = body[key]
        if isinstance(value, str):
            sides.append([_text(value, f"'{key}'")])
        elif isinstance(value, list) and value:
            sides.append([_text(v, f"{key}[{i}]") for i, v in enumerate(value)])
        else:
            raise BadCall(f"'{key}' must be a string or a non-empty list of strings")
    first, second = sides
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise BadCall(
            f"'text_1' has {len(first)} texts and 'text_2' {len(second)}: give one text_1, or as many as text_2"
        )
    if len(second) > max_pairs:
        raise BadCall(f"{len(second)} pairs in one call; at most {max_pairs}")
    return list(zip(first, second))


def create_app(
    engine: PrefillEngine,
    max_requests: int = MAX_REQUESTS,
    warmup: bool = True,
    relevance: RelevanceTemplate | None = None,
    model_name: str | None = None,
    runner: Any = None,
    max_concurrent_requests: int = MAX_CONCURRENT,
    request_timeout: float | None = None,
):
    """The FastAPI application serving ``engine``.

    ``relevance``: the template and labels of the rerank and score APIs (default:
    :meth:`RelevanceTemplate.from_env`). ``model_name``: the name those APIs serve under; a
    call naming another model is answered 404 (None: any name is accepted). ``runner``: what
    scores and warms up instead of ``engine`` itself, e.g. a
    :class:`~moe_compile.serving.aep.LockstepScorer` over AEP ranks (``engine`` is then rank 0's,
    used to tokenize); when it reports a failure (``runner.health()``), every call and
    ``/health`` answer 503 with it.

    ``max_concurrent_requests``: scoring calls in flight at once; one more is answered 429
    (TEI's ``--max-concurrent-requests``). ``request_timeout``: seconds a call may wait and run;
    past it the call is answered 504 and its requests not yet started are dropped (None: no limit).

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

    scorer, scorer_error = None, None
    try:
        scorer = RelevanceScorer(engine, relevance or RelevanceTemplate.from_env())
    except ValueError as e:  # no tokenizer, or labels outside the vocabulary: /score still serves
        scorer_error = str(e)
        logger.warning("rerank and score APIs unavailable: %s", scorer_error)
    from .aep import ServingFailed

    backend = runner if runner is not None else engine
    warm_done = threading.Event()  # set when the warm-up has ended (or at once without one)
    if not warmup:
        warm_done.set()
    state: dict[str, Any] = {"status": "warming up" if warmup else "ok", "error": None}

    def failure() -> str | None:
        """The backend's failure (a broken AEP lockstep), or None."""
        return runner.health() if runner is not None and hasattr(runner, "health") else None

    def warm() -> None:
        start = time.perf_counter()
        try:
            backend.warmup()
        except Exception as e:  # noqa: BLE001  (reported by /health and /score, not raised into the server)
            state.update(status="failed", error=f"{type(e).__name__}: {e}")
            logger.error("warm-up failed: %s", state["error"])
            warm_done.set()
            return
        state["status"] = "ok"
        warm_done.set()
        logger.info("warm-up done in %.1f s: ready", time.perf_counter() - start)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if warmup:
            threading.Thread(target=warm, name="moe-compile-warmup", daemon=True).start()
        yield
        await run_in_threadpool(_app.state.batch_queue.stop, 60)  # the calls already queued finish

    app = FastAPI(title="moe_compile prefill scoring", lifespan=lifespan)

    def before_step() -> None:  # on the queue's worker: waits for the warm-up
        warm_done.wait()
        if state["status"] == "failed":
            raise HTTPException(503, f"the engine's warm-up failed: {state['error']}")

    def length(request: Request) -> int:  # the prompt tokens a request adds to a step
        if request.tokens is not None:
            return len(request.tokens)
        try:
            return len(engine._encode_prompt(request.text))
        except Exception:  # noqa: BLE001  (the engine answers it with an error record)
            return 1

    world = getattr(getattr(runner, "router", None), "world_size", 1)
    batch_queue = BatchQueue(backend, engine.token_budget * world, length=length, before_step=before_step)
    app.state.batch_queue = batch_queue
    in_flight = [0]  # scoring calls admitted and not yet answered (touched on the event loop only)

    @contextlib.asynccontextmanager
    async def admitted():
        if in_flight[0] >= max_concurrent_requests:
            raise HTTPException(429, f"too many concurrent requests: {in_flight[0]} calls are in flight, at most "
                                f"{max_concurrent_requests} (--max-concurrent-requests); retry later")  # fmt: skip
        in_flight[0] += 1
        try:
            yield
        finally:
            in_flight[0] -= 1

    async def run(call: HTTPRequest, requests: list[Request]) -> list[Score]:
        """The scores of ``requests``, scored in the queue's shared steps."""
        if failure() is not None:
            raise HTTPException(503, failure())
        try:
            return await wait_async(batch_queue, requests, call.is_disconnected, request_timeout)
        except ServingFailed as e:
            raise HTTPException(503, str(e)) from None
        except Cancelled:
            raise HTTPException(499, "the client disconnected") from None
        except TimeoutError as e:
            raise HTTPException(504, f"{e} (--request-timeout); its requests not yet started were dropped") from None

    async def score_objects(call: HTTPRequest, objects: list[Decoded | Malformed]) -> dict[str, Any]:
        records, valid = check_call(objects)
        scores = await run(call, [request for _, request in valid])
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
        async with admitted():
            return await score_objects(call, objects)

    async def relevance_of(call: HTTPRequest, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        try:
            requests = await run_in_threadpool(scorer.requests, pairs)
            async with admitted():
                scores = await run(call, requests)
            return scorer.relevance(scores, len(pairs))
        except PairError as e:
            raise HTTPException(400, str(e)) from None

    async def relevance_call(call: HTTPRequest, parse) -> tuple[dict[str, Any], Any]:
        if scorer is None:
            raise HTTPException(501, f"the rerank and score APIs are not available: {scorer_error}")
        try:
            body = _decode_body(await call.body())
            parsed = parse(body)
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None
        model = body.get("model")
        if model is not None and model_name is not None and model != model_name:
            raise HTTPException(404, f"The model `{model}` does not exist; this server serves `{model_name}`")
        return body, parsed

    async def rerank(call: HTTPRequest) -> dict[str, Any]:
        body, (query, documents, top_n, return_documents) = await relevance_call(
            call, lambda b: parse_rerank(b, max_requests)
        )
        scored = await relevance_of(call, [(query, d) for d in documents])
        order = sorted(range(len(documents)), key=lambda i: (-scored[i][0], i))[:top_n]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scored[i][0]}
            if return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.get("model", model_name),
                "usage": {"total_tokens": sum(t for _, t in scored)}, "results": results}  # fmt: skip

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)

    @app.post("/v1/score")
    async def score_pairs(call: HTTPRequest) -> dict[str, Any]:
        body, pairs = await relevance_call(call, lambda b: parse_score(b, max_requests))
        scored = await relevance_of(call, pairs)
        tokens = sum(t for _, t in scored)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.get("model", model_name),
                "data": [{"index": i, "object": "score", "score": s} for i, (s, _) in enumerate(scored)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}  # fmt: skip

    @app.get("/health")
    def health():
        model = type(engine.model).__name__
        if failure() is not None:
            return JSONResponse({"status": "failed", "model": model, "error": failure()}, status_code=503)
        if state["status"] != "ok":
            body = {"status": state["status"], "model": model}
            if state["error"] is not None:
                body["error"] = state["error"]
            return JSONResponse(body, status_code=503)
        stats = dataclasses.asdict(engine.stats)
        return {"status": "ok", "model": model, "hit_rate": engine.stats.hit_rate, **stats}

    return app


def serve(engine: PrefillEngine, host: str, port: int, warmup: bool = True, **app_kwargs: Any) -> None:
    """Serve ``engine`` on ``host:port`` until interrupted (``warmup``, ``app_kwargs``: see :func:`create_app`)."""
    app = create_app(engine, warmup=warmup, **app_kwargs)  # raises a clear ImportError without the serve extra
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
