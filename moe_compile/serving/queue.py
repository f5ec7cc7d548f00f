"""A batching queue in front of the engine: the requests of concurrent calls share steps.

The HTTP front end (:mod:`~moe_compile.serving.http`) does not score a call on its own:
each call's requests join one queue (:meth:`BatchQueue.submit` returns a :class:`Ticket`),
and one worker thread runs *steps*. A step takes requests from the waiting calls, round robin
in arrival order (one request of each call in turn), until their prompt tokens reach ``step_tokens`` (the
engine's token budget; a longer request goes alone), and hands them to the backend's
``score`` in one engine call. So

- the requests of calls that arrive while a step runs join the next step, and a big call
  does not hold back the calls behind it for longer than its next step;
- prompts of different calls that share a prefix are computed once: within a step by the
  engine's shared-prefix pass, across steps by its prefix cache;
- a call whose client went away is cancelled (:meth:`BatchQueue.cancel`): its requests
  that no step has taken yet are dropped and never computed.

Exactness: a request's score does not depend on what it is batched with (float32: within
1e-5 relative of the same request scored alone; the engine's guarantee), so scores equal
those of the same calls one at a time. In bfloat16/float16 they equal them only to the
dtype's rounding: the rounding of a matmul depends on the batch's shape and on whether a
prefix came from the cache, both of which now depend on which calls arrived together
(docs/serving.md, "Which dtype").

The backend is anything with ``score(list[Request]) -> list[Score]``: a
:class:`~moe_compile.serving.engine.PrefillEngine`, or rank 0's
:class:`~moe_compile.serving.aep.LockstepScorer` under AEP (the queue then runs on rank 0's
front end and every step is one lockstep step over the ranks).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .requests import Request, Score

log = logging.getLogger(__name__)


class Cancelled(RuntimeError):
    """The call was cancelled (its client went away, or its time ran out) before all its requests ran."""


class Ticket:
    """One call's requests in the queue; :meth:`wait` (or ``on_done``) gives their scores in order."""

    def __init__(self, requests: Sequence[Request], lengths: Sequence[int], on_done: Callable | None = None) -> None:
        self.requests = list(requests)
        self.lengths = list(lengths)
        self.scores: list[Score | None] = [None] * len(self.requests)
        self.taken = 0  # requests handed to steps so far (a prefix of the call)
        self.finished = 0  # of which scored
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self._event = threading.Event()
        self._finish_lock = threading.Lock()
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def _finish(self) -> None:
        """Mark the call done and tell its waiter, once (the worker and ``cancel`` may both get here)."""
        with self._finish_lock:
            if self._event.is_set():
                return
            self._event.set()
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:  # a waiter gone (its event loop closed, say) must not stop the worker
                log.exception("batch queue: telling a finished call's waiter failed")

    def wait(self, timeout: float | None = None) -> list[Score]:
        """The scores (raises the step's error, or :class:`Cancelled`); TimeoutError after ``timeout`` seconds."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"the call's scores were not ready within {timeout} s")
        return self.result()

    def result(self) -> list[Score]:
        if self.error is not None:
            raise self.error
        if self.cancelled and self.finished < len(self.requests):
            raise Cancelled("the call was cancelled")
        return self.scores  # type: ignore[return-value]


class BatchQueue:
    """Runs the requests of submitted calls in shared steps on one worker thread (see the module docstring).

    Args:
        backend: has ``score(list[Request]) -> list[Score]``.
        step_tokens: prompt tokens per step (a request longer than that runs alone).
        length: a request's prompt length in tokens (the estimate steps are filled by).
        before_step: called on the worker before every step (e.g. waits for the warm-up; may raise,
            which fails the step's calls with that exception).
        on_step: called after every step with ``(requests, seconds)`` (metrics).
    """

    def __init__(
        self,
        backend: Any,
        step_tokens: int,
        length: Callable[[Request], int] | None = None,
        before_step: Callable[[], None] | None = None,
        on_step: Callable[[list[Request], float], None] | None = None,
    ) -> None:
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        self.backend = backend
        self.step_tokens = step_tokens
        self.length = length or (lambda r: len(r.tokens) if r.tokens is not None else len(r.text or ""))
        self.before_step = before_step
        self.on_step = on_step
        self.steps = 0
        self.running = 0  # requests in the step being run
        self._pending: collections.deque[Ticket] = collections.deque()  # calls with requests not yet taken
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="moe-compile-batch-queue", daemon=True)
        self._thread.start()

    # -- callers -----------------------------------------------------------------------------------------------

    def submit(self, requests: Sequence[Request], on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Queue one call's requests; ``on_done(ticket)`` runs on the worker when they are all scored."""
        ticket = Ticket(requests, [max(1, self.length(r)) for r in requests], on_done)
        if not ticket.requests:
            ticket._finish()
            return ticket
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batch queue is stopped")
            self._pending.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> int:
        """Drop the call's requests that no step has taken yet; how many were dropped."""
        with self._cond:
            if ticket.done:
                return 0
            ticket.cancelled = True
            dropped = len(ticket.requests) - ticket.taken
            if ticket in self._pending:
                self._pending.remove(ticket)
            finish = ticket.finished == ticket.taken  # none of its requests is in the running step
        if finish:
            ticket._finish()
        return dropped

    def depth(self) -> int:
        """Requests waiting for a step."""
        with self._cond:
            return sum(len(t.requests) - t.taken for t in self._pending)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued calls, then stop the worker."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------------------

    def _take(self) -> list[tuple[Ticket, int]]:
        """The next step's requests as (ticket, index), up to ``step_tokens``; under the lock.

        Round robin over the waiting calls in arrival order, one request of each in turn (each
        call's own requests in order), so a call that arrives behind a big one joins the next
        step instead of waiting for all of the big one's steps.
        """
        step: list[tuple[Ticket, int]] = []
        used = 0
        full = False
        while self._pending and not full:
            for ticket in self._pending:
                if ticket.taken == len(ticket.requests):
                    continue
                n = ticket.lengths[ticket.taken]
                if step and used + n > self.step_tokens:
                    full = True
                    break
                step.append((ticket, ticket.taken))
                ticket.taken += 1
                used += n
            self._pending = collections.deque(t for t in self._pending if t.taken < len(t.requests))
        return step

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if not self._pending:  # stopped and drained
                    return
                step = self._take()
                self.running = len(step)
            requests = [ticket.requests[i] for ticket, i in step]
            start = time.monotonic()
            scores: list[Score] | None = None
            error: BaseException | None = None
            try:
                if self.before_step is not None:
                    self.before_step()
                scores = self.backend.score(requests)
                if len(scores) != len(requests):
                    raise RuntimeError(f"the engine returned {len(scores)} scores for {len(requests)} requests")
            except BaseException as e:  # noqa: BLE001  (handed to the calls of this step)
                error = e
            finished = []
            with self._cond:
                self.running = 0
                self.steps += 1
                for k, (ticket, i) in enumerate(step):
                    if error is not None:
                        ticket.error = ticket.error or error
                    else:
                        ticket.scores[i] = scores[k]
                    ticket.finished += 1
                for ticket in dict.fromkeys(t for t, _ in step):
                    if ticket.error is not None and ticket in self._pending:  # a failed call runs no further
                        self._pending.remove(ticket)
                    if ticket.finished == ticket.taken and (ticket.taken == len(ticket.requests) or ticket.cancelled
                                                            or ticket.error is not None):  # fmt: skip
                        finished.append(ticket)
            if self.on_step is not None:
                try:
                    self.on_step(requests, time.monotonic() - start)
                except Exception:  # metrics are not worth the queue: log, and keep serving
                    log.exception("batch queue: the on_step callback failed")
            for ticket in finished:
                ticket._finish()


#: seconds between two checks, while a call waits, of whether its client went away or its time ran out
POLL_S = 0.2


async def wait_async(
    queue: BatchQueue,
    requests: Sequence[Request],
    is_disconnected: Callable[[], Any] | None = None,
    timeout: float | None = None,
) -> list[Score]:
    """Submit ``requests`` and wait for their scores on the running asyncio loop.

    ``is_disconnected``: a coroutine function; when it says the client went away, the call is
    cancelled (its requests not yet taken by a step are dropped) and :class:`Cancelled` raised.
    ``timeout``: seconds from submission; past it, the same cancellation and :class:`TimeoutError`.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def done(_ticket: Ticket) -> None:
        loop.call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))

    from starlette.concurrency import run_in_threadpool

    if all(r.tokens is not None for r in requests):
        ticket = queue.submit(requests, done)  # cheap: lengths are the token counts
    else:
        ticket = await run_in_threadpool(queue.submit, requests, done)  # lengths need the tokenizer
    deadline = None if timeout is None else ticket.submitted + timeout
    try:
        while not ready.done():
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(asyncio.shield(ready), wait)
            except asyncio.TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    queue.cancel(ticket)
                    raise Cancelled("the client disconnected") from None
                if deadline is not None and time.monotonic() >= deadline and not ready.done():
                    queue.cancel(ticket)
                    raise TimeoutError(f"the call did not finish within {timeout} s") from None
    except asyncio.CancelledError:
        queue.cancel(ticket)
        raise
    return ticket.result()
