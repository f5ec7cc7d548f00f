"""Expert shards: this rank's slice of each expert tensor, and the release of the full tensors.

Rank ``r`` of ``W`` owns the contiguous block of experts ``[r*E/W, (r+1)*E/W)`` of
every MoE layer, so that gathering the shards along dim 0 in rank order
(``all_gather_into_tensor``) rebuilds each full tensor in expert order::

    full  w_up [E, N, H]  ->  shard on rank r: w_up[r*E/W : (r+1)*E/W]  [E/W, N, H]
    all_gather_into_tensor(shard, W)  ->  [E, N, H], equal to full

With ``R`` resident ("hot") experts (``hot_experts``), every rank keeps those ``R`` whole
(:func:`resident`) and the other ``E - R``, in id order, are split the same way
(:func:`sharded_experts`, :func:`shard` with ``resident``)::

    resident [R, N, H] = w_up[hot ids]; shard on rank r: w_up[others[r*(E-R)/W : (r+1)*(E-R)/W]]
    all_gather_into_tensor(shard, W)  ->  [E-R, N, H], equal to w_up[others]

Shards and resident copies are built once per full tensor and cached (keyed by world
size, rank and resident set), weakly keyed by the tensor: the parallel passes release
the full tensor's storage after the first compile, and a recompile (a new input shape,
say) finds its shards here instead.

Releasing (:func:`release`) resizes the tensor's storage to 0 bytes. The tensor
keeps its shape, dtype and strides, which is all Dynamo's guards look at, so the
compiled model keeps running; the eager model cannot (its expert weights are gone).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

#: full tensor -> {key: tensor built from it}; keys: ("shard", world size, rank, resident ids), ("resident", ids)
_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """The experts ``[start, stop)`` rank ``rank`` owns (``num_experts`` divisible by ``world_size``)."""
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def sharded_experts(num_experts: int, resident: tuple[int, ...] = ()) -> list[int]:
    """The experts that are sharded (not resident), in the order the gather lays them out."""
    kept = set(resident)
    return [e for e in range(num_experts) if e not in kept]


def shard(full: torch.Tensor, world_size: int, rank: int, resident: tuple[int, ...] = ()) -> torch.Tensor:
    """This rank's experts of ``full`` (``[E, ...] -> [(E-R)/W, ...]``), contiguous, built once.

    ``resident``: the ``R`` experts every rank keeps whole (:func:`resident`); the other ``E - R``
    (:func:`sharded_experts`, in id order) are split in contiguous blocks over the ranks.
    """

    def build() -> torch.Tensor:
        experts = sharded_experts(full.shape[0], resident)
        start, stop = expert_range(len(experts), world_size, rank)
        if not resident:
            return full[start:stop].detach().clone(memory_format=torch.contiguous_format)
        return full.detach()[torch.tensor(experts[start:stop], dtype=torch.long)].contiguous()  # [(E-R)/W, ...]

    return _cached(full, ("shard", world_size, rank, tuple(resident)), build, f"rank {rank} of {world_size}")


def resident(full: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """The experts ``experts`` of ``full`` (``[E, ...] -> [R, ...]``, in that order), contiguous, built once."""

    def build() -> torch.Tensor:
        return full.detach()[torch.tensor(experts, dtype=torch.long)].contiguous()  # [R, ...]

    return _cached(full, ("resident", tuple(experts)), build, f"resident experts {list(experts)}")


def _cached(full: torch.Tensor, key: tuple, build, what: str) -> torch.Tensor:
    per_tensor = _SHARDS.setdefault(full, {})
    if key not in per_tensor:
        if is_released(full):
            raise RuntimeError(
                f"an expert tensor of shape {tuple(full.shape)} was released (storage resized to 0) and no copy "
                f"for {what} was kept; rebuild the model to compile it for this world size or resident set"
            )
        per_tensor[key] = build()
    return per_tensor[key]


def is_released(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has elements but no storage left (see :func:`release`)."""
    return tensor.numel() > 0 and tensor.untyped_storage().nbytes() == 0


def release(full: torch.Tensor) -> int:
    """Free ``full``'s storage when ``full`` owns all of it; the bytes freed (0 if not released).

    Not released: a storage already released, one larger than the tensor (other
    tensors may use it), or one that cannot be resized (e.g. memory-mapped).
    """
    storage = full.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0 or nbytes != full.numel() * full.element_size() or not storage.resizable():
        return 0
    storage.resize_(0)
    return nbytes


def unallocated(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` with no storage (released from the start): the stand-in for a full expert tensor
    that a sharded loader never reads (:mod:`moe_compile.loading`), its shards registered with :func:`register`."""
    # NOTE: the allocation is never touched (CPU: no page becomes resident; CUDA: the block goes back to the
    # caching allocator at once and the next tensor reuses it)
    tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor.untyped_storage().resize_(0)
    return tensor


def register(
    full: torch.Tensor,
    world_size: int,
    rank: int,
    shard_tensor: torch.Tensor | None,
    resident_ids: tuple[int, ...] = (),
    resident_tensor: torch.Tensor | None = None,
) -> None:
    """Record ``shard_tensor`` as rank ``rank``'s shard of ``full`` (and ``resident_tensor`` as its resident
    experts ``resident_ids``), as :func:`shard` and :func:`resident` would have built them: the parallel
    passes then take them as they are, and ``full`` (:func:`unallocated`) is never read."""
    E, R = full.shape[0], len(resident_ids)
    per_tensor = _SHARDS.setdefault(full, {})
    if shard_tensor is not None:
        want = ((E - R) // world_size, *full.shape[1:])
        if tuple(shard_tensor.shape) != want:
            raise ValueError(
                f"shard of shape {tuple(shard_tensor.shape)} for a tensor {tuple(full.shape)}: want {want}"
            )
        per_tensor[("shard", world_size, rank, tuple(resident_ids))] = shard_tensor
    if resident_tensor is not None:
        per_tensor[("resident", tuple(resident_ids))] = resident_tensor


def registered(full: torch.Tensor) -> list[torch.Tensor]:
    """The shards and resident copies recorded for ``full`` (built or :func:`register`-ed)."""
    return list(_SHARDS.get(full, {}).values())


def resident_count(full: torch.Tensor) -> int:
    """How many experts of ``full`` are kept whole on every rank (the ``R`` of the copies recorded for it)."""
    return max((len(key[1]) for key in _SHARDS.get(full, {}) if key[0] == "resident"), default=0)
