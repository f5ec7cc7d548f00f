"""A small HTTP scoring endpoint (FastAPI), started by ``moe-compile serve --model DIR --port N``.

Needs the ``serve`` extra (``pip install "moe_compile[serve]"``: FastAPI and uvicorn).

- ``POST /score`` with ``{"requests": [{"id": ..., "tokens": [...], ...}, ...]}`` (the
  request objects of ``moe-compile score``, at most ``max_requests`` per call) answers
  ``{"scores": [...]}`` in the same order: one scored record or ``{"id", "error"}`` per
  request. The body is split into its request objects before any is decoded
  (:func:`parse_call`), so an object that is not UTF-8, not JSON, nested too deep, not a
  request, or that repeats an earlier id of the call gets an error record of its own and
  the others are scored; only a body that is not ``{"requests": [...]}`` is refused (400).
- the scoring APIs of vLLM, SGLang, Cohere/Jina, TEI and OpenAI (``/rerank``, ``/v1/score``,
  ``/classify``, ``/v1/embeddings``, and vLLM's bodies on ``/score``): :mod:`~moe_compile.serving.routes`
  (shapes in :mod:`~moe_compile.serving.api_shapes`, truncation in
  :mod:`~moe_compile.serving.truncation`; docs/serving.md has the table).
- ``GET /health`` (liveness, with the package version and the engine's counters: 200 while
  serving or warming up, 503 once failed), ``GET /ready`` (readiness: 200 only when warm, not
  draining, not failed), ``GET /metrics`` (Prometheus, :mod:`~moe_compile.serving.metrics`),
  ``GET /v1/models``. Calls made while warming up wait for it.
- ``api_key``: ``Authorization: Bearer`` on every path but ``/health``, ``/ready``, ``/metrics``
  (401); ``max_body_bytes``: a longer body is answered 413 (:class:`~moe_compile.serving.metrics.Guard`).

One engine serves all connections through a batching queue (:mod:`~moe_compile.serving.queue`):
the requests of concurrent calls share the engine's steps (up to its token budget) and their
prefixes; a call past ``max_concurrent_requests`` in flight is answered 429, a call whose client
disconnects has its requests that have not started dropped, and one that takes longer than
``request_timeout`` seconds is answered 504.
"""

# no `from __future__ import annotations`: FastAPI must resolve the endpoint's annotations
import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from .api_shapes import is_pair_score
from .bodies import BadCall, check_call, decode_body, parse_call
from .classify import DEFAULT_LABELS, LabelSet, labels_from_env
from .engine import PrefillEngine
from .memory import memory_accounting
from .metrics import MAX_BODY_BYTES, Guard, Metrics
from .queue import BatchQueue, Cancelled, wait_async
from .relevance import RelevanceScorer, RelevanceTemplate
from .requests import Request, Score
from .routes import add_routes, prompt_tokens

#: most request objects in one POST /score (and most documents / pairs in a rerank or score call)
MAX_REQUESTS = 1024
#: scoring calls in flight at once before a new one is answered 429 (TEI's default)
MAX_CONCURRENT = 512

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Front:
    """What the routes of :mod:`~moe_compile.serving.routes` need from the app (built in :func:`create_app`)."""

    engine: PrefillEngine
    model_name: str | None
    max_requests: int
    scorer: RelevanceScorer | None
    scorer_error: str | None
    labels: LabelSet | None
    labels_error: str | None
    run: Callable  # async (call, requests) -> scores, through the batching queue
    body: Callable  # async (call) -> the JSON object body, the model checked
    prompts: Callable  # (inputs, truncation, tail) -> token lists; HTTPException 400
    score_pairs: Callable | None = None  # set by add_routes: vLLM's pair scoring


def create_app(
    engine: PrefillEngine,
    max_requests: int = MAX_REQUESTS,
    warmup: bool = True,
    relevance: RelevanceTemplate | None = None,
    model_name: str | None = None,
    runner: Any = None,
    max_concurrent_requests: int = MAX_CONCURRENT,
    request_timeout: float | None = None,
    classify_labels: Sequence[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int | None = MAX_BODY_BYTES,
):
    """The FastAPI application serving ``engine``.

    ``relevance``: the template and labels of the rerank and score APIs (default:
    :meth:`RelevanceTemplate.from_env`). ``model_name``: the name those APIs serve under; a
    call naming another model is answered 404 (None: any name is accepted). ``runner``: what
    scores and warms up instead of ``engine`` itself, e.g. a
    :class:`~moe_compile.serving.aep.LockstepScorer` over AEP ranks (``engine`` is then rank 0's,
    used to tokenize); when it reports a failure (``runner.health()``), every call and
    ``/health`` answer 503 with it.

    ``classify_labels``: the classes of ``/classify`` (default ``$MOE_COMPILE_CLASSIFY_LABELS``, else
    ``[" yes", " no"]``; :mod:`~moe_compile.serving.classify`).

    ``api_key``: every path but ``/health``, ``/ready`` and ``/metrics`` needs ``Authorization:
    Bearer KEY`` (401). ``max_body_bytes``: a longer body is answered 413 (None: no limit).

    ``max_concurrent_requests``: scoring calls in flight at once; one more is answered 429
    (TEI's ``--max-concurrent-requests``). ``request_timeout``: seconds a call may wait and run;
    past it the call is answered 504 and its requests not yet started are dropped (None: no limit).

    ``warmup``: on startup, run :meth:`PrefillEngine.warmup` in a thread (compiling every graph
    serving needs); until it is done ``GET /ready`` answers 503 ``{"status": "warming up"}`` (``GET /health``,
    liveness, answers 200) and ``POST /score`` calls wait for it; if it fails, both answer 503 with the error.
    """
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi import Request as HTTPRequest
        from fastapi.responses import JSONResponse, Response
        from starlette.concurrency import run_in_threadpool
    except ImportError as e:
        raise ImportError('the HTTP endpoint needs the serve extra: pip install "moe_compile[serve]"') from e

    scorer, scorer_error = None, None
    try:
        scorer = RelevanceScorer(engine, relevance or RelevanceTemplate.from_env())
    except ValueError as e:  # no tokenizer, or labels outside the vocabulary: /score still serves
        scorer_error = str(e)
        logger.warning("rerank and score APIs unavailable: %s", scorer_error)
    labels, labels_error = None, None
    try:
        labels = LabelSet(engine, classify_labels or labels_from_env(None, DEFAULT_LABELS))
    except ValueError as e:
        labels_error = str(e)
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
        # on stderr like the other start-up lines: what benchmarks/cold_start.py reads (compiles, cache hits)
        print(f"warm-up done in {time.perf_counter() - start:.1f} s: ready ({_compile_counts()})", file=sys.stderr)

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

    started = int(time.time())

    def rank_stats() -> dict[int, Any]:  # every rank's engine counters (/metrics); rank 0's are live
        return {**getattr(runner, "rank_stats", {}), 0: engine.stats}

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

    async def run(call: HTTPRequest, requests: list[Request], per_item: bool = False) -> list[Score]:
        """The scores of ``requests``, scored in the queue's shared steps (429 past the concurrency limit).

        A request whose batch ran out of device memory fails the call with 503 and the batch's figures, unless
        ``per_item`` (``POST /score``: it becomes that request's error record).
        """
        scores = await queued(call, requests)
        oom = next((s for s in scores if s.out_of_memory), None)
        if oom is not None and not per_item:
            raise HTTPException(503, oom.error)
        return scores

    async def queued(call: HTTPRequest, requests: list[Request]) -> list[Score]:
        if failure() is not None:
            raise HTTPException(503, failure())
        if state.get("draining"):
            raise HTTPException(
                503, "the server is shutting down (SIGTERM): calls in flight finish, new ones are refused"
            )
        async with admitted():
            try:
                return await wait_async(batch_queue, requests, call.is_disconnected, request_timeout)
            except ServingFailed as e:
                raise HTTPException(503, str(e)) from None
            except Cancelled:
                raise HTTPException(499, "the client disconnected") from None
            except TimeoutError as e:
                raise HTTPException(
                    504, f"{e} (--request-timeout); its requests not yet started were dropped"
                ) from None

    async def body_of(call: HTTPRequest) -> dict[str, Any]:
        """The call's JSON object body (400 if it is not one; 404 if it names another model)."""
        try:
            body = decode_body(await call.body())
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None
        model = body.get("model")
        if model is not None and model_name is not None and model != model_name:
            raise HTTPException(404, f"The model `{model}` does not exist; this server serves `{model_name}`")
        return body

    def prompts(inputs, truncation, tail: int) -> list[list[int]]:  # runs in a worker thread
        try:
            return prompt_tokens(engine, inputs, truncation, tail)
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None

    front = Front(engine, model_name, max_requests, scorer, scorer_error, labels, labels_error, run, body_of, prompts)
    add_routes(app, front)

    @app.post("/score")
    async def score(call: HTTPRequest) -> dict[str, Any]:
        raw = await call.body()
        try:
            body = decode_body(raw)
        except BadCall:
            body = None  # malformed objects are answered one by one below
        if body is not None and "requests" not in body and is_pair_score(body):
            return await front.score_pairs(call, await body_of(call))  # vLLM's /score body
        try:
            objects = parse_call(raw)
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None
        if len(objects) > max_requests:
            raise HTTPException(413, f"{len(objects)} requests in one call; at most {max_requests}")
        records, valid = check_call(objects)
        scores = await run(call, [request for _, request in valid], per_item=True)
        for (i, _), s in zip(valid, scores, strict=True):
            records[i] = s.to_json()
        return {"scores": records}

    @app.get("/health")
    def health():  # liveness: 200 while the process can serve or will once warm; 503 once it cannot
        model = type(engine.model).__name__
        if failure() is not None:
            body = {"status": "failed", "model": model, "version": __version__, "error": failure()}
            return JSONResponse(body, status_code=503)
        if state["status"] != "ok":
            body = {"status": state["status"], "model": model, "version": __version__}
            if state["error"] is not None:
                body["error"] = state["error"]
            return JSONResponse(body, status_code=503 if state["status"] == "failed" else 200)
        stats = dataclasses.asdict(engine.stats)
        memory = memory_accounting(engine)  # per rank, tensor bytes (serving/memory.py)
        capacity = engine.cache.capacity_tokens if engine.cache is not None else 0
        return {"status": "ok", "model": model, "version": __version__, "hit_rate": engine.stats.hit_rate, **stats,
                "memory": memory, "token_budget": engine.token_budget, "prefix_cache_tokens": capacity,
                "sizing": engine.sizing}  # fmt: skip

    @app.get("/ready")
    def ready():  # readiness: 200 only when a call would be scored now
        status = ("failed" if failure() is not None or state["status"] == "failed" else
                  "draining" if state.get("draining") else state["status"])  # fmt: skip
        code = 200 if status == "ok" else 503
        return JSONResponse({"status": "ready" if code == 200 else status}, status_code=code)

    @app.get("/v1/models")
    def models():  # what OpenAI-style clients call first
        name = model_name or type(engine.model).__name__
        card = {"id": name, "object": "model", "created": started, "owned_by": "moe_compile",
                "max_model_len": engine.max_tokens}  # fmt: skip
        return {"object": "list", "data": [card]}

    metrics = None
    try:
        metrics = Metrics(rank_stats, batch_queue)
    except ImportError:
        logger.warning('no /metrics: prometheus_client is not installed (pip install "moe_compile[serve]")')
    else:

        @app.get("/metrics")
        def metrics_text():
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    app.state.draining = lambda: state.update(draining=True)  # serve(): SIGTERM, before uvicorn stops
    endpoints = frozenset(route.path for route in app.routes)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, endpoints=endpoints)
    return app


def _compile_counts() -> str:
    """This process's compiles so far: Dynamo's graphs and how Inductor's and AOTAutograd's caches served them."""
    from torch._dynamo.utils import counters

    fx, aot = counters["inductor"], counters["aot_autograd"]
    return (
        f"{counters['stats']['unique_graphs']} graph(s) compiled; Inductor's FX graph cache: "
        f"{fx['fxgraph_cache_hit']} hit(s), {fx['fxgraph_cache_miss']} miss(es), "
        f"{fx['fxgraph_cache_bypass']} bypass(es); "
        f"AOTAutograd's cache: {aot['autograd_cache_hit']} hit(s), {aot['autograd_cache_miss']} miss(es), "
        f"{aot['autograd_cache_bypass']} bypass(es)"
    )


def serve(engine: PrefillEngine, host: str, port: int, warmup: bool = True, **app_kwargs: Any) -> None:
    """Serve ``engine`` on ``host:port`` until interrupted (``warmup``, ``app_kwargs``: see :func:`create_app`)."""
    app = create_app(engine, warmup=warmup, **app_kwargs)  # raises a clear ImportError without the serve extra
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: /ready says draining, new calls 503
            app.state.draining()
            super().handle_exit(sig, frame)

    # uvicorn then stops listening, lets the calls in flight finish, and the lifespan's end drains the queue
    Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
