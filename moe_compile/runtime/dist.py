"""The process group the parallel modes run on, and what happens when it fails.

``parallel="aep"`` and ``parallel="ep"`` run on torch.distributed's default group:
start the ranks with ``torchrun`` and call ``torch.distributed.init_process_group``
(or :func:`init_distributed`, which also picks the backend and sets a timeout)
before the compiled model's first call. The passes read the group here
(:func:`current_world`); the world size is frozen into the compiled graph (shard
sizes, gather sizes), so every call of a compiled graph first checks it again
(:func:`guard_compiled`).

Failure behaviour, on the ranks that are still alive:

- a rank never joins: ``init_process_group`` raises after the timeout
  (:func:`init_distributed` says how many ranks joined);
- a rank dies or hangs after joining: the next collective fails, at once when its
  connections close (gloo: "Connection reset by peer"), else when the group's
  timeout expires; :func:`guard_compiled` re-raises it as :class:`CollectiveError`
  naming this rank, the world size and the timeout;
- the group's size differs from the one the graph was compiled for:
  :class:`WorldSizeMismatch` before any collective is issued.

Every rank must call the compiled model the same number of times (a rank without
requests runs an empty or dummy batch): the collectives of one call pair up
across ranks in order.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

#: seconds a collective (and the rendezvous of init_distributed) may wait for the other ranks
DEFAULT_TIMEOUT_S = 300.0
#: substrings of the errors gloo and NCCL raise when a peer is gone or a collective timed out
_TRANSPORT_MARKERS = ("/gloo/", "NCCL", "ProcessGroup", "Connection reset", "Connection closed", "Timed out")


class WorldSizeMismatch(RuntimeError):
    """The compiled graph was built for another world size than the current group's."""


class CollectiveError(RuntimeError):
    """A collective of a compiled graph failed: a rank died, hung, or ran a different schedule."""


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    group_name: str  # the name the functional collectives take (``"0"`` for the default group)


def current_world(mode: str) -> World:
    """The default group, or a clear error when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"moe_prefill option parallel={mode!r} needs torch.distributed initialised before the compiled "
            "model's first call: start the ranks with torchrun and call torch.distributed.init_process_group() "
            "(or moe_compile.runtime.init_distributed())"
        )
    group = dist.group.WORLD
    return World(dist.get_rank(), dist.get_world_size(), group.group_name)


def check_world(mode: str, compiled_for: World) -> None:
    """Raise :class:`WorldSizeMismatch` unless the default group still has the compiled world size."""
    if not dist.is_available() or not dist.is_initialized():
        raise WorldSizeMismatch(
            f"moe_compile parallel={mode!r}: this graph was compiled for {compiled_for.size} ranks, "
            "but torch.distributed is no longer initialised"
        )
    size = dist.get_world_size()
    if size != compiled_for.size:
        raise WorldSizeMismatch(
            f"moe_compile parallel={mode!r}: this graph was compiled for world size {compiled_for.size} "
            f"(its expert shards and gathers are sized for it), but the current group has {size} ranks; "
            "recompile (torch._dynamo.reset()) after changing the group"
        )


@dataclasses.dataclass(frozen=True)
class Agreement:
    """A value every rank must hold before a compiled graph's collectives can pair up (e.g. a checksum of the
    hot-expert sets), and what it stands for (for the error)."""

    value: int
    what: str


#: (value, world size, group) of the agreements the ranks were checked to hold, in this process
_AGREED: set[tuple[int, int, str]] = set()


def guard_compiled(compiled: Callable, mode: str, world: World, agree: Agreement | None = None) -> Callable:
    """``compiled`` preceded by :func:`check_world` (and, until it once passed in this process, by the check that
    every rank holds ``agree``), with collective failures given context.

    The agreement is checked at the first call, not while compiling: every rank calls the compiled model at the
    same point of its collectives (see the module docstring), while compiles happen under Dynamo's dispatch state
    and a compile served from a cache runs no pass.
    """

    @functools.wraps(compiled)
    def run(*args: Any) -> Any:
        check_world(mode, world)
        try:
            if agree is not None and (key := (agree.value, world.size, world.group_name)) not in _AGREED:
                check_same_on_all_ranks(agree.value, agree.what)  # NOTE: two small collectives, once per process
                _AGREED.add(key)
            return compiled(*args)
        except RuntimeError as exc:
            if isinstance(exc, WorldSizeMismatch) or not _is_collective_failure(exc):
                raise
            raise CollectiveError(
                f"moe_compile parallel={mode!r}: a collective failed on rank {world.rank} of {world.size} "
                "(another rank died, hung for longer than the process group's timeout, or called the model "
                f"a different number of times): {exc}"
            ) from exc

    return run


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return any(marker in str(exc) for marker in _TRANSPORT_MARKERS)


def check_same_on_all_ranks(value: int, what: str) -> None:
    """Raise ``ValueError`` on every rank unless every rank of the default group passed the same ``value``.

    NOTE: two all-reduces (MIN, MAX) on the default group; every rank must call this at the same point.
    """
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    low = torch.tensor([value], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():  # NOTE: host sync
        raise ValueError(
            f"moe_compile: the ranks disagree on {what} (rank {dist.get_rank()} of {dist.get_world_size()} has "
            f"checksum {value}, the group's range is [{low.item()}, {high.item()}]); give every rank the same "
            "file: the ranks' gathers must pair up"
        )


#: the dtypes ``--dtype`` / ``dtype=`` name, besides ``"auto"`` (the checkpoint's own dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device a rank runs on: ``"auto"`` (or None) is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    ``"cuda"`` is ``cuda:LOCAL_RANK``; ``"cuda:N"`` is GPU N. ``ValueError`` (one line, saying what to do)
    for CUDA without CUDA, a local rank (or N) beyond the GPUs there are, or a device that is neither.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device {text!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {text!r}: use auto, cpu, cuda or cuda:N (moe_compile serves on CUDA or the CPU)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r}: CUDA is not available on this machine; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    index = local_rank if dev.index is None else dev.index
    if index >= count:
        why = f"local rank {local_rank}" if dev.index is None else f"GPU {index}"
        raise ValueError(
            f"device {text!r}: {why} needs GPU {index}, but this machine has {count} GPU(s); start at most {count} "
            f"rank(s) per node (torchrun --nproc-per-node {count}) or name an existing device"
        )
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: None means ``"auto"`` on CUDA and float32 on the CPU; ``"auto"`` the checkpoint's own.

    ``ValueError`` for a dtype the device cannot run (bfloat16 on a GPU without it) or one not in :data:`DTYPES`.
    A checkpoint dtype that is not a compute dtype (fp8 and other quantised storage) resolves to bfloat16 on
    ``auto``: the weights are read as stored, the compute runs in bfloat16.
    """
    if dtype is None:
        dtype = "auto" if device.type == "cuda" else "float32"
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.bfloat16
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join([*DTYPES, 'auto'])}")
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype {resolved}: moe_compile computes in {', '.join(DTYPES)}; pick one of them")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(False):
        raise ValueError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} cannot run it; use --dtype float16")
    return resolved


def backend_for(device: torch.device) -> str:
    """The collective backend of ranks on ``device``: NCCL on CUDA, gloo on the CPU (chosen here only)."""
    return "nccl" if device.type == "cuda" else "gloo"


#: (the default group it was made beside, the gloo control group) while one exists (:func:`control_group`)
_CONTROL: tuple[Any, Any] | None = None


def control_group() -> Any:
    """The group of serving's control messages (requests, plans, answers, stop, errors).

    A gloo group made beside the default group by :func:`init_distributed` when the default group is
    NCCL (or when asked): NCCL's watchdog kills a process whose collective times out rather than
    raising, and NCCL moves only CUDA tensors, so the messages that decide what the ranks do next
    travel over gloo, where a lost peer is a bounded, catchable error. Otherwise the default group.
    """
    if _CONTROL is not None and dist.is_initialized() and _CONTROL[0] is dist.group.WORLD:
        return _CONTROL[1]
    return dist.group.WORLD


def make_control_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A gloo group of every rank beside the default group, with ``timeout_s``; :func:`control_group` returns it.

    NOTE: collective: every rank of the default group must call it.
    """
    global _CONTROL
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _CONTROL = (dist.group.WORLD, group)
    return group


def init_distributed(
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str | torch.device | None = None,
    control: bool | None = None,
) -> World:
    """``init_process_group`` from torchrun's environment, with a timeout, and the resulting world.

    ``backend``: :func:`backend_for` the rank's device (``device``, resolved by :func:`resolve_device`:
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU): ``"nccl"`` on CUDA, ``"gloo"`` on the CPU.
    On CUDA the rank's device is set (``torch.cuda.set_device``). A rank that does not join within
    ``timeout_s`` makes the others raise; collectives use the same timeout.

    ``control``: make a gloo group for serving's control messages beside the default group
    (:func:`control_group`, with the same timeout); None (default): when the backend is NCCL.
    """
    if backend is None:
        dev = resolve_device(device)
        backend = backend_for(dev)
    elif backend == "nccl":
        dev = resolve_device("cuda" if device is None else device)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    size = os.environ.get("WORLD_SIZE", "?")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(
            f"moe_compile: torch.distributed could not start {size} ranks within {timeout_s:g} s "
            f"(a rank never joined, or the rendezvous address is wrong): {exc}"
        ) from exc
    if control if control is not None else backend == "nccl":
        make_control_group(timeout_s)
    return current_world("init")
