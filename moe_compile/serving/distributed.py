"""Scoring over W data-parallel ranks: route, score the local share, gather.

Every rank runs :func:`score_routed` with the same requests, in the same order, and a
:class:`~moe_compile.serving.routing.Router` built the same way. Routing is
deterministic, so all ranks agree on the assignment without exchanging it; each rank
scores only its own requests with its own engine (its own prefix cache), and one
``all_gather_object`` gives every rank all the scores. With one rank and no process
group it is plain routing bookkeeping around ``engine.score``.

Bad requests (those the engine answers with an error) are not routed: rank 0 answers them.
The scores travel over the control group (:func:`~moe_compile.runtime.dist.control_group`): gloo,
also beside an NCCL default group, so that a lost rank is a bounded error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

from ..runtime.dist import control_group
from .engine import PrefillEngine
from .requests import Request, Score
from .routing import Router


def score_routed(
    engine: PrefillEngine, requests: Sequence[Request], router: Router, group: dist.ProcessGroup | None = None
) -> list[Score]:
    """Scores of ``requests`` in order, each computed on the rank the router chose (see the module docstring).

    ``group``: where the scores are gathered (default: :func:`~moe_compile.runtime.dist.control_group`, gloo
    beside an NCCL default group).
    """
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and group is None:
        group = control_group()
    rank = dist.get_rank(group) if distributed else 0
    world_size = dist.get_world_size(group) if distributed else 1
    if router.world_size != world_size:
        raise ValueError(f"the router spreads over {router.world_size} ranks but the group has {world_size}")
    owner: list[int] = []
    for request in requests:
        prepared = engine.prepare(request)
        # NOTE: prepare() runs again inside engine.score(); tokenizing twice keeps score() self-contained
        if isinstance(prepared, Score):
            owner.append(0)
        else:
            owner.append(router.assign(prepared.tokens, prepared.limit, len(prepared.reads)).rank)
    mine = [i for i, r in enumerate(owner) if r == rank]
    local = engine.score([requests[i] for i in mine])
    for score in local:
        score.rank = rank
    if world_size == 1:
        return local
    gathered: list[list[tuple[int, Score]] | None] = [None] * world_size
    pairs = list(zip(mine, local, strict=True))
    dist.all_gather_object(gathered, pairs, group=group)  # NOTE: collective, blocks every rank
    scores: list[Score | None] = [None] * len(requests)
    for part in gathered:
        for i, score in part:
            scores[i] = score
    return scores
