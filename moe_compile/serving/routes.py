"""The HTTP routes of the scoring APIs other servers speak, on top of :mod:`~moe_compile.serving.http`'s front.

- ``POST /rerank``, ``/v1/rerank``, ``/v2/rerank``: Cohere/Jina/vLLM ``{query, documents, ...}``,
  or TEI's ``{query, texts, ...}`` (answered as TEI does: a list of ``{index, score, text?}``);
- ``POST /v1/score``: vLLM's ``{text_1, text_2}`` / ``{queries, documents}``, or SGLang's
  ``{query, items, label_token_ids, ...}`` (told apart by their keys); ``POST /score`` with vLLM's
  bodies goes to the same pair scoring (the native ``{"requests": [...]}`` body stays in http.py);
- ``POST /classify``, ``/v1/classify``: vLLM's ``{input, truncate_prompt_tokens?}``;
- ``POST /v1/embeddings``, ``/embeddings``: OpenAI's ``{model, input, encoding_format?}``;
  ``POST /embed``: TEI's ``{inputs, normalize?, truncate?, truncation_direction?}``.

Every call's engine requests go through the front's batching queue (``front.run``). The
shapes are parsed in :mod:`~moe_compile.serving.api_shapes`; truncation is
:mod:`~moe_compile.serving.truncation`'s.
"""

# no `from __future__ import annotations`: FastAPI must resolve the endpoints' annotations

import base64
import math
import time
import uuid
from typing import Any

from .api_shapes import (
    Rerank,
    is_pair_score,
    parse_classify,
    parse_embeddings,
    parse_rerank,
    parse_score,
    parse_sglang_score,
    parse_tei_embed,
)
from .bodies import BadCall
from .classify import softmax, unit
from .relevance import PairError
from .requests import Request
from .truncation import cut_tokens


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def add_routes(app: Any, front: Any) -> None:
    """Register the routes above on ``app``; ``front`` is http.py's :class:`~moe_compile.serving.http.Front`."""
    from fastapi import HTTPException
    from fastapi import Request as HTTPRequest
    from starlette.concurrency import run_in_threadpool

    def parsed(body: dict[str, Any], parse) -> Any:
        try:
            return parse(body)
        except BadCall as e:
            raise HTTPException(400, f"bad body: {e}") from None

    async def relevance_of(call: HTTPRequest, pairs, truncation) -> list[tuple[float, int, float]]:
        if front.scorer is None:
            raise HTTPException(501, f"the rerank and score APIs are not available: {front.scorer_error}")
        try:
            requests = await run_in_threadpool(front.scorer.requests, pairs, truncation)
            scores = await front.run(call, requests)
            return front.scorer.relevance(scores, len(pairs))
        except PairError as e:
            raise HTTPException(400, str(e)) from None

    async def rerank(call: HTTPRequest) -> Any:
        body = await front.body(call)
        r: Rerank = parsed(body, lambda b: parse_rerank(b, front.max_requests))
        scored = await relevance_of(call, [(r.query, d) for d in r.documents], r.truncation)
        order = sorted(range(len(r.documents)), key=lambda i: (-scored[i][0], i))[: r.top_n]
        if r.tei:  # TEI: a bare list, sorted by score
            key = 2 if r.raw_scores else 0
            return [{"index": i, "score": scored[i][key], **({"text": r.documents[i]} if r.return_documents else {})}
                    for i in order]  # fmt: skip
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scored[i][0]}
            if r.return_documents:
                result["document"] = {"text": r.documents[i]}
            results.append(result)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.get("model", front.model_name),
                "usage": {"total_tokens": sum(s[1] for s in scored)}, "results": results}  # fmt: skip

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)

    async def score_pairs(call: HTTPRequest, body: dict[str, Any]) -> dict[str, Any]:
        pairs, truncation = parsed(body, lambda b: parse_score(b, front.max_requests))
        scored = await relevance_of(call, pairs, truncation)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.get("model", front.model_name),
                "data": [{"index": i, "object": "score", "score": s[0]} for i, s in enumerate(scored)],
                "usage": _usage(sum(s[1] for s in scored))}  # fmt: skip

    front.score_pairs = score_pairs  # POST /score with vLLM's body (http.py)

    @app.post("/v1/score")
    async def v1_score(call: HTTPRequest) -> dict[str, Any]:
        body = await front.body(call)
        if is_pair_score(body) or not any(k in body for k in ("items", "label_token_ids")):
            return await score_pairs(call, body)
        return await label_score(call, body)

    async def label_score(call: HTTPRequest, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang: the probability of each label token after each prompt."""
        call_ = parsed(body, lambda b: parse_sglang_score(b, front.max_requests))
        if any(isinstance(p, str) for p in call_.prompts) and front.engine.tokenizer is None:
            raise HTTPException(501, "text prompts need a tokenizer and this model has none; send token ids")
        requests = [Request(id=i, labels=tuple(call_.label_token_ids),
                            **({"text": p} if isinstance(p, str) else {"tokens": tuple(p)}))
                    for i, p in enumerate(call_.prompts)]  # fmt: skip
        scores = await front.run(call, requests)
        out = []
        for i, s in enumerate(scores):
            if s.error is not None:
                raise HTTPException(400, f"items[{i}]: {s.error}")
            logps = s.value[0].tolist()  # [n_labels]
            out.append(softmax(logps) if call_.apply_softmax else [math.exp(x) for x in logps])
        return {"scores": out, "model": body.get("model", front.model_name), "object": "scoring",
                "usage": _usage(sum(s.tokens for s in scores))}  # fmt: skip

    async def classify(call: HTTPRequest) -> dict[str, Any]:
        body = await front.body(call)
        texts, truncation = parsed(body, lambda b: parse_classify(b, front.max_requests))
        labels = front.labels
        if labels is None:
            raise HTTPException(501, f"the classify API is not available: {front.labels_error}")
        prompts = await run_in_threadpool(front.prompts, texts, truncation, labels.tail)
        requests = [r for i, tokens in enumerate(prompts) for r in labels.requests(tokens, str(i))]
        scores = await front.run(call, requests)
        data = []
        k = labels.per_prompt
        for i in range(len(texts)):
            logps = labels.logprobs(scores[i * k : (i + 1) * k])
            if isinstance(logps, str):
                raise HTTPException(400, f"input[{i}]: {logps}")
            probs = softmax(logps)
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels.names[best], "probs": probs, "num_classes": len(probs)})
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.get("model", front.model_name), "data": data,
                "usage": _usage(sum(len(p) for p in prompts))}  # fmt: skip

    for path in ("/classify", "/v1/classify"):
        app.post(path)(classify)

    async def pooled(call: HTTPRequest, e) -> tuple[list, int]:
        """The embeddings of a parsed call (unit vectors unless ``e.normalize`` is false) and its prompt tokens."""
        prompts = await run_in_threadpool(front.prompts, e.inputs, e.truncation, 0)
        requests = [Request(id=i, tokens=tuple(t), read="all", output="pooled") for i, t in enumerate(prompts)]
        scores = await front.run(call, requests)
        vectors = []
        for i, s in enumerate(scores):
            if s.error is not None:
                raise HTTPException(400, f"input[{i}]: {s.error}")
            vectors.append(unit(s.value) if e.normalize else s.value.float())  # [H], float32
        return vectors, sum(len(p) for p in prompts)

    @app.post("/embed")
    async def tei_embed(call: HTTPRequest) -> list:
        """TEI's shape: a bare list of vectors."""
        body = await front.body(call)
        e = parsed(body, lambda b: parse_tei_embed(b, front.max_requests, front.engine.config.hidden_size))
        vectors, _ = await pooled(call, e)
        return [v.tolist() for v in vectors]

    async def embeddings(call: HTTPRequest) -> dict[str, Any]:
        body = await front.body(call)
        hidden = front.engine.config.hidden_size
        e = parsed(body, lambda b: parse_embeddings(b, front.max_requests, hidden))
        vectors, tokens = await pooled(call, e)
        data = []
        for i, vector in enumerate(vectors):
            if e.encoding_format == "base64":  # little-endian float32, as OpenAI's client decodes it
                embedding: Any = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.get("model", front.model_name), "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    for path in ("/v1/embeddings", "/embeddings"):
        app.post(path)(embeddings)


def prompt_tokens(engine: Any, inputs, truncation, tail: int) -> list[list[int]]:
    """The token ids of text (or token-id) prompts after the call's truncation; BadCall for one that cannot be.

    ``tail``: tokens a label appends after the prompt (they count against the model's maximum
    and are never cut). Without truncation a prompt longer than the model takes is refused,
    naming it; with ``truncate_prompt_tokens`` it is cut on its tokens (``truncation_side``).
    """
    model_max = engine.max_tokens - tail if engine.max_tokens is not None else None
    limits = [m for m in (model_max, truncation.limit(model_max)) if m is not None]
    limit = min(limits) if limits else None
    side = truncation.side_of(engine.tokenizer)
    out = []
    for i, value in enumerate(inputs):
        if isinstance(value, str):
            if engine.tokenizer is None:
                raise BadCall("text inputs need a tokenizer and this model has none; send token ids")
            try:
                value.encode("utf-8")
                tokens = engine._encode_prompt(value)
            except Exception as e:  # noqa: BLE001  (a lone surrogate, or the tokenizer's own error)
                raise BadCall(f"input[{i}]: cannot tokenize: {type(e).__name__}: {e}") from None
        else:
            tokens = list(value)
        if not tokens:
            raise BadCall(f"input[{i}]: the tokenizer gives no tokens")
        if limit is not None and len(tokens) > limit:
            if truncation.max_tokens is None:
                raise BadCall(f"input[{i}]: too long: {len(tokens)} tokens, the model takes at most {limit} here; "
                              "pass truncate_prompt_tokens (-1: the model's maximum) to cut it")  # fmt: skip
            tokens = cut_tokens(tokens, limit, side)
        out.append(tokens)
    return out
