"""AEP serving: W ranks, each a data-parallel replica holding 1/W of the experts, behind one endpoint.

::

    torchrun --nproc-per-node W --no-python moe-compile serve --model DIR --parallel aep --port P
    torchrun --nproc-per-node W --no-python moe-compile score --model DIR --parallel aep --input I --output O

Every rank runs the decoder compiled with ``parallel="aep"``: its MoE layers gather the
expert weights of all ranks ahead of use, so every call of the compiled decoder issues the
same collectives on every rank, and **every rank must call it equally often**. This module
keeps the ranks in that lockstep:

- **rank 0 takes requests** (HTTP or JSON lines) and hands each call to
  :meth:`LockstepScorer.score`. A driver thread on rank 0 turns calls into *steps*: it checks
  each request on rank 0 (:meth:`PrefillEngine.prepare`: tokenizing, lengths, vocabulary,
  read positions; a bad request is answered there and never reaches another rank, so it
  cannot stall the lockstep), routes the good ones by cached prefix and true FLOPs
  (:class:`~moe_compile.serving.routing.Router`, which mirrors which rank holds which
  prefix), and broadcasts the step's plan (``broadcast_object_list``).
- **every rank runs its share** with its own engine and its own prefix cache. Before each
  real decoder call a rank all-reduces "I have a batch" (1); a rank that has finished its
  share keeps all-reducing 0 and runs a minimal padding batch
  (:meth:`PrefillEngine.pad_forward`) as long as any rank still has one. So each rank runs
  one batch per round, its own or padding, and the compiled graphs' collectives always pair up,
  however uneven the load (a rank with no requests at all runs only padding).
- **answers return to rank 0** (``gather_object``) in the call's order.
- **idle**: while no call arrives, rank 0 broadcasts a heartbeat every ``heartbeat_s``
  seconds, so the other ranks' waits never reach the process group's timeout.

Failure: every collective runs under the process group's timeout (``moe-compile ... --dist-timeout``,
:func:`moe_compile.runtime.init_distributed`). A rank that dies makes the next collective fail
at once (its connections close); one that hangs makes it fail after the timeout. Rank 0 then
marks the scorer failed: the call in flight and every later call raise :class:`ServingFailed`
naming the failure (HTTP: 503; ``/health``: 503 ``{"status": "failed"}``), within at most
``heartbeat_s + timeout`` even when idle. The other ranks leave their loop with the error.

Exactness: each request is scored by one rank's engine exactly as a single engine would
(padding batches touch no request and no cache), so every score equals a plain eager
forward of that request within float32 rounding.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.dist import control_group
from .engine import EngineStats, PrefillEngine
from .requests import Request, Score
from .routing import Router

#: seconds between heartbeats of an idle rank 0 (well under any sensible process-group timeout)
HEARTBEAT_S = 2.0


class ServingFailed(RuntimeError):
    """A rank died, hung or failed: the lockstep is broken and no more requests can be scored."""


class DecoderOutOfMemory(RuntimeError):
    """A rank ran out of device memory inside the compiled decoder: its collectives stopped part-way, so the
    ranks' collectives cannot pair up again; the lockstep fails (see the module docstring)."""


class LockstepScorer:
    """Scores calls over the ranks of the default process group in lockstep (see the module docstring).

    Build one on every rank with an engine compiled with ``parallel="aep"``. On rank 0 call
    :meth:`start`, then :meth:`warmup` / :meth:`score` (from any thread) and finally :meth:`stop`;
    on the other ranks call :meth:`serve_worker`, which returns when rank 0 stops (or raises
    when the lockstep breaks).
    """

    def __init__(self, engine: PrefillEngine, router: Router, heartbeat_s: float = HEARTBEAT_S) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("lockstep serving needs torch.distributed initialised (start the ranks with torchrun)")
        self.engine = engine
        self.router = router
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if router.world_size != self.world_size:
            raise ValueError(f"the router spreads over {router.world_size} ranks but the group has {self.world_size}")
        self.heartbeat_s = heartbeat_s
        #: the group of the plans, answers, heartbeats and "I have a batch" flags: gloo beside an NCCL default
        #: group (runtime.dist.control_group), where a lost peer is a bounded error, not a watchdog kill
        self.control = control_group()
        self.failed: str | None = None
        self.steps = 0
        #: every rank's engine counters as of its last step (rank 0 only; ``/metrics`` per rank)
        self.rank_stats: dict[int, dict[str, Any]] = {
            r: dataclasses.asdict(EngineStats()) for r in range(self.world_size)
        }
        self._real = engine._decoder
        engine._decoder = self._stepped  # every real decoder call first says "I have a batch"
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- every rank --------------------------------------------------------------------------------------------

    @property
    def model(self):
        return self.engine.model

    @property
    def stats(self):
        return self.engine.stats

    def _sync(self, active: int) -> bool:
        """All-reduce (sum) whether each rank has a batch to run now; True while any has."""
        flag = torch.tensor([active], dtype=torch.int64)
        dist.all_reduce(flag, group=self.control)  # NOTE: collective, one per round on every rank
        return flag.item() > 0

    def _stepped(self, **kwargs: Any) -> Any:
        self._sync(1)
        try:
            return self._real(**kwargs)
        except torch.OutOfMemoryError as e:  # not the engine's per-batch failure: the collectives broke off
            raise self._decoder_oom(e, kwargs["input_ids"].numel()) from None

    def _decoder_oom(self, exc: BaseException, tokens: int) -> DecoderOutOfMemory:
        return DecoderOutOfMemory(
            f"rank {self.rank} of {self.world_size} ran out of device memory inside the compiled decoder (a batch of "
            f"{tokens} padded tokens), part-way through its expert gathers, which cannot be resumed in step with the "
            f"other ranks; restart with a smaller --token-budget (now {self.engine.token_budget}) or "
            f"--prefix-cache-tokens: {str(exc).splitlines()[0] if str(exc) else 'torch.OutOfMemoryError'}"
        )

    def _drain(self) -> None:
        """Run padding batches until no rank has a batch left."""
        while self._sync(0):
            try:
                self.engine.pad_forward(self._real)
            except torch.OutOfMemoryError as e:
                raise self._decoder_oom(e, 4) from None

    def _run_step(self, message: tuple) -> list[tuple[int, Score]] | None:
        """One step of the plan ``message`` on this rank; its scores (index, score), or None for no scores."""
        kind = message[0]
        if kind == "warmup":
            self.engine.warmup()  # the same decoder calls on every rank
            self._drain()
            return None
        if kind == "reset":
            self.engine.reset()
            return None
        _, plan = message
        mine = [(i, request) for i, request, rank in plan if rank == self.rank]
        try:
            local = self.engine.score([request for _, request in mine])
        except Exception as e:  # a collective failure propagates from _drain's next all-reduce
            if _is_transport(e) or isinstance(e, DecoderOutOfMemory):
                raise
            message_ = f"internal error on rank {self.rank}: {type(e).__name__}: {e}"
            local = [Score(request.id, request.output, error=message_) for _, request in mine]
        self._drain()
        for score in local:
            score.rank = self.rank
        return [(i, s) for (i, _), s in zip(mine, local, strict=True)]

    # -- ranks other than 0 ------------------------------------------------------------------------------------

    def serve_worker(self) -> None:
        """Follow rank 0's steps until it stops; :class:`ServingFailed` when the lockstep breaks."""
        if self.rank == 0:
            raise RuntimeError("serve_worker runs on the ranks other than 0; rank 0 calls start()")
        try:
            while True:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0, group=self.control)
                message = box[0]
                if message[0] == "stop":
                    return
                if message[0] == "noop":
                    continue
                scores = self._run_step(message)
                if scores is not None:  # with this rank's counters, for rank 0's per-rank metrics
                    dist.gather_object((scores, dataclasses.asdict(self.engine.stats)), None, dst=0, group=self.control)
                else:
                    dist.barrier(group=self.control)
                self.steps += 1
        except Exception as e:
            if isinstance(e, DecoderOutOfMemory):
                _tell_rank_0(str(e))  # rank 0 is blocked in a collective: the rendezvous store carries the cause
            raise ServingFailed(f"rank {self.rank} of {self.world_size}: the lockstep broke: {e}") from e

    # -- rank 0 ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start rank 0's driver thread (steps and heartbeats)."""
        if self.rank != 0:
            raise RuntimeError("start() runs on rank 0; the other ranks call serve_worker()")
        self._thread = threading.Thread(target=self._drive, name="moe-compile-lockstep", daemon=True)
        self._thread.start()

    def warmup(self) -> int:
        """Compile every batch kind on every rank (in lockstep); :class:`ServingFailed` if a rank failed."""
        self._submit(("warmup",))
        return 0

    def reset(self) -> None:
        """Empty every rank's prefix cache and zero its counters (and the router's view of them)."""
        self._submit(("reset",))
        self.rank_stats = {r: dataclasses.asdict(EngineStats()) for r in range(self.world_size)}
        old, cache = self.router, self.router.caches[0]
        self.router = Router(
            self.world_size,
            old.flops_model,
            policy=old.policy,
            slack=old.slack,
            block_size=cache.block_size,
            cache_tokens=cache.capacity_tokens,
        )

    def score(self, requests: Sequence[Request]) -> list[Score]:
        """Scores of ``requests`` in order, each computed on the rank the router chose; :class:`ServingFailed`."""
        return self._submit(("score", list(requests)))

    def stop(self) -> None:
        """Tell every rank to leave its loop; waits for the driver thread."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def health(self) -> str | None:
        """None while the lockstep holds, else the failure."""
        return self.failed

    def _submit(self, job: tuple) -> Any:
        if self.failed is not None:
            raise ServingFailed(self.failed)
        if self._thread is None or not self._thread.is_alive():
            raise ServingFailed("the lockstep driver is not running (start() was not called, or it stopped)")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()

    def _drive(self) -> None:
        while True:
            try:
                item = self._jobs.get(timeout=self.heartbeat_s)
            except queue.Empty:
                item = "noop"
            if self.failed is not None:  # answer whatever is queued, then stop driving
                if item not in (None, "noop"):
                    item[1].set_exception(ServingFailed(self.failed))
                if item is None:
                    return
                continue
            try:
                if item == "noop":
                    dist.broadcast_object_list([("noop",)], src=0, group=self.control)
                    continue
                if item is None:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.control)
                    return
                job, future = item
                try:
                    future.set_result(self._step0(job))
                except Exception as e:  # noqa: BLE001  (a broken lockstep: every rank's collective failed)
                    self._fail(e)
                    future.set_exception(ServingFailed(self.failed))
            except Exception as e:  # noqa: BLE001  (a heartbeat or stop that failed)
                self._fail(e)

    def _fail(self, exc: BaseException) -> None:
        cause = _told_by_a_rank()
        self.failed = (
            f"AEP serving failed on rank 0 of {self.world_size}: a rank died, hung for longer than the process "
            f"group's timeout, or failed; no more requests can be scored (restart the ranks): "
            f"{type(exc).__name__}: {exc}" + (f" (the cause, from another rank: {cause})" if cause else "")
        )
        traceback.print_exc()

    def _step0(self, job: tuple) -> Any:
        """One step driven by rank 0: check and route, broadcast the plan, run the local share, gather."""
        if job[0] in ("warmup", "reset"):
            dist.broadcast_object_list([job], src=0, group=self.control)
            self._run_step(job)
            dist.barrier(group=self.control)
            self.steps += 1
            return 0
        requests = job[1]
        answers: list[Score | None] = [None] * len(requests)
        plan = []
        for i, request in enumerate(requests):
            prepared = self.engine.prepare(request)  # checked here: a bad request never reaches a rank
            if isinstance(prepared, Score):
                answers[i] = prepared
            else:
                plan.append((i, request, self.router.assign(prepared.tokens, prepared.limit, len(prepared.reads)).rank))
        if plan:
            message = ("score", plan)
            dist.broadcast_object_list([message], src=0, group=self.control)
            local = self._run_step(message)
            gathered: list[Any] = [None] * self.world_size
            dist.gather_object((local, None), gathered, dst=0, group=self.control)
            gathered[0] = (local, dataclasses.asdict(self.engine.stats))
            for rank, (part, stats) in enumerate(gathered):
                for i, score in part:
                    answers[i] = score
                self.rank_stats[rank] = stats
            self.steps += 1
        self.engine.stats.requests += len(requests) - len(plan)  # the others were counted by the ranks' engines
        self.engine.stats.errors += len(requests) - len(plan)
        return answers


def _is_transport(exc: BaseException) -> bool:
    from ..runtime.dist import CollectiveError, _is_collective_failure

    return isinstance(exc, CollectiveError) or _is_collective_failure(exc)


#: the rendezvous store's key under which a failing rank leaves its cause for rank 0
_FAILURE_KEY = "moe_compile/lockstep_failure"


def _store() -> Any:
    from torch.distributed import distributed_c10d  # NOTE: the default group's store (torch-private accessor)

    return distributed_c10d._get_default_store()


def _tell_rank_0(message: str) -> None:
    """Leave ``message`` in the rendezvous store for rank 0's failure report (best effort)."""
    with contextlib.suppress(Exception):  # the store may be gone with the group: the failure is raised anyway
        _store().set(_FAILURE_KEY, message)


def _told_by_a_rank() -> str | None:
    """The cause another rank left in the store (:func:`_tell_rank_0`), or None."""
    try:
        store = _store()
        return store.get(_FAILURE_KEY).decode() if store.check([_FAILURE_KEY]) else None
    except Exception:  # noqa: BLE001
        return None
