"""Routing prefill requests to W data-parallel ranks, with load tracked in true FLOPs.

Every rank is a full replica (the AEP layout: each rank runs all layers on its own
requests) with its own prefix cache. The router keeps, per rank, a value-less
:class:`~moe_compile.serving.prefix_cache.BlockStore` that mirrors which prefixes that
rank has cached, and its load: the FLOPs of the requests sent to it so far
(:class:`~moe_compile.serving.flops.FlopsModel`). A request's cost on rank ``r`` counts
only the tokens rank ``r`` has not cached: prefix reuse saves FLOPs only on the rank
that holds the prefix.

Policies (``Router(policy=...)``):

- ``"prefix_flops"`` (default): send the request to the rank holding its longest cached
  prefix (ties: the least loaded), unless that rank's load after taking it would exceed
  the least-loaded rank's load after taking it by more than ``slack`` (a fraction):
  then send it to the least-loaded rank, which from then on caches the prefix too.
- ``"round_robin"``: rank ``i mod W`` for the ``i``-th request.
- ``"tokens"``: the rank with the fewest prompt tokens assigned so far.

All policies book the same true-FLOPs cost, so their loads compare. :class:`RoutingResult`
gives the computed FLOPs (the sum over ranks) and the makespan model (each rank's FLOPs
divided by its throughput; the makespan is the maximum).

Routing is deterministic: every rank of a data-parallel group can run the same router
on the same requests and agree on the assignment without communicating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .flops import FlopsModel
from .prefix_cache import BlockStore

POLICIES = ("prefix_flops", "round_robin", "tokens")


def reuse_limit(num_tokens: int, first_read: int) -> int:
    """How many leading tokens of a prompt may come from the cache: all before the first read position.

    At least one token always runs, and every read position must run (its hidden state is needed).
    """
    return min(first_read, num_tokens - 1)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Where one request goes and what it costs there."""

    rank: int
    cached_tokens: int
    flops: float


@dataclasses.dataclass(frozen=True)
class RoutingResult:
    """Per-rank totals of a routed workload."""

    flops: list[float]  # per rank
    tokens: list[int]  # prompt tokens per rank
    cached_tokens: list[int]  # of which reused from that rank's prefix cache
    requests: list[int]  # per rank

    @property
    def computed_flops(self) -> float:
        """FLOPs all ranks compute together."""
        return sum(self.flops)

    def makespan(self, throughput: Sequence[float] | None = None) -> float:
        """Time until the last rank finishes: ``max_r flops[r] / throughput[r]`` (FLOP/s; default 1 each)."""
        throughput = throughput or [1.0] * len(self.flops)
        if len(throughput) != len(self.flops):
            raise ValueError(f"{len(throughput)} throughputs for {len(self.flops)} ranks")
        return max(f / t for f, t in zip(self.flops, throughput, strict=True))


class Router:
    """Assigns requests to ``world_size`` ranks (see the module docstring for the policies)."""

    def __init__(
        self,
        world_size: int,
        flops: FlopsModel,
        *,
        policy: str = "prefix_flops",
        slack: float = 0.25,
        block_size: int = 16,
        cache_tokens: int = 65536,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        self.world_size = world_size
        self.flops_model = flops
        self.policy = policy
        self.slack = slack
        self.caches = [BlockStore(cache_tokens, block_size) for _ in range(world_size)]
        self.flops = [0.0] * world_size
        self.tokens = [0] * world_size
        self.cached_tokens = [0] * world_size
        self.requests = [0] * world_size

    def assign(self, tokens: Sequence[int], limit: int, reads: int = 1) -> Assignment:
        """Route one prompt; ``limit``: how many leading tokens may be reused (:func:`reuse_limit`)."""
        W = self.world_size
        cached = [len(cache.match(tokens, limit, touch=False)) * cache.block_size for cache in self.caches]
        cost = [self.flops_model.cost(len(tokens) - c, c, reads) for c in cached]  # per rank
        if self.policy == "round_robin":
            rank = sum(self.requests) % W
        elif self.policy == "tokens":
            rank = min(range(W), key=lambda r: (self.tokens[r], r))
        else:
            best = min(range(W), key=lambda r: (-cached[r], self.flops[r], r))
            least = min(range(W), key=lambda r: (self.flops[r] + cost[r], r))
            over = self.flops[best] + cost[best] > (1 + self.slack) * (self.flops[least] + cost[least])
            rank = least if over else best
        self.caches[rank].insert(tokens, [None] * (len(tokens) // self.caches[rank].block_size))
        self.flops[rank] += cost[rank]
        self.tokens[rank] += len(tokens)
        self.cached_tokens[rank] += cached[rank]
        self.requests[rank] += 1
        return Assignment(rank, cached[rank], cost[rank])

    def result(self) -> RoutingResult:
        """The per-rank totals so far."""
        return RoutingResult(list(self.flops), list(self.tokens), list(self.cached_tokens), list(self.requests))


def simulate(
    prompts: Sequence[Sequence[int]],
    flops: FlopsModel,
    world_size: int,
    policy: str,
    **router_kwargs,
) -> RoutingResult:
    """Route ``prompts`` (each read at its last token) in order with a fresh router; the per-rank totals."""
    router = Router(world_size, flops, policy=policy, **router_kwargs)
    for p in prompts:
        router.assign(p, reuse_limit(len(p), len(p) - 1))
    return router.result()
