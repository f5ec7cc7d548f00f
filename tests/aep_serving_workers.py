"""Workers for the AEP serving tests (spawned by :func:`dist_workers.spawn`): lockstep ranks behind rank 0.

Every rank builds the same model, compiles its engine with ``parallel="aep"`` (1/W of the
experts per rank) and joins a :class:`~moe_compile.serving.aep.LockstepScorer`; rank 0 drives
the calls, the others follow. Rank 0 compares every score with a plain eager forward of a
second, uncompiled copy of the model (the compile releases the engine model's full experts).
"""

from __future__ import annotations

import datetime
import random
import time

import torch
import torch.distributed as dist

from moe_compile.serving import Request

BLOCK = 8


def _model(name: str):
    if name == "tiny_moe":
        from transformers import AutoModelForCausalLM

        from moe_compile.predictor import TINY_MOE_DIR

        # the shipped checkpoint's first 3 of 10 layers (its dense layer and two MoE layers): a real checkpoint
        # read from safetensors, a third of the compile work
        return AutoModelForCausalLM.from_pretrained(str(TINY_MOE_DIR), dtype=torch.float32, num_hidden_layers=3).eval()
    from moe_compile.testing import zoo

    return zoo.build(name, seed=0, num_layers=2)


def _lockstep(model, world_size: int, slack: float = 100.0):
    from moe_compile.serving import FlopsModel, PrefillEngine, Router
    from moe_compile.serving.aep import LockstepScorer

    engine = PrefillEngine(model, token_budget=48, block_size=BLOCK, options={"parallel": "aep", "inductor": False})
    router = Router(world_size, FlopsModel.from_model(model), block_size=BLOCK, slack=slack)
    return engine, LockstepScorer(engine, router, heartbeat_s=0.5)


def uneven_calls(vocab: int, seed: int = 0) -> list[list[Request]]:
    """Five calls: four whose prompts all share one prefix (one rank takes them all, the other
    idles), then one with fresh prompts (the idle rank gets work), the shared prefix again and
    two bad requests (answered on rank 0, never routed)."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    shared = toks(2 * BLOCK + 3)
    calls = []
    for c in range(4):
        calls.append([Request(id=f"c{c}r{i}", tokens=tuple(shared + toks(2 + 3 * i + c)), labels=(5, 17, 42))
                      for i in range(3)])  # fmt: skip
    last = [Request(id=f"new{i}", tokens=tuple(toks(5 + 7 * i)), read=(-1, -3)) for i in range(4)]
    last.append(Request(id="pooled", tokens=tuple(shared + toks(4)), read="all", output="pooled"))
    last.append(Request(id="bad-token", tokens=(5, vocab + 7)))
    last.append(Request(id="bad-read", tokens=(5, 6), read=(9,)))
    calls.append(last)
    return calls


def aep_parity_worker(rank: int, world_size: int, families: tuple[str, ...]) -> dict:
    """Per family: rank 0 drives the uneven calls; every score vs eager, who scored what, padding per rank."""
    from serving_helpers import eager_value, rel_err

    out = {}
    for name in families:
        torch._dynamo.reset()
        model = _model(name)
        engine, lockstep = _lockstep(model, world_size)
        if rank != 0:
            lockstep.serve_worker()
            out[name] = {"padding_batches": engine.stats.padding_batches, "steps": lockstep.steps,
                         "requests": engine.stats.requests}  # fmt: skip
            continue
        lockstep.start()
        lockstep.warmup()  # compiles every graph kind on both ranks together: a lazy compile on one rank
        # while the other waits inside a compiled gather can outlast the group's timeout on a loaded machine
        calls = uneven_calls(model.config.get_text_config().vocab_size)
        answers = [lockstep.score(call) for call in calls]
        lockstep.stop()
        reference = _model(name)
        errors, ranks, messages = [], [], {}
        for call, scores in zip(calls, answers, strict=True):
            assert [s.id for s in scores] == [r.id for r in call]
            for request, score in zip(call, scores, strict=True):
                if score.error is not None:
                    messages[request.id] = score.error
                    continue
                errors.append(rel_err(score.value, eager_value(reference, request)))
                ranks.append((request.id, score.rank))
        out[name] = {"errors": errors, "ranks": ranks, "messages": messages, "steps": lockstep.steps,
                     "padding_batches": engine.stats.padding_batches}  # fmt: skip
    return out


class _Leave(Exception):
    """Raised on the failing rank to leave its loop at the first scoring step."""


def dead_rank_worker(rank: int, world_size: int, how: str) -> dict:
    """Rank 1 leaves ("exit") or stalls ("hang") at the first scoring step; rank 0 serves HTTP and must
    answer that call, a later call and /health with clear 503 errors within a bounded time."""
    from test_serving_cli import http, serving

    from moe_compile.serving.aep import ServingFailed
    from moe_compile.serving.http import create_app

    store = dist.distributed_c10d._get_default_store()
    model = _model("qwen3_moe")
    engine, lockstep = _lockstep(model, world_size)
    if rank == 1:
        real = lockstep._run_step

        def run_step(message):
            if message[0] != "score":
                return real(message)
            if how == "hang":
                store.wait(["rank0_failed"], datetime.timedelta(seconds=120))
            raise _Leave

        lockstep._run_step = run_step
        try:
            lockstep.serve_worker()
        except ServingFailed as e:
            assert isinstance(e.__cause__, _Leave), e
        if how == "hang":
            store.set("rank1_saw_it", "1")
        return {"left": True}
    lockstep.start()
    out = {}
    # no warm-up: the failing rank leaves at the first call, before any compile would pair up
    with serving(create_app(engine, runner=lockstep, warmup=False)) as url:
        assert http(f"{url}/health")[0] == 200
        start = time.monotonic()
        out["call"] = http(f"{url}/score", {"requests": [{"id": "a", "tokens": [5, 6, 7], "labels": [5]}]})
        out["seconds"] = time.monotonic() - start
        out["later"] = http(f"{url}/score", {"requests": [{"id": "b", "tokens": [5, 6], "labels": [5]}]})
        out["rerank"] = http(f"{url}/v1/score", {"text_1": "a", "text_2": "b"})
        out["health"] = http(f"{url}/health")
    if how == "hang":
        store.set("rank0_failed", "1")
        store.wait(["rank1_saw_it"], datetime.timedelta(seconds=120))
    lockstep.stop()
    return out


def front_worker(rank: int, world_size: int) -> dict:
    """Rank 0 serves HTTP over the lockstep ranks: concurrent calls through the batching queue, exact scores,
    and /metrics with one series per rank."""
    import threading

    from test_serving_cli import http, serving

    from moe_compile.serving.http import create_app

    model = _model("qwen3_moe")
    engine, lockstep = _lockstep(model, world_size, slack=0.25)
    if rank != 0:
        lockstep.serve_worker()
        return {"prompt_tokens": engine.stats.prompt_tokens, "requests": engine.stats.requests}
    lockstep.start()
    lockstep.warmup()
    vocab = model.config.get_text_config().vocab_size
    rng = random.Random(1)
    calls = [[{"id": f"k{c}r{i}", "tokens": [rng.randrange(3, vocab) for _ in range(6 + 3 * i + c)], "labels": [5, 9]}
              for i in range(3)] for c in range(8)]  # fmt: skip
    answers: dict = {}
    with serving(create_app(engine, runner=lockstep, warmup=False)) as url:

        def send(c: int, call: list) -> None:
            answers[c] = http(f"{url}/score", {"requests": call})

        threads = [threading.Thread(target=send, args=(c, call)) for c, call in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        from prometheus_client.parser import text_string_to_metric_families

        with __import__("urllib.request").request.urlopen(f"{url}/metrics", timeout=60) as response:
            text = response.read().decode()
    lockstep.stop()
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    reference = _model("qwen3_moe")
    from serving_helpers import eager_value, rel_err

    errors, ranks = [], set()
    for c, call in enumerate(calls):
        status, body = answers[c]
        assert status == 200, body
        for request, record in zip(call, body["scores"], strict=True):
            r = Request(id=0, tokens=tuple(request["tokens"]), labels=tuple(request["labels"]))
            errors.append(rel_err(torch.tensor(record["logprobs"]), eager_value(reference, r)))
            ranks.add(record["rank"])
    per_rank = {r: metrics[("moe_compile:prompt_tokens_total", (("rank", str(r)),))] for r in range(world_size)}
    return {"errors": errors, "ranks": sorted(ranks), "metrics_prompt_tokens": per_rank,
            "prompt_tokens": engine.stats.prompt_tokens}  # fmt: skip


BOOM = 77  # a prompt holding this token makes rank 1's decoder run out of memory (oom_worker)


def oom_worker(rank: int, world_size: int) -> dict:
    """Out of device memory under AEP, over a gloo control group made beside the default group.

    The group is initialised here with ``init_distributed(control=True)`` (on NCCL it is made without asking):
    every lockstep message must travel over that control group. Injected out-of-memory errors: (1) in the LM
    head, on both ranks, for request ``boom`` (40 tokens: alone in its batch under the budget of 48): outside the
    compiled decoder, so only that batch's request fails and the ranks keep serving, exactly; (2) inside rank
    1's compiled decoder for any batch holding :data:`BOOM`: the collectives stopped part-way, so the lockstep
    fails, and rank 0 says why within the group's timeout.
    """
    from serving_helpers import eager_value, rel_err

    from moe_compile.runtime.dist import control_group, init_distributed
    from moe_compile.serving.aep import DecoderOutOfMemory, ServingFailed

    init_distributed(backend="gloo", timeout_s=60, control=True)
    control = control_group()
    facts = {"control_is_separate": control is not dist.group.WORLD,
             "control_backend": dist.get_backend(control), "control_size": dist.get_world_size(control)}  # fmt: skip
    groups = []
    for name in ("broadcast_object_list", "gather_object", "barrier", "all_reduce"):
        real = getattr(dist, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            groups.append((_name, kwargs.get("group")))
            return _real(*args, **kwargs)

        setattr(dist, name, spy)  # this process only: the rank's own calls, seen from the torch.distributed module
    model = _model("qwen3_moe")
    engine, lockstep = _lockstep(model, world_size)
    facts["lockstep_control"] = lockstep.control is control
    read = engine._read

    def read_or_oom(rows, items, hidden):
        if any(it.request is not None and it.request.id == "boom" for it in items):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected in the head)")
        return read(rows, items, hidden)

    engine._read = read_or_oom
    if rank == 1:
        real_decoder, real_step, armed = lockstep._real, lockstep._run_step, []

        def run_step(message):  # armed after the warm-up, whose random prompts may hold BOOM
            out = real_step(message)
            armed.append(message[0] == "warmup")
            return out

        def decoder(**kw):
            if any(armed) and (kw["input_ids"] == BOOM).any():
                facts["decoder_oom"] = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            return real_decoder(**kw)

        lockstep._real, lockstep._run_step = decoder, run_step
        try:
            lockstep.serve_worker()
        except ServingFailed as e:
            facts["left_with"] = f"{type(e.__cause__).__name__}: {e}"
            facts["cause_is_oom"] = isinstance(e.__cause__, DecoderOutOfMemory)
        facts["oom_batches"] = engine.stats.oom_batches
        facts["control_calls"] = sorted({n for n, g in groups if g is control})
        facts["other_calls"] = sorted({n for n, g in groups if g is not control})
        return facts
    lockstep.start()
    lockstep.warmup()
    vocab = model.config.get_text_config().vocab_size
    rng = random.Random(2)

    def fresh(prefix: str, n: int, boom: bool = False) -> list[Request]:
        return [Request(id=f"{prefix}{i}", labels=(5, 9), tokens=tuple(
            [rng.randrange(80, vocab) for _ in range(5 + 2 * i)] + ([BOOM] if boom else [])))
            for i in range(n)]  # fmt: skip

    reference = _model("qwen3_moe")
    first = [*fresh("a", 3), Request(id="boom", tokens=tuple(range(5, 45)), labels=(5,)), *fresh("b", 2)]
    second = fresh("c", 4)
    answers = [lockstep.score(first), lockstep.score(second)]
    facts["errors"] = {s.id: s.error for s in answers[0] + answers[1] if s.error is not None}
    facts["oom_flags"] = [s.id for s in answers[0] + answers[1] if s.out_of_memory]
    facts["max_err"] = max(rel_err(s.value, eager_value(reference, r))
                           for call, scores in zip([first, second], answers, strict=True)
                           for r, s in zip(call, scores, strict=True) if s.error is None)  # fmt: skip
    facts["ranks"] = sorted({s.rank for s in answers[0] + answers[1]})
    start = time.monotonic()
    try:
        lockstep.score(fresh("d", 6, boom=True))  # spread over both ranks: rank 1's decoder runs out
        facts["third"] = "scored"
    except ServingFailed as e:
        facts["third"] = str(e)
    facts["seconds"] = time.monotonic() - start
    facts["health"] = lockstep.health()
    lockstep.stop()
    facts["control_calls"] = sorted({n for n, g in groups if g is control})
    facts["other_calls"] = sorted({n for n, g in groups if g is not control})
    return facts
