"""AEP with a predictor: experts reach a rank's layer buffer from the other ranks' shards, as wanted.

Legend: ``E`` experts, ``W`` ranks, ``r`` this rank, ``n = E/W`` experts per rank, ``m`` experts
the busiest rank sends in one fetch, ``B`` bytes of one expert (all its tensors, packed).

:class:`RanksSource` is the source of an :class:`~.store.ExpertStore` used by
:mod:`moe_compile.passes.predicted_gather`: rank ``r`` keeps its shard ``[r*n, (r+1)*n)`` of every
expert tensor (:mod:`moe_compile.runtime.shards`); the store's ring, prefetch / on-demand protocol and counts are
unchanged. One fetch, for the experts this rank wants (predicted, or routed and not resident)::

    wanted_E   = 1 at this rank's wanted experts                             int32 [E]
    all_reduce(wanted_E, MAX)                  # NOTE: collective + host sync: the union over ranks
    union_WN   = wanted_E.view(W, n)           # what each rank must send: its own experts in the union
    m          = max over ranks of the count   # all ranks agree: same union
    send_MB    = this rank's experts in the union, packed, padded to m rows        uint8 [m, B]
    recv_WmB   = all_gather_into_tensor(send_MB, async_op=True)                    uint8 [W*m, B]
    finish: wait, then each received expert's row unpacked into its row of the layer buffer

When some rank owns ``n`` experts of the union (``m == n``), everything is gathered: the plain
all-gather of the shards (the same bytes on the link, every expert resident), one per tensor of the
layer, straight into the buffer, as plain AEP does (no packing, no copy). Every rank takes part in
every fetch, in the same order, also when it wants nothing (its ``wanted_E`` is zeros): the
collectives pair up across ranks. The union is empty on every rank at once, and then no gather is
issued. Otherwise one collective gathers all the layer's tensors (packed per expert, each role's
bytes aligned), so the link sees one transfer per fetch; the padding rows (``W*m`` minus the union)
are the price of an equal-size all-gather (gloo has no all-gather of uneven sizes).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..dist import World
from .sources import Fetch

__all__ = ["RanksSource"]

#: all_gather_into_tensor, renamed all_gather_single in recent torch (the old name warns there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_ALIGN = 16  # bytes: each role's bytes, and each packed row, start at a multiple (any dtype's view works)


@dataclasses.dataclass
class _Role:
    name: str
    shard: torch.Tensor  # [n, ...] this rank's experts
    offset: int  # bytes into a packed row
    nbytes: int  # bytes of one expert of this role


@dataclasses.dataclass
class _Layer:
    roles: list[_Role]
    row_bytes: int  # B: one packed expert, aligned

    @property
    def per_rank(self) -> int:
        return self.roles[0].shard.shape[0]


class RanksSource:
    """Every expert tensor sharded over the ranks (``[r*E/W, (r+1)*E/W)`` on rank ``r``); fetched by all-gather."""

    name = "aep gather"

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device
        self.layers: dict[int, _Layer] = {}

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Take this rank's shards (role -> ``[E/W, ...]``); the full ``[E, ...]`` layout of each role."""
        roles, offset = [], 0
        for name, shard in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
            nbytes = shard[0].numel() * shard.element_size()
            roles.append(_Role(name, shard.detach(), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.layers[layer] = _Layer(roles, offset)
        W = self.world.size
        return {
            role: (torch.Size([t.shape[0] * W, *t.shape[1:]]), t.dtype) for role, t in tensors.items()
        }  # the buffer's roles, in the caller's order

    @property
    def held_bytes(self) -> int:
        return sum(r.shard.numel() * r.shard.element_size() for layer in self.layers.values() for r in layer.roles)

    def fetch(self, layer: int, buffer: dict[str, torch.Tensor], experts: list[int], ahead: bool) -> Fetch:
        """Gather the union over ranks of every rank's ``experts`` into ``buffer``; finish waits and places them.

        ``ahead`` changes nothing here (the store finishes an on-demand fetch at once).
        """
        spec = self.layers[layer]
        W, r, n = self.world.size, self.world.rank, spec.per_rank
        wanted_E = torch.zeros(W * n, dtype=torch.int32, device=self.device)
        wanted_E[torch.tensor(experts, dtype=torch.long, device=self.device)] = 1
        # NOTE: collective + host sync: every rank's wanted experts, their union read on the host.
        dist.all_reduce(wanted_E, op=dist.ReduceOp.MAX)
        union_WN = wanted_E.view(W, n).bool().cpu()  # [W, n]
        m = int(union_WN.sum(1).max())
        if m == 0:
            return Fetch([])
        if m == n:  # the same bytes on the link as the union: every shard, straight into the buffer
            return self._gather_all(spec, buffer)
        local_C = union_WN[r].nonzero().flatten().to(self.device)  # [c] this rank's experts to send
        send_MB = torch.empty(m, spec.row_bytes, dtype=torch.uint8, device=self.device)  # rows past c: padding
        for role in spec.roles:
            rows = send_MB[: local_C.numel(), role.offset : role.offset + role.nbytes]  # [c, bytes] uint8
            rows.view(role.shard.dtype).copy_(role.shard.index_select(0, local_C).flatten(1))
        recv_RB = torch.empty(W * m, spec.row_bytes, dtype=torch.uint8, device=self.device)  # [W*m, B]
        # NOTE: collective, asynchronous: waited on in finish (moe_offload, for a prefetch).
        work = _all_gather(recv_RB, send_MB, async_op=True)
        in_flight = [send_MB]  # read asynchronously: alive, its memory not reused, until the gather is done
        ids, positions = [], []  # expert id, its row in recv_RB
        for q in range(W):
            for j, local in enumerate(union_WN[q].nonzero().flatten().tolist()):
                ids.append(q * n + local)
                positions.append(q * m + j)

        def finish() -> None:
            work.wait()
            in_flight.clear()
            ids_S = torch.tensor(ids, dtype=torch.long, device=self.device)  # [S]
            rows_SB = recv_RB.index_select(0, torch.tensor(positions, device=self.device))  # [S, B]
            for role in spec.roles:
                target = buffer[role.name]  # [E, ...]
                got = rows_SB[:, role.offset : role.offset + role.nbytes].view(role.shard.dtype)  # [S, numel]
                target.index_copy_(0, ids_S, got.view(len(ids), *target.shape[1:]))  # rows at their expert ids

        return Fetch(ids, finish, padding_rows=W * m - len(ids), transfers=1)

    def _gather_all(self, spec: _Layer, buffer: dict[str, torch.Tensor]) -> Fetch:
        """Every rank's whole shard, gathered in rank order straight into ``buffer`` (``[E, ...]``, expert order)."""
        # NOTE: collectives, asynchronous (one per tensor of the layer, no packing copy): waited on in finish.
        works = [_all_gather(buffer[role.name], role.shard, async_op=True) for role in spec.roles]

        def finish() -> None:
            for work in works:
                work.wait()

        return Fetch(list(range(self.world.size * spec.per_rank)), finish, transfers=len(works))
