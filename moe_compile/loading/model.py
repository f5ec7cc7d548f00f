"""Load a transformers checkpoint on its device, whole or with this rank's expert shards only.

::

    from moe_compile.loading import load_model

    model = load_model("ckpt/")  # device "auto": cuda:LOCAL_RANK where CUDA is, else the CPU
    # dtype: the checkpoint's on CUDA, float32 on the CPU (or "auto", "bfloat16", ...)
    fast = torch.compile(model, backend="moe_prefill")  # or PrefillEngine(model, ...)

    # under torchrun, after moe_compile.runtime.init_distributed():
    model = load_model("ckpt/", parallel="aep")  # this rank's 1/W of the experts, nothing more
    fast = torch.compile(model, backend="moe_prefill", options={"parallel": "aep"})

How (:func:`load_model`):

1. the model is built from its config on the meta device (accelerate's
   ``init_empty_weights``, buffers kept real: rotary tables and the like are computed
   by the modules' own ``__init__``);
2. every dense parameter is read whole from the safetensors files
   (:class:`~.checkpoint.Checkpoint`, keys mapped by transformers' conversion mapping,
   :func:`~.checkpoint.sources`), cast to the compute dtype and put on the device;
3. every expert tensor ``[E, ...]`` (:func:`~.checkpoint.expert_parameters`) is read
   whole without ``parallel``; with ``parallel="aep"``/``"ep"`` only this rank's experts
   ``[r*E/W, (r+1)*E/W)`` (or, with ``hot_experts=R``, the ``R`` resident experts and this
   rank's ``(E-R)/W`` of the others, :mod:`moe_compile.runtime.shards`' order) are read,
   and the parameter itself is a tensor of the full shape with no storage
   (:func:`moe_compile.runtime.shards.unallocated`) whose shards are registered
   (:func:`moe_compile.runtime.shards.register`): the parallel passes take them as they
   are, and the full expert set is never resident on the rank (on CUDA, each full tensor's block is
   allocated, never written, and handed back to the caching allocator at once: one tensor's size is
   reserved for a moment, per expert tensor in turn; a placeholder with no allocation at all is future work);
4. tied weights are tied (``model.tie_weights()``); a parameter still on the meta
   device is a tensor the checkpoint lacks (:class:`~.checkpoint.CheckpointError`).

With several ranks (whenever the default group is initialised, sharded or not), every rank
reports how its load went before any raises (an ``all_gather_object`` on the default group):
a missing or damaged file on one rank makes every rank raise the same error naming it, and
no rank waits for a peer that has failed.

The eager model of a sharded load cannot run (its expert tensors have no storage):
compute references on a single-process load.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from ..runtime import dist as rdist
from ..runtime import shards
from .checkpoint import Checkpoint, CheckpointError, Source, expert_parameters, is_fp8_checkpoint, sources


@dataclasses.dataclass
class LoadInfo:
    """What :func:`load_model` kept, in tensor bytes (``model.moe_compile_load``)."""

    device: str
    dtype: str
    world_size: int
    rank: int
    dense_bytes: int  # dense parameters and buffers
    expert_bytes: int  # expert tensors kept on this rank (its shards and resident experts)
    full_expert_bytes: int  # what the full expert set would take
    expert_tensors: int


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    parallel: str | None = None,
    hot_experts: int = 0,
    routing_stats: str | Path | None = None,
    model_class=None,
) -> nn.Module:
    """The checkpoint at ``path`` as a model in eval mode on ``device`` (see the module's docstring).

    ``device``: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``
    (:func:`moe_compile.runtime.dist.resolve_device`); ``dtype``: None (``"auto"`` on CUDA,
    float32 on the CPU), ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``,
    ``"float16"`` or a ``torch.dtype`` (:func:`moe_compile.runtime.dist.resolve_dtype`);
    ``parallel``: None, or ``"aep"``/``"ep"`` to keep this rank's expert shards only (the
    default group must be initialised); ``hot_experts``/``routing_stats``: as the
    ``moe_prefill`` options of the same names, whose compile must match them;
    ``model_class``: default ``AutoModelForCausalLM``. What was kept: ``model.moe_compile_load``
    (:class:`LoadInfo`).
    """
    world_size, rank = 1, 0
    if parallel is not None:
        if parallel not in ("aep", "ep"):
            raise ValueError(f"parallel={parallel!r}: use None, 'aep' or 'ep'")
        world = rdist.current_world(parallel)
        world_size, rank = world.size, world.rank
    elif hot_experts:
        raise ValueError("hot_experts needs parallel='aep'")
    return on_every_rank(
        path, lambda: _load(path, device, dtype, world_size, rank, parallel, hot_experts, routing_stats, model_class)
    )


def on_every_rank(path: str | Path, load):
    """``load()``'s result; with several ranks (the default group initialised), every rank reports how its
    ``load()`` went before any raises, and a failure on any rank raises the same :class:`CheckpointError`
    on every rank (naming the first rank that failed and its error), so that no rank waits on a failed peer."""
    import torch.distributed as dist

    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1  # replicas too
    problem, model = None, None
    try:
        model = load()
    except Exception as exc:  # any failure (an OOM too) is reported to the peers before it is raised
        problem = f"{type(exc).__name__}: {exc}"
        if group == 1:
            raise
    if group > 1:
        problems: list = [None] * group
        dist.all_gather_object(problems, problem, group=rdist.control_group())  # NOTE: every rank, before any raises
        failed = [(r, p) for r, p in enumerate(problems) if p is not None]
        if failed:
            r, p = failed[0]
            raise CheckpointError(f"loading {path} failed on rank {r} of {group}: {p}")
    return model


def _load(path, device, dtype, world_size, rank, parallel, hot_experts, routing_stats, model_class) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    if is_fp8_checkpoint(path):
        raise CheckpointError(
            f"{path}: an fp8 checkpoint (quantization_config); load it with moe_compile.quant.loading.load_fp8_model "
            "(parallel='aep' too), which keeps the experts in fp8 with their scales (moe-compile score/serve do so "
            "by themselves)"
        )
    dev = rdist.resolve_device(device)
    checkpoint = Checkpoint(path)
    config = AutoConfig.from_pretrained(str(path))
    stored = checkpoint.dtype() or torch.float32
    compute = rdist.resolve_dtype(dtype, dev, stored)
    model_class = model_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=compute)
    model.eval()
    experts = expert_parameters(model)
    hot = _hot_sets(model, experts, hot_experts, routing_stats) if hot_experts else {}
    if world_size > 1:
        for name, E in experts.items():
            check_divides(name, E, len(hot.get(name, ())), world_size)
    found = sources(model, checkpoint)
    info = LoadInfo(str(dev), str(compute).removeprefix("torch."), world_size, rank, 0, 0, 0, len(experts))
    for name, param in list(model.named_parameters()):
        source = found.get(name)
        if source is None:
            continue  # tied, or missing: checked below
        # each tensor in the dtype transformers gives it (bf16 compute keeps rope and DeepSeek's router in fp32)
        if name in experts:
            value, register = _load_experts(checkpoint, source, param, experts[name], hot.get(name, ()), world_size,
                                            rank, parallel, param.dtype, dev, info)  # fmt: skip
        else:
            value, register = placed(_read_checked(checkpoint, source, param), param.dtype, dev), None
            info.dense_bytes += value.numel() * value.element_size()
        value = nn.Parameter(value, requires_grad=False)
        if register is not None:  # the shards are keyed by the parameter object the compile sees
            register(value)
        _set(model, name, value)
    persistent = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        source = found.get(name)
        if source is None and name in persistent:
            raise CheckpointError(
                f"{path}: no tensor for the buffer {name} in the checkpoint (a routing bias, say, would stay at its "
                "initial value); check the checkpoint, or load with from_pretrained"
            )
        value = _read_checked(checkpoint, source, buffer) if source is not None else buffer
        value = placed(value, buffer.dtype if value.is_floating_point() else value.dtype, dev)
        _set(model, name, value, buffer=True)
        info.dense_bytes += value.numel() * value.element_size()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(
            f"{path}: no tensor for {missing[0]} (and {len(missing) - 1} more) in the checkpoint, or one converted "
            "in a way the sharded loader does not read; check the checkpoint, or load with from_pretrained"
        )
    model.moe_compile_load = info
    return model


def check_divides(name: str, E: int, R: int, world_size: int) -> None:
    """ValueError unless the ``E - R`` experts of ``name`` that are not resident divide over ``world_size`` ranks."""
    if (E - R) % world_size:
        what = f"E={E} experts" if not R else f"E - R = {E - R} experts not resident (hot_experts={R})"
        raise ValueError(
            f"{name}: {what} do not divide evenly over {world_size} ranks; use a world size that divides "
            f"{E - R}" + (" or another hot_experts" if R else "")
        )


def _read_checked(checkpoint: Checkpoint, source: Source, like: torch.Tensor) -> torch.Tensor:
    value = source.read(checkpoint)
    if tuple(value.shape) != tuple(like.shape):
        raise CheckpointError(
            f"{checkpoint.path}: {source.name} has shape {tuple(value.shape)} in the checkpoint, the model's config "
            f"wants {tuple(like.shape)}"
        )
    return value


def _load_experts(checkpoint, source, param, E, resident, world_size, rank, parallel, compute, dev, info):
    row = param.numel() // E * torch.empty((), dtype=compute).element_size()
    info.full_expert_bytes += row * E
    if parallel is None:
        value = placed(_read_rows(checkpoint, source, param, list(range(E))), compute, dev)
        info.expert_bytes += value.numel() * value.element_size()
        return value, None
    others = shards.sharded_experts(E, resident)
    start, stop = shards.expert_range(len(others), world_size, rank)
    shard = placed(_read_rows(checkpoint, source, param, others[start:stop]), compute, dev)
    kept = placed(_read_rows(checkpoint, source, param, list(resident)), compute, dev) if resident else None
    full = shards.unallocated(tuple(param.shape), compute, dev)
    info.expert_bytes += sum(t.numel() * t.element_size() for t in (shard, kept) if t is not None)
    if len(resident) >= E:
        shard = None
    return full, lambda p: shards.register(p, world_size, rank, shard, resident, kept)


def _read_rows(checkpoint, source, param, ids: list[int]) -> torch.Tensor:
    value = source.read(checkpoint, ids)
    want = (len(ids), *param.shape[1:])
    if tuple(value.shape) != want:
        raise CheckpointError(
            f"{checkpoint.path}: {source.name} reads as {tuple(value.shape)} for {len(ids)} experts, the model's "
            f"config wants {want}"
        )
    return value


def placed(value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` cast (:func:`_cast`) and on ``device``, in memory of its own.

    safetensors' tensors are views of the file's memory map: one kept would keep the whole
    mapping alive, and every page of the file the load touched would stay in the process's RSS.
    """
    value = _cast(value, dtype).to(device)
    if value.device.type == "cpu" and not value.untyped_storage().resizable():  # still the file's pages
        value = value.clone()
    return value


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in the compute dtype; fp8 and integer storage are left as read (not upcast)."""
    if value.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and value.dtype != dtype:
        return value.to(dtype)
    return value


def _set(model: nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if buffer:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = value


def _hot_sets(model, experts: dict[str, int], r: int, routing_stats) -> dict[str, tuple[int, ...]]:
    """Expert parameter -> the ``r`` resident experts of its block, from ``routing_stats`` (as the compile picks)."""
    from ..routing_stats import RoutingStats

    if routing_stats is None:
        raise ValueError("hot_experts > 0 needs routing_stats (a file from moe-compile routing-stats)")
    stats = RoutingStats.load(routing_stats)
    out = {}
    for name in experts:
        block = name.rsplit(".", 2)[0]  # model.layers.0.mlp.experts.gate_up_proj -> model.layers.0.mlp
        if block not in stats.counts:
            raise ValueError(f"{routing_stats}: no counts for block {block}; made for another model?")
        out[name] = stats.hot(block, r)
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds expert tensors without storage (a sharded :func:`load_model`)."""
    return any(shards.is_released(model.get_parameter(n)) for n in expert_parameters(model))


@contextlib.contextmanager
def experts_zeroed_if_sharded(model: nn.Module):
    """Within: each experts module of a sharded model returns zeros (shape of its input), so that the eager
    model runs for what does not depend on the experts' values (the serving engine's probe: the logit head's
    check, the key/value cache's shapes). A model with its experts whole is left as it is."""
    if not is_sharded(model):
        yield
        return
    patched = []
    for name in {n.rsplit(".", 1)[0] for n in expert_parameters(model)}:
        module = model.get_submodule(name)
        module.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
