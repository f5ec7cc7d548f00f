"""The batching queue: concurrent calls share steps and prefixes, score as one at a time, cancel, 429, 504."""

import json
import socket
import threading
import time

import pytest
import torch
from serving_helpers import eager_value, rel_err
from test_serving_cli import http, serving

from moe_compile.serving import PrefillEngine, Request
from moe_compile.serving.queue import BatchQueue, Cancelled
from moe_compile.testing import zoo


@pytest.fixture(scope="module")
def model():
    return zoo.build("qwen3_moe")


class Gated:
    """A backend that records every step and holds the first one until released."""

    def __init__(self, engine):
        self.engine = engine
        self.steps = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def score(self, requests):
        self.steps.append([r.id for r in requests])
        self.entered.set()
        assert self.release.wait(60), "never released"
        return self.engine.score(requests)

    def warmup(self):
        return 0


def family(tag, prefix, n):
    """``n`` label requests whose prompts share ``prefix``; ids ``tag0..``."""
    return [Request(id=f"{tag}{i}", tokens=tuple(prefix + [40 + i, 41 + 3 * i]), labels=(5, 6)) for i in range(n)]


def test_calls_arriving_during_a_step_share_the_next_step_and_score_as_alone(model):
    engine = PrefillEngine(model, compile=False, block_size=8, token_budget=512)
    gated = Gated(engine)
    queue = BatchQueue(gated, step_tokens=engine.token_budget)
    first = queue.submit(family("a", list(range(3, 20)), 2))
    assert gated.entered.wait(30)
    shared = list(range(60, 93))  # 33 tokens no earlier step has seen, shared by the next three calls
    calls = {tag: family(tag, shared, 3) for tag in "bcd"}
    tickets = {tag: queue.submit(requests) for tag, requests in calls.items()}
    assert queue.depth() == 9
    gated.release.set()
    results = {tag: ticket.wait(60) for tag, ticket in tickets.items()}
    first.wait(60)
    # the three calls that arrived during the first step ran together in the second
    assert len(gated.steps) == 2 and sorted(gated.steps[1]) == sorted(r.id for c in calls.values() for r in c)
    # their common prefix was computed once for all three calls: every prompt reused it
    assert all(s.cached_tokens == 32 for scores in results.values() for s in scores)
    # scores equal each call scored alone on a fresh engine, and a plain eager forward
    alone = PrefillEngine(model, compile=False, block_size=8, token_budget=512)
    for tag, requests in calls.items():
        assert [s.id for s in results[tag]] == [r.id for r in requests]
        for s, expected, r in zip(results[tag], alone.score(requests), requests, strict=True):
            assert s.error is None and rel_err(s.value, expected.value) < 1e-5
            assert rel_err(s.value, eager_value(model, r)) < 1e-5
    queue.stop(10)


def test_steps_are_filled_up_to_the_token_budget_in_arrival_order(model):
    engine = PrefillEngine(model, compile=False, block_size=8, token_budget=40)
    gated = Gated(engine)
    queue = BatchQueue(gated, step_tokens=40)
    blocker = queue.submit([Request(id="x", tokens=tuple(range(3, 13)))])
    assert gated.entered.wait(30)
    lengths = [15, 15, 15, 50, 5]  # 50 is longer than a step: it runs alone
    tickets = [queue.submit([Request(id=f"r{i}", tokens=tuple(range(3, 3 + n)))]) for i, n in enumerate(lengths)]
    gated.release.set()
    for t in tickets + [blocker]:
        t.wait(60)
    assert gated.steps == [["x"], ["r0", "r1"], ["r2"], ["r3"], ["r4"]]
    queue.stop(10)


def test_a_cancelled_call_drops_its_requests_that_have_not_started(model):
    engine = PrefillEngine(model, compile=False, block_size=8)
    gated = Gated(engine)
    queue = BatchQueue(gated, step_tokens=engine.token_budget)
    running = queue.submit(family("a", list(range(3, 20)), 2))
    assert gated.entered.wait(30)
    gone = queue.submit(family("g", list(range(30, 50)), 3))
    kept = queue.submit(family("k", list(range(30, 50)), 1))
    assert queue.cancel(gone) == 3
    assert queue.cancel(running) == 0  # already running: it finishes, its scores are not wanted
    gated.release.set()
    assert [s.id for s in kept.wait(60)] == ["k0"]
    with pytest.raises(Cancelled):
        gone.wait(60)
    assert all(not rid.startswith("g") for step in gated.steps for rid in step)
    queue.stop(10)


def test_a_failing_step_fails_only_its_own_calls(model):
    engine = PrefillEngine(model, compile=False, block_size=8, token_budget=16)

    class Flaky:
        def score(self, requests):
            if any(r.id == "boom" for r in requests):
                raise RuntimeError("broken step")
            return engine.score(requests)

    queue = BatchQueue(Flaky(), step_tokens=16)
    bad = queue.submit([Request(id="boom", tokens=(3, 4, 5))])
    good = queue.submit([Request(id="fine", tokens=tuple(range(3, 20)), labels=(5,))])
    with pytest.raises(RuntimeError, match="broken step"):
        bad.wait(60)
    assert good.wait(60)[0].error is None
    queue.stop(10)


def test_a_wrong_score_count_or_a_failing_callback_does_not_stop_the_worker(model):
    """The one worker thread survives a backend answering the wrong number of scores, an ``on_step`` that raises and
    a waiter whose callback raises: those calls fail (or finish) and the next call is still scored."""
    engine = PrefillEngine(model, compile=False, block_size=8, token_budget=16)

    class Short:
        def score(self, requests):
            scores = engine.score(requests)
            return scores[:-1] if any(r.id == "short" for r in requests) else scores

    def broken_callback(*_):
        raise RuntimeError("a metrics bug")

    queue = BatchQueue(Short(), step_tokens=16, on_step=broken_callback)
    short = queue.submit([Request(id="short", tokens=(3, 4, 5), labels=(5,))])
    with pytest.raises(RuntimeError, match="returned 0 scores for 1 requests"):
        short.wait(60)
    waited = queue.submit([Request(id="cb", tokens=(3, 4, 6), labels=(5,))], on_done=broken_callback)
    assert waited.wait(60)[0].error is None
    after = queue.submit([Request(id="after", tokens=tuple(range(3, 12)), labels=(5,))])
    (score,) = after.wait(60)
    assert score.error is None
    (alone,) = engine.score([Request(id="after", tokens=tuple(range(3, 12)), labels=(5,))])
    assert rel_err(score.value, alone.value) < 1e-5
    queue.stop(10)


# -- over HTTP ---------------------------------------------------------------------------------------------------


def _app(model, gated, **kwargs):
    from moe_compile.serving.http import create_app

    return create_app(gated.engine, warmup=False, runner=gated, **kwargs)


def _post_in_thread(url, body, out):
    thread = threading.Thread(target=lambda: out.append(http(url, body)), daemon=True)
    thread.start()
    return thread


def _wait(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_http_concurrent_calls_429_past_the_limit_and_equal_one_at_a_time(model):
    pytest.importorskip("fastapi")
    engine = PrefillEngine(model, compile=False, block_size=8)
    gated = Gated(engine)
    app = _app(model, gated, max_concurrent_requests=3)
    shared = list(range(60, 93))
    bodies = [{"requests": [{"id": f"{c}{i}", "tokens": shared + [40 + i, c], "labels": [5, 6]} for i in range(2)]}
              for c in range(3)]  # fmt: skip
    with serving(app) as url:
        out: list = []
        threads = [_post_in_thread(f"{url}/score", bodies[0], out)]
        assert gated.entered.wait(30)
        threads += [_post_in_thread(f"{url}/score", b, out) for b in bodies[1:]]
        _wait(lambda: app.state.batch_queue.depth() == 4, "the two later calls did not queue")
        status, body = http(f"{url}/score", {"requests": [{"id": "late", "tokens": [5, 6]}]})
        assert status == 429 and "at most 3" in body["detail"] and "--max-concurrent-requests" in body["detail"]
        gated.release.set()
        for t in threads:
            t.join(60)
        assert [s for s, _ in out] == [200, 200, 200]
        assert len(gated.steps) == 2 and len(gated.steps[1]) == 4  # the two later calls shared a step
        for _, answer in out:
            for record in answer["scores"]:
                c, i = int(record["id"][0]), int(record["id"][1])
                r = Request(id=0, tokens=tuple(shared + [40 + i, c]), labels=(5, 6))
                assert rel_err(torch.tensor(record["logprobs"]), eager_value(model, r)) < 1e-5
        assert http(f"{url}/score", {"requests": [{"id": "after", "tokens": [5, 6]}]})[0] == 200  # slots freed


def test_http_a_disconnected_client_costs_no_compute(model):
    pytest.importorskip("fastapi")
    engine = PrefillEngine(model, compile=False, block_size=8)
    gated = Gated(engine)
    app = _app(model, gated)  # no timeout: only the disconnection can drop the call
    with serving(app) as url:
        out: list = []
        first = _post_in_thread(f"{url}/score", {"requests": [{"id": "first", "tokens": [5, 6, 7]}]}, out)
        assert gated.entered.wait(30)
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"requests": [{"id": f"gone{i}", "tokens": [5, 6, 7 + i]} for i in range(3)]}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            _wait(lambda: app.state.batch_queue.depth() == 3, "the call did not queue")
        # the client is gone: its requests leave the queue before any step takes them
        _wait(lambda: app.state.batch_queue.depth() == 0, "the disconnected call's requests stayed queued", 10)
        gated.release.set()
        first.join(30)
        assert out[0][0] == 200 and out[0][1]["scores"][0]["id"] == "first"
        status, answer = http(f"{url}/score", {"requests": [{"id": "next", "tokens": [5, 6, 8]}]})
        assert status == 200 and answer["scores"][0]["id"] == "next"
    assert [step for step in gated.steps] == [["first"], ["next"]]


def test_http_a_call_past_its_timeout_gets_504_and_its_queued_requests_are_dropped(model):
    pytest.importorskip("fastapi")
    engine = PrefillEngine(model, compile=False, block_size=8)
    gated = Gated(engine)
    app = _app(model, gated, request_timeout=1.0)
    with serving(app) as url:
        out: list = []
        first = _post_in_thread(f"{url}/score", {"requests": [{"id": "first", "tokens": [5, 6, 7]}]}, out)
        assert gated.entered.wait(30)
        status, body = http(f"{url}/score", {"requests": [{"id": "slow", "tokens": [5, 6, 9]}]})
        assert status == 504 and "within 1.0 s" in body["detail"] and "dropped" in body["detail"]
        assert app.state.batch_queue.depth() == 0
        gated.release.set()
        first.join(30)
        assert out[0][0] == 504  # it ran past its time too; it started, so it finished, unanswered
        assert http(f"{url}/score", {"requests": [{"id": "next", "tokens": [5, 6, 8]}]})[0] == 200
    assert gated.steps == [["first"], ["next"]]


def test_a_call_behind_a_big_one_joins_the_next_step(model):
    engine = PrefillEngine(model, compile=False, block_size=8, token_budget=64)
    gated = Gated(engine)
    queue = BatchQueue(gated, step_tokens=64)
    blocker = queue.submit([Request(id="x", tokens=tuple(range(3, 13)))])
    assert gated.entered.wait(30)
    big = queue.submit([Request(id=f"big{i}", tokens=tuple(range(3, 19))) for i in range(12)])  # 16 tokens each
    small = queue.submit([Request(id="small", tokens=tuple(range(30, 46)))])
    gated.release.set()
    for t in (blocker, big, small):
        t.wait(60)
    assert gated.steps[1] == ["big0", "small", "big1", "big2"]  # round robin: the small call is not held back
    assert [rid for step in gated.steps[2:] for rid in step] == [f"big{i}" for i in range(3, 12)]
    queue.stop(10)
