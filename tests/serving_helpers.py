"""Helpers for the serving tests: eager reference scores, a request mix, and 2-rank gloo workers.

The worker runs in a spawned process (so it lives in an importable module): it joins a
gloo group on 127.0.0.1, builds the same zoo model as every other rank, scores the
shared request list with :func:`moe_compile.serving.distributed.score_routed` and
compares every score it received with a plain eager forward.
"""

from __future__ import annotations

import random

import torch

from moe_compile.serving import Request, Score
from moe_compile.verify import rel_err


@torch.no_grad()
def eager_value(model, request: Request) -> torch.Tensor:
    """What a plain eager forward of ``request`` alone says (same convention as the engine's ``Score.value``)."""
    n = len(request.tokens)
    out = model(input_ids=torch.tensor([request.tokens]), output_hidden_states=True)
    reads = list(range(n)) if request.read == "all" else [p % n for p in request.read]
    logits = out.logits[0].float()  # [n, V]
    if request.output == "labels":
        return torch.log_softmax(logits[reads], dim=-1)[:, list(request.labels)]  # [n_read, L]
    if request.output == "logits":
        return logits[reads]  # [n_read, V]
    return out.hidden_states[-1][0, reads].float().mean(dim=0)  # [H]


def max_error(model, requests: list[Request], scores: list[Score]) -> float:
    """Largest relative error of the scores against eager; every score must be a success."""
    assert [s.id for s in scores] == [r.id for r in requests]
    bad = [(s.id, s.error) for s in scores if s.error is not None]
    assert not bad, bad
    return max(rel_err(s.value, eager_value(model, r)) for r, s in zip(requests, scores, strict=True))


def request_mix(vocab: int = 128, seed: int = 0) -> list[Request]:
    """Label, logits and pooled requests; two families share 20- and 37-token prefixes; lengths 3-50."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    shared = [toks(20), toks(37)]
    requests = []
    for i in range(14):
        prompt = shared[i % 2] + toks(1 + i) if i < 10 else toks(3 + 11 * (i - 10))
        if i % 3 == 0:
            requests.append(Request(id=f"lab{i}", tokens=tuple(prompt), labels=(5, 17, 99)))
        elif i % 3 == 1:
            requests.append(Request(id=f"log{i}", tokens=tuple(prompt), read=(-1, -2)))
        else:
            requests.append(Request(id=f"pool{i}", tokens=tuple(prompt), read="all", output="pooled"))
    return requests


# -- two ranks ---------------------------------------------------------------------------------------------------


def routed_parity_worker(rank: int, world_size: int) -> dict:
    """Score the request mix over the group (compiled engine, prefix cache on); errors against eager."""
    import moe_compile  # noqa: F401  (registers the backend)
    from moe_compile.serving import FlopsModel, PrefillEngine, Router
    from moe_compile.serving.distributed import score_routed
    from moe_compile.testing import zoo

    model = zoo.build("qwen3_moe")
    engine = PrefillEngine(model, token_budget=96, block_size=8)
    router = Router(world_size, FlopsModel.from_model(model), block_size=8)
    requests = request_mix()
    scores = score_routed(engine, requests, router)
    return {
        "error": max_error(model, requests, scores),
        "ranks": [s.rank for s in scores],
        "local_requests": engine.stats.requests,
        "cached_tokens": engine.stats.cached_tokens,
    }
