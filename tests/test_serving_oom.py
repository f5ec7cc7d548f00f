"""A batch that runs out of device memory fails its own requests with a clear error; the server keeps serving.

The out-of-memory error is injected: the decoder raises ``torch.OutOfMemoryError`` (what CUDA's allocator
raises; ``torch.cuda.OutOfMemoryError`` is the same class) for any batch holding the token :data:`BOOM`.
"""

import pytest
import torch
from serving_helpers import max_error
from test_serving_cli import http, serving

from moe_compile.serving import PrefillEngine, Request
from moe_compile.serving.batching import Row
from moe_compile.serving.engine import PreparedRequest
from moe_compile.testing import zoo

BOOM = 77
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return zoo.build("qwen3_moe")


def oom_engine(model, **kwargs):
    """An engine whose decoder runs out of memory on any batch holding BOOM; the calls it saw."""
    engine = PrefillEngine(model, compile=False, block_size=4, **kwargs)
    real, calls = engine._decoder, []

    def decoder(**kw):
        calls.append(kw["input_ids"].shape)
        if (kw["input_ids"] == BOOM).any():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(**kw)

    engine._decoder = decoder
    return engine, calls


def good(i: int, n: int = 6) -> Request:
    return Request(id=f"ok{i}", tokens=tuple(range(10 + 11 * i, 10 + 11 * i + n)), labels=(5, 6))


def test_only_the_batch_that_ran_out_of_memory_fails_and_the_next_scores_are_exact(model):
    engine, calls = oom_engine(model, token_budget=8)  # 6-token prompts: one per batch
    boom = Request(id="boom", tokens=(3, 4, BOOM, 5, 6, 7), labels=(5, 6))
    requests = [good(0), boom, good(1)]
    scores = engine.score(requests)
    assert len(calls) == 3  # three batches, each run
    assert [s.error is None for s in scores] == [True, False, True]
    error = scores[1].error
    assert scores[1].out_of_memory and scores[1].id == "boom"
    assert error.startswith("out of device memory running this request's batch (1 prompts, 6 padded tokens")
    assert "lower --token-budget (now 8)" in error and "the server goes on serving" in error
    assert max_error(model, [requests[0], requests[2]], [scores[0], scores[2]]) < TOL
    assert (engine.stats.oom_batches, engine.stats.errors, engine.stats.batches) == (1, 1, 2)
    later = [good(2), good(3, n=9)]
    assert max_error(model, later, engine.score(later)) < TOL  # the engine goes on, exactly
    assert engine.stats.oom_batches == 1


def test_a_shared_prefix_pass_that_runs_out_of_memory_costs_only_the_reuse(model):
    engine, _ = oom_engine(model, token_budget=64)
    prefix = (3, BOOM, 5, 6, 7, 8, 9, 10)  # shared by both: computed first, in its own pass, which fails
    requests = [Request(id=i, tokens=prefix + tail, labels=(5,)) for i, tail in enumerate([(11, 12), (13, 14, 15)])]
    scores = engine.score(requests)
    assert engine.stats.oom_batches == 2  # the prefix pass, then the batch of both prompts (they hold BOOM too)
    assert all(s.out_of_memory for s in scores)
    engine._decoder = engine.decoder  # the memory is back
    assert max_error(model, requests, engine.score(requests)) < TOL


def test_on_cuda_the_allocator_cache_is_emptied(model, monkeypatch):
    engine = PrefillEngine(model, compile=False, prefix_cache_tokens=0)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    item = PreparedRequest([5, 6, 7], 2, Request(id="x", tokens=(5, 6, 7)), [2])
    rows = [Row([5, 6, 7]), Row([1, 2])]
    assert engine._out_of_memory(rows, [item, PreparedRequest([1, 2], 1)])[1] is None  # a prefix pass: no answer
    assert emptied == []  # the CPU has no allocator cache to free
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    (score, _) = engine._out_of_memory(rows, [item, PreparedRequest([1, 2], 1)])
    assert emptied == [True] and "(2 prompts, 6 padded tokens, 0 cached prefix tokens)" in score.error


def test_http_fails_the_batch_with_503_or_an_error_record_counts_it_and_keeps_serving(model):
    pytest.importorskip("fastapi")
    from moe_compile.serving.http import create_app

    engine, _ = oom_engine(model, token_budget=8)
    with serving(create_app(engine, warmup=False)) as url:
        body = {"requests": [{"id": "a", "tokens": [3, 4, 5, 6], "labels": [5]},
                             {"id": "boom", "tokens": [3, BOOM, 5, 6, 8, 9], "labels": [5]}]}  # fmt: skip
        status, answer = http(f"{url}/score", body)  # POST /score: one record per request
        assert status == 200
        ok, failed = answer["scores"]
        assert ok["id"] == "a" and "logprobs" in ok
        assert failed["id"] == "boom" and failed["error"].startswith("out of device memory running this request's")
        # an API without per-item errors: the call fails with 503 and the batch's figures
        status, answer = http(f"{url}/v1/embeddings", {"input": [[3, BOOM, 5]]})
        assert status == 503 and "out of device memory running this request's batch" in answer["detail"]
        status, health = http(f"{url}/health")
        assert status == 200 and health["status"] == "ok" and health["oom_batches"] == 2
        with __import__("urllib.request").request.urlopen(f"{url}/metrics") as r:
            metrics = r.read().decode()
        assert 'moe_compile:batches_out_of_memory_total{rank="0"} 2.0' in metrics
        requests = [good(0), good(1, n=5)]  # the server goes on serving, exactly
        status, answer = http(f"{url}/score", {"requests": [{"id": r.id, "tokens": list(r.tokens), "labels": [5, 6]}
                                                            for r in requests]})  # fmt: skip
        assert status == 200
        for r, record in zip(requests, answer["scores"], strict=True):
            expected = engine.score([r])[0].value
            assert torch.allclose(torch.tensor(record["logprobs"]), expected, rtol=TOL, atol=TOL)
        assert max_error(model, requests, engine.score(requests)) < TOL
