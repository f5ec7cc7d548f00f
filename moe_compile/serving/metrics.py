"""Prometheus ``/metrics`` (``prometheus_client``), and the front end's ASGI guard: API key, body limit, timing.

Names follow vLLM's where they mean the same, under the ``moe_compile:`` prefix:

==========================================  =========  ==================================================
metric                                      type       meaning
==========================================  =========  ==================================================
``moe_compile:http_requests_total``         counter    calls by ``endpoint`` and ``status``
``moe_compile:e2e_request_latency_seconds`` histogram  call latency by ``endpoint`` (arrival to answer)
``moe_compile:num_requests_waiting``        gauge      engine requests queued for a step
``moe_compile:num_requests_running``        gauge      engine requests in the step being run
``moe_compile:prompt_tokens_total``         counter    prompt tokens of the scored requests, per ``rank``
``moe_compile:prompt_tokens_cached_total``  counter    of which reused from the prefix cache, per ``rank``
``moe_compile:prompt_tokens_computed_total`` counter   tokens run by the decoder (shared-prefix passes
                                                       included, padding not), per ``rank``
``moe_compile:prefix_cache_queries_total``  counter    prompt tokens looked up in the prefix cache, per ``rank``
``moe_compile:prefix_cache_hits_total``     counter    of which found, per ``rank``
``moe_compile:request_success_total``       counter    engine requests scored, per ``rank``
``moe_compile:request_errors_total``        counter    engine requests answered with an error, per ``rank``
``moe_compile:batches_out_of_memory_total`` counter    batches that ran out of device memory, per ``rank``
==========================================  =========  ==================================================

The engine counters are read from :class:`~moe_compile.serving.engine.EngineStats` at scrape
time; under AEP each rank's counters come back to rank 0 with every step's answers
(:class:`~moe_compile.serving.aep.LockstepScorer`), one series per ``rank``.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

PREFIX = "moe_compile:"
#: paths answered without an API key (liveness, readiness, metrics)
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
#: most bytes in a request body by default (TEI's --payload-limit)
MAX_BODY_BYTES = 2_000_000
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """One app's metrics in their own registry (several apps in one process do not clash)."""

    def __init__(self, rank_stats: Callable[[], dict[int, Any]], queue: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "http_requests", "HTTP calls by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram(PREFIX + "e2e_request_latency_seconds", "call latency, arrival to answer",
                                 ["endpoint"], buckets=_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(_EngineCollector(rank_stats, queue))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The queue gauges and every rank's engine counters, read at scrape time."""

    def __init__(self, rank_stats: Callable[[], dict[int, Any]], queue: Any) -> None:
        self.rank_stats = rank_stats
        self.queue = queue

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "engine requests queued for a step",
                                value=self.queue.depth())  # fmt: skip
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "engine requests in the running step",
                                value=self.queue.running)  # fmt: skip
        stats = {rank: s if isinstance(s, dict) else dataclasses.asdict(s) for rank, s in self.rank_stats().items()}
        series = [
            ("prompt_tokens", "prompt tokens of the scored requests", "prompt_tokens"),
            ("prompt_tokens_cached", "prompt tokens reused from the prefix cache", "cached_tokens"),
            ("prompt_tokens_computed", "tokens run by the decoder, shared-prefix passes included", "computed_tokens"),
            ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", "prompt_tokens"),
            ("prefix_cache_hits", "prompt tokens found in the prefix cache", "cached_tokens"),
            ("request_success", "engine requests scored", None),
            ("request_errors", "engine requests answered with an error", "errors"),
            ("batches_out_of_memory", "batches that ran out of device memory (their requests failed)", "oom_batches"),
        ]
        for name, doc, key in series:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["rank"])
            for rank, s in sorted(stats.items()):
                value = s["requests"] - s["errors"] if key is None else s[key]
                family.add_metric([str(rank)], value)
            yield family


class Guard:
    """Pure ASGI middleware: the API key, the body byte limit, and the request metrics.

    - ``api_key``: every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer KEY`` (401
      otherwise, compared in constant time); nothing of a refused call is read or scored.
    - ``max_body_bytes``: a body longer than that is answered 413 (by its ``Content-Length``,
      or while it streams in); nothing of it is scored.
    - ``metrics``: each call counted by endpoint (the route's path, ``other`` for unknown paths)
      and status, and its latency observed.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int | None, metrics: Metrics | None,
                 endpoints: frozenset) -> None:  # fmt: skip
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.api_key is not None and scope["path"] not in OPEN_PATHS:
                given = headers.get(b"authorization", b"")
                if not (given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), self.api_key)):
                    return await _answer(send_, 401, "a missing or wrong API key: send 'Authorization: Bearer KEY' "
                                         "with the key of --api-key (or $MOE_COMPILE_API_KEY)")  # fmt: skip
            limit = self.max_body_bytes
            if limit is not None:
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    return await _answer(send_, 413, f"the body has {int(length)} bytes; at most {limit} "
                                         "(--max-body-bytes)")  # fmt: skip
                chunks, size, more = [], 0, True
                while more:  # read the body here, so that a too-long one is refused before any of it is used
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        return await _answer(send_, 413, f"the body has more than {limit} bytes; at most {limit} "
                                             "(--max-body-bytes)")  # fmt: skip
                receive = _replay(b"".join(chunks), receive)
            await self.app(scope, receive, send_)
        finally:
            if self.metrics is not None:
                endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then passes on to ``receive`` (a disconnect, say)."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
