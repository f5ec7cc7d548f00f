"""A small HTTP scoring endpoint (FastAPI), started by ``moe-compile serve --model DIR --port N``.

Needs the ``serve`` extra (``pip install "moe_compile[serve]"``: FastAPI and uvicorn).

- ``POST /score`` with ``{"requests": [{"id": ..., "tokens": [...], ...}, ...]}`` (the
  request objects of ``moe-compile score``, at most ``max_requests`` per call) answers
  ``{"scores": [...]}`` in the same order: one scored record or ``{"id", "error"}`` per
  request; a malformed request object gets an error record too, the others are scored.
- ``GET /health`` answers ``{"status": "ok", ...}`` with the engine's counters.

One engine serves all connections: calls are scored one at a time (a lock), each as one
:meth:`~moe_compile.serving.PrefillEngine.score` call, so the requests of a call are
batched and share prefixes with each other and with earlier calls (the prefix cache).
"""

# no `from __future__ import annotations`: FastAPI must resolve the local ScoreCall annotation
import dataclasses
import threading
from typing import Any

from .engine import PrefillEngine
from .requests import MalformedRequest, Request

#: most request objects in one POST /score
MAX_REQUESTS = 1024


def create_app(engine: PrefillEngine, max_requests: int = MAX_REQUESTS):
    """The FastAPI application serving ``engine``."""
    try:
        from fastapi import FastAPI, HTTPException
        from pydantic import BaseModel
    except ImportError as e:
        raise ImportError('the HTTP endpoint needs the serve extra: pip install "moe_compile[serve]"') from e

    class ScoreCall(BaseModel):
        requests: list[Any]

    app = FastAPI(title="moe_compile prefill scoring")
    lock = threading.Lock()

    @app.post("/score")
    def score(call: ScoreCall) -> dict[str, Any]:  # sync: FastAPI runs it in a worker thread
        if len(call.requests) > max_requests:
            raise HTTPException(413, f"{len(call.requests)} requests in one call; at most {max_requests}")
        records: list[dict[str, Any] | None] = [None] * len(call.requests)
        valid: list[tuple[int, Request]] = []
        for i, obj in enumerate(call.requests):
            try:
                valid.append((i, Request.from_json(obj)))
            except MalformedRequest as e:
                rid = obj.get("id") if isinstance(obj, dict) else None
                records[i] = {"id": rid, "error": f"malformed request: {e}"}
        with lock:
            scores = engine.score([request for _, request in valid])
        for (i, _), s in zip(valid, scores):
            records[i] = s.to_json()
        return {"scores": records}

    @app.get("/health")
    def health() -> dict[str, Any]:
        stats = dataclasses.asdict(engine.stats)
        return {"status": "ok", "model": type(engine.model).__name__, "hit_rate": engine.stats.hit_rate, **stats}

    return app


def serve(engine: PrefillEngine, host: str, port: int) -> None:
    """Serve ``engine`` on ``host:port`` until interrupted."""
    app = create_app(engine)  # raises a clear ImportError without the serve extra
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
