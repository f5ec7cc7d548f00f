"""Load a block-fp8 checkpoint directory with its weights kept in fp8 (any device, the CPU included), whole or with
this AEP rank's experts only.

transformers dequantizes an fp8 checkpoint to bf16 when it loads it on a CPU (twice the memory) and its fp8
modules need a Hub kernel to run. :func:`load_fp8_model` instead:

1. reads ``config.json`` and checks its ``quantization_config`` (:func:`fp8_block_size`):
   ``quant_method="fp8"``, ``fmt="e4m3"``, ``activation_scheme="dynamic"``, ``weight_block_size=[128, 128]``;
2. builds the model on the meta device and runs transformers' ``replace_with_fp8_linear`` (``FP8Experts``,
   ``FP8Linear``; ``modules_to_not_convert`` from the config, else ``lm_head``);
3. reads the tensors as stored through the package's one safetensors reader
   (:class:`moe_compile.loading.checkpoint.Checkpoint`: no upcast, row slices by ``get_slice``): fp8
   weights stay e4m3, their ``weight_scale_inv`` become fp32 (bf16 and ue8m0 scales converted exactly), the
   rest is cast to the dtype the model gives the parameter (``dtype``, or what the model keeps in fp32), each
   put on ``device``. Experts stored one tensor per expert (Qwen3-FP8: ``experts.{e}.gate_proj.weight``...)
   are stacked, gate then up, scales alike; fused ``gate_up_proj`` ``[E, 2I, H]`` tensors (and
   ``gate_up_proj_scale_inv`` ``[E, ceil(2I/128), ceil(H/128)]``) are read by rows;
4. runs :func:`moe_compile.prepare` (the fp8 modules become ``moe_compile::moe_fp8`` / ``fp8_linear``).

With ``parallel="aep"`` (the default group initialised, or ``world_size``/``rank`` given) rank ``r`` of ``W``
reads of every experts module only its experts ``[r*E/W, (r+1)*E/W)``: their fp8 weights and the rows of their
scales (per-expert tensors of those experts only; stacked ones by ``get_slice`` rows). Each expert tensor of
the prepared model (``FP8StackedExperts``: weights and scales) is a tensor of the full shape with no storage
(:func:`moe_compile.runtime.shards.unallocated`) whose rows are registered as this rank's shard
(:func:`moe_compile.runtime.shards.register`), as :func:`moe_compile.loading.load_model` does: the AEP
compile (``options={"parallel": "aep"}``) gathers the shards as they are, and the full fp8 expert set is never
resident on a rank. What was kept: ``model.moe_compile_load`` (:class:`moe_compile.loading.LoadInfo`). The
eager model of a sharded load cannot run its experts: compute references on a whole load.

Refused with one line naming the tensor: a block size other than 128x128, a missing ``weight_scale_inv``,
a scale whose shape is not the weight's block grid, a missing tensor, an expert count ``W`` does not divide.
With several ranks every rank reports how its load went before any raises
(:func:`moe_compile.loading.model.on_every_rank`): a scale missing from one rank's slice makes every rank
raise the same error, and no rank waits on a failed peer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..loading.checkpoint import Checkpoint, CheckpointError, is_fp8_checkpoint, quantization_config
from ..loading.model import LoadInfo, check_divides, on_every_rank, placed
from ..runtime import dist as rdist
from ..runtime import shards
from .fp8 import FP8_DTYPE, SUPPORTED_BLOCKS, check_weight_scales, scales_to_float32

__all__ = ["fp8_block_size", "is_fp8_checkpoint", "load_fp8_model"]

#: transformers' ``FP8Experts`` parameter -> the ``FP8StackedExperts`` one :func:`moe_compile.prepare` makes of it
_PREPARED = {
    "gate_up_proj": "w_up",
    "up_proj": "w_up",
    "down_proj": "w_down",
    "gate_up_proj_scale_inv": "w_up_scale",
    "up_proj_scale_inv": "w_up_scale",
    "down_proj_scale_inv": "w_down_scale",
}


def fp8_block_size(qc: dict, where: str = "quantization_config") -> tuple[int, int]:
    """The checked block of an fp8 ``quantization_config`` (ValueError naming what is wrong and what is supported)."""
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"{where}: quant_method={qc.get('quant_method')!r}, expected 'fp8'")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}: fmt={qc.get('fmt')!r} is not supported; fp8 weights must be e4m3")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"{where}: activation_scheme={qc.get('activation_scheme')!r} is not supported; "
            "only dynamic (per-token, per-128-channel) activation scales"
        )
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise ValueError(f"{where}: expert_dtype={qc.get('expert_dtype')!r} (FP4 experts) is not supported")
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError(f"{where}: no weight_block_size (per-tensor fp8) is not supported; only block-scaled fp8")
    block = tuple(int(b) for b in block)
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(
            f"{where}: weight_block_size {list(block)} is not supported; moe_compile runs block fp8 with "
            f"{' or '.join(str(list(b)) for b in SUPPORTED_BLOCKS)} blocks (DeepSeek-V3, Qwen3-FP8)"
        )
    return block


def _scale_key(weight_key: str) -> str:
    return weight_key.removesuffix(".weight") + (
        ".weight_scale_inv" if weight_key.endswith(".weight") else "_scale_inv"
    )


def _need(checkpoint: Checkpoint, key: str, what: str, start: int | None = None, stop: int | None = None):
    if key not in checkpoint:
        raise CheckpointError(f"{checkpoint.path}: {key} is missing ({what})")
    return checkpoint.read(key, start, stop)


def _scale(checkpoint: Checkpoint, weight_key: str, start: int | None = None, stop: int | None = None):
    key = _scale_key(weight_key)
    return scales_to_float32(_need(checkpoint, key, "the block scales of an fp8 weight", start, stop), key)


def _fp8(checkpoint: Checkpoint, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    t = _need(checkpoint, key, "an fp8 weight", start, stop)
    if t.dtype != FP8_DTYPE:
        raise CheckpointError(f"{checkpoint.path}: {key} is {t.dtype}, expected float8_e4m3fn in an fp8 checkpoint")
    return t


def _read_experts(
    checkpoint: Checkpoint, name: str, module: nn.Module, block: tuple[int, int], start: int, stop: int
) -> dict[str, torch.Tensor]:
    """``FP8Experts`` parameter name -> the rows of experts ``[start, stop)``: e4m3 weights and fp32 scales."""
    gated = bool(getattr(module, "has_gate", True))
    E = module.num_experts
    up = "gate_up_proj" if gated else "up_proj"
    out: dict[str, torch.Tensor] = {}
    if f"{name}.{up}" in checkpoint:  # already stacked [E, ...]: this rank's rows only
        for role, halves in ((up, 2 if gated else 1), ("down_proj", 1)):
            key = f"{name}.{role}"
            for k in (key, _scale_key(key)):
                if k in checkpoint and checkpoint.shape(k)[0] != E:
                    raise CheckpointError(
                        f"{checkpoint.path}: {k} holds {checkpoint.shape(k)[0]} experts, the model's config has {E}"
                    )
            w, s = _fp8(checkpoint, key, start, stop), _scale(checkpoint, key, start, stop)
            check_weight_scales(key, w, s, block, halves)
            out[role], out[f"{role}_scale_inv"] = w, s
        return out
    parts = ((up, ("gate_proj", "up_proj") if gated else ("up_proj",)), ("down_proj", ("down_proj",)))
    for role, projections in parts:
        ws, ss = [], []
        for e in range(start, stop):
            w_rows, s_rows = [], []
            for proj in projections:
                key = f"{name}.{e}.{proj}.weight"
                w, s = _fp8(checkpoint, key), _scale(checkpoint, key)
                check_weight_scales(key, w, s, block)  # each projection has its own grid
                w_rows.append(w)
                s_rows.append(s)
            ws.append(torch.cat(w_rows))
            ss.append(torch.cat(s_rows))
        w, s = torch.stack(ws), torch.stack(ss)
        check_weight_scales(f"{name}.{role}", w, s, block, 2 if len(projections) == 2 else 1)
        out[role], out[f"{role}_scale_inv"] = w, s
    return out


def _load_linear(checkpoint: Checkpoint, name: str, module: nn.Module, block, dtype, dev) -> int:
    key = f"{name}.weight"
    w, s = _fp8(checkpoint, key), _scale(checkpoint, key)
    check_weight_scales(key, w, s, block)
    module.weight = nn.Parameter(placed(w, w.dtype, dev), requires_grad=False)
    module.weight_scale_inv = nn.Parameter(placed(s, s.dtype, dev), requires_grad=False)
    kept = [module.weight, module.weight_scale_inv]
    if getattr(module, "bias", None) is not None:
        bias = _need(checkpoint, f"{name}.bias", "a bias")
        module.bias = nn.Parameter(placed(bias, dtype, dev), requires_grad=False)
        kept.append(module.bias)
    return sum(t.nbytes for t in kept)


def _materialize_buffers(model: nn.Module, config) -> None:
    """Buffers left on the meta device that the checkpoint does not hold (rotary tables, computed at
    construction) rebuilt on the CPU by constructing their module again."""
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        try:
            fresh = type(module)(config=config)
        except Exception as why:  # noqa: BLE001 - any failure is reported with the module
            raise ValueError(f"cannot rebuild the buffers {meta} of {name} ({type(module).__name__}): {why}") from why
        for b in meta:
            setattr(module, b, getattr(fresh, b))


def _world(parallel: str | None, world_size: int | None, rank: int | None) -> tuple[int, int]:
    """``(W, r)``: 1, 0 without ``parallel``; else the ones given, or the default group's (which they must match)."""
    if parallel is None:
        if (world_size or 1) != 1 or (rank or 0) != 0:
            raise ValueError(f"world_size={world_size}, rank={rank} need parallel='aep'")
        return 1, 0
    if parallel != "aep":
        raise ValueError(
            f"parallel={parallel!r}: use None or 'aep' (EP's AllToAll runtime has no fp8 path; it refuses fp8 blocks)"
        )
    if (world_size is None) != (rank is None):
        raise ValueError(f"world_size={world_size}, rank={rank}: give both, or neither (the default group's)")
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world = rdist.current_world(parallel)
        return world.size, world.rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"world_size={world_size}, rank={rank}: need world_size >= 1 and 0 <= rank < world_size")
    if grouped and (world_size, rank) != (dist.get_world_size(), dist.get_rank()):
        raise ValueError(
            f"world_size={world_size}, rank={rank} differ from the default group's ({dist.get_world_size()}, "
            f"{dist.get_rank()}), which the AEP compile shards for; leave them out"
        )
    return world_size, rank


def load_fp8_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    *,
    parallel: str | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """The causal LM in ``path`` with its fp8 weights kept in fp8, prepared for ``moe_prefill`` (module doc).

    ``dtype``: the compute dtype of the unquantized tensors; ``parallel``: None (every expert) or ``"aep"``
    (this rank's ``1/W`` of every experts module, as :func:`moe_compile.loading.load_model`); ``world_size``,
    ``rank``: default the initialised default group's; ``device``: ``"cpu"`` (default), ``"auto"``, ``"cuda"``,
    ``"cuda:N"`` (:func:`moe_compile.runtime.dist.resolve_device`). What was kept: ``model.moe_compile_load``.
    """
    W, r = _world(parallel, world_size, rank)
    return on_every_rank(path, lambda: _load(Path(path), dtype, parallel, W, r, device))


def _load(path: Path, dtype: torch.dtype, parallel: str | None, W: int, r: int, device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear, replace_with_fp8_linear

    import moe_compile

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    qc = quantization_config(path)
    if not isinstance(qc, dict):
        raise ValueError(f"{path}/config.json has no quantization_config: not an fp8 checkpoint")
    block = fp8_block_size(qc, f"{path}/config.json quantization_config")
    dev = rdist.resolve_device(device)
    checkpoint = Checkpoint(path)
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_with_fp8_linear(
        model,
        modules_to_not_convert=qc.get("modules_to_not_convert") or ["lm_head"],
        quantization_config=FineGrainedFP8Config(weight_block_size=block, activation_scheme="dynamic"),
        pre_quantized=True,
    )
    info = LoadInfo(str(dev), str(dtype).removeprefix("torch."), W, r, 0, 0, 0, 0)
    rows: dict[tuple[str, str], torch.Tensor] = {}  # (experts module, parameter) -> this rank's rows (aep)
    for name, module in model.named_modules():
        if isinstance(module, FP8Experts):
            E = module.num_experts
            check_divides(name, E, 0, W)
            start, stop = shards.expert_range(E, W, r)
            for role, value in _read_experts(checkpoint, name, module, block, start, stop).items():
                value = placed(value, value.dtype, dev)
                info.expert_bytes += value.nbytes
                info.full_expert_bytes += value.nbytes // (stop - start) * E
                info.expert_tensors += 1
                if parallel is not None:
                    rows[(name, role)] = value
                    value = shards.unallocated((E, *value.shape[1:]), value.dtype, dev)
                setattr(module, role, nn.Parameter(value, requires_grad=False))
        elif isinstance(module, FP8Linear):
            info.dense_bytes += _load_linear(checkpoint, name, module, block, dtype, dev)
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if name not in checkpoint:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise CheckpointError(f"{path}: {name} is missing from the checkpoint")
        owner, _, attr = name.rpartition(".")
        value = placed(checkpoint.read(name), p.dtype, dev)
        setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
        info.dense_bytes += value.nbytes
    if tied:
        model.tie_weights()
    for name, b in list(model.named_buffers()):
        if b is not None and b.is_meta and name in checkpoint:  # persistent buffers (a router's correction bias)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, placed(checkpoint.read(name), b.dtype, dev))
    _materialize_buffers(model, model.config.get_text_config())
    for module in model.modules():  # the rebuilt buffers (rotary tables) on the device too
        for b, t in module._buffers.items():
            if t is not None and t.device != dev:
                module._buffers[b] = t.to(dev)
    info.dense_bytes += sum(b.nbytes for b in model.buffers())
    moe_compile.prepare(model.eval())
    if rows:
        _register(model, rows, W, r)
    model.moe_compile_load = info
    return model


def _register(model: nn.Module, rows: dict[tuple[str, str], torch.Tensor], W: int, r: int) -> None:
    """This rank's rows registered as the shards of the prepared experts' full (unallocated) tensors."""
    from ..prepare import prepare_report
    from .prepare_fp8 import FP8StackedExperts

    why = dict(prepare_report(model))
    for (name, role), value in rows.items():
        module = model.get_submodule(name)
        if not isinstance(module, FP8StackedExperts):
            raise ValueError(
                f"{name}: moe_compile.prepare left these fp8 experts alone ({why.get(name, 'no reason given')}); "
                "parallel='aep' shards prepared fp8 experts only"
            )
        shards.register(getattr(module, _PREPARED[role]), W, r, value)
