"""OpenAI batch files in ``moe-compile score``: each line a call to one of the HTTP endpoints.

Input lines (OpenAI's Batch API, vLLM's ``run-batch``)::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/rerank", "body": {"query": ..., "documents": [...]}}

Output lines, in input order, one per input line::

    {"id": "batch_req_...", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {...}}, "error": null}

The body is the endpoint's answer, exactly as the server gives it (a 4xx answer too, with its
``detail``: the call was made and refused). A line that cannot be made into a call (an unknown
``url``, a method other than POST, a ``body`` that is not an object) gets ``"response": null`` and
``"error": {"code", "message"}``; the other lines are scored. A line without a usable
``custom_id`` (not JSON, no ``custom_id``, one seen before) is reported on stderr like a malformed
native line. Rerunning resumes: the ``custom_id``\\ s already in the output are skipped.

The calls run through the same application as ``moe-compile serve`` (in process, no socket):
the lines of a chunk are sent concurrently, so their requests share the batching queue's
steps and prefixes exactly as concurrent HTTP calls do.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .jsonl import Malformed, decode_json

#: the endpoints a batch line may call
URLS = ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/classify", "/v1/classify",
        "/v1/embeddings", "/embeddings")  # fmt: skip
_KEYS = frozenset({"custom_id", "method", "url", "body"})


def is_batch_file(path: str | Path) -> bool:
    """Whether the first non-blank line of ``path`` is an OpenAI batch line (a JSON object with ``custom_id``)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                obj = decode_json(raw)
                return not isinstance(obj, Malformed) and isinstance(obj.value, dict) and "custom_id" in obj.value
    return False


def is_batch_record(obj: Any) -> bool:
    """Whether a decoded output line is a batch output line this tool writes."""
    return isinstance(obj, dict) and set(obj) == {"id", "custom_id", "response", "error"}


def read_batch(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line number, line object or why it has no usable custom_id)`` per non-blank line."""
    first: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj = decode_json(raw)
            if isinstance(obj, Malformed):
                yield number, obj.reason
                continue
            line = obj.value
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
                yield number, "not a batch line: no 'custom_id' string"
                continue
            cid = line["custom_id"]
            if cid in first:
                yield number, f"duplicate custom_id {cid!r} (first on line {first[cid]})"
                continue
            first[cid] = number
            yield number, line


def _problem(line: dict[str, Any]) -> tuple[str, str] | None:
    """``(code, message)`` when the line cannot be made into a call, else None."""
    unknown = sorted(set(line) - _KEYS)
    if unknown:
        return "invalid_request", f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_KEYS))}"
    if line.get("method") != "POST":
        return "invalid_method", f"'method' must be \"POST\", not {line.get('method')!r}"
    if line.get("url") not in URLS:
        return "invalid_url", f"unknown url {line.get('url')!r}; a batch line may call {', '.join(URLS)}"
    if not isinstance(line.get("body"), dict):
        return "invalid_request", "'body' must be a JSON object (the endpoint's request body)"
    return None


def output_line(line: dict[str, Any], status: int | None, body: Any, error: tuple[str, str] | None) -> dict:
    """One output line: the endpoint's answer, or the error that kept the line from being a call."""
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line["custom_id"], "response": response,
            "error": None if error is None else {"code": error[0], "message": error[1]}}  # fmt: skip


async def _call(client: Any, line: dict[str, Any]) -> dict:
    problem = _problem(line)
    if problem is not None:
        return output_line(line, None, None, problem)
    answer = await client.post(line["url"], content=json.dumps(line["body"]).encode(),
                               headers={"content-type": "application/json"})  # fmt: skip
    try:
        body = answer.json()
    except ValueError:
        body = {"detail": answer.text}
    return output_line(line, answer.status_code, body, None)


def run_chunks(app: Any, lines: list[dict[str, Any]], chunk: int, write) -> None:
    """Send ``lines`` to ``app`` chunk by chunk (each chunk's calls concurrently); ``write(outputs)`` per chunk."""
    import httpx

    async def main() -> None:
        # an unhandled error in a handler is that line's 500, not the end of the run (the other lines are kept)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://moe-compile-batch", timeout=None) as client:
            for lo in range(0, len(lines), chunk):
                outputs = await asyncio.gather(*(_call(client, line) for line in lines[lo : lo + chunk]))
                write(outputs)

    asyncio.run(main())


def score_batch_file(args: Any, engine: Any, runner: Any, output: Any, done: set) -> int:
    """``moe-compile score`` on an OpenAI batch file (rank 0): answer every line not in ``done``; the exit status."""
    import sys
    import time

    from .http import create_app
    from .relevance import RelevanceTemplate

    todo, malformed, skipped = [], 0, 0
    for number, line in read_batch(args.input):
        if isinstance(line, str):
            malformed += 1
            print(f"{args.input}:{number}: skipped malformed line: {line}", file=sys.stderr)
        elif line["custom_id"] in done:
            skipped += 1
        else:
            todo.append(line)
    app = create_app(engine, warmup=False, runner=runner, relevance=RelevanceTemplate.from_env(),
                     model_name=Path(args.model).resolve().name, max_concurrent_requests=max(512, args.chunk),
                     max_body_bytes=None)  # fmt: skip
    start = time.perf_counter()
    counts = {"answered": 0, "failed": 0}

    def write(outputs: list[dict]) -> None:
        output.append_lines(outputs)
        counts["answered"] += len(outputs)
        counts["failed"] += sum(o["error"] is not None or o["response"]["status_code"] != 200 for o in outputs)

    try:
        run_chunks(app, todo, args.chunk, write)
    finally:
        app.state.batch_queue.stop(60)
    wall = time.perf_counter() - start
    print(f"answered {counts['answered']} batch lines ({counts['failed']} not 200) in {wall:.2f} s")
    print(f"skipped {skipped} already in the output, {malformed} malformed line(s)")
    stats = engine.stats
    print(
        f"prefix cache: {stats.hit_rate:.1%} of prompt tokens reused ({stats.cached_tokens} of {stats.prompt_tokens})"
    )
    return 1 if malformed else 0
