"""A checkpoint's safetensors files, and where each parameter of a model comes from in them.

The API the loaders build on (:mod:`.model` here; fp8 checkpoints: :mod:`moe_compile.quant.loading`):

- :class:`Checkpoint` -- the files of a checkpoint directory (``model.safetensors``, or the
  ``model.safetensors.index.json`` of a sharded one), each checked when opened: a missing or
  truncated file raises :class:`CheckpointError` naming it. :meth:`Checkpoint.read` reads a
  whole tensor or rows ``[start, stop)`` of its first dimension through
  ``safe_open(...).get_slice`` (only those bytes are read, in the dtype stored: nothing is
  upcast, fp8 stays fp8).
- :func:`sources` -- for every parameter of a model (built on the meta device), the
  checkpoint tensors it is made of: a :class:`Source` holding either one key (the same name,
  or a name transformers' conversion mapping renames) or, for a per-expert checkpoint,
  the per-expert keys of each expert and the operations that stack them
  (transformers' ``WeightConverter``: ``MergeModulelist`` then ``Concatenate``).
- :func:`expert_parameters` -- which parameters are expert tensors ``[E, ...]``: the direct
  parameters of a module named ``experts`` whose first dimension is the experts' count
  (as transformers' MoE blocks hold them: Qwen3-MoE, Mixtral, DeepSeek-V3, GPT-OSS).
- :meth:`Source.read` -- a parameter's value, or only the rows of the experts asked for.
- :func:`is_fp8_checkpoint` / :func:`quantization_config` -- whether ``config.json`` declares fp8
  (such a directory is read by :func:`moe_compile.quant.loading.load_fp8_model`, on this same reader).

Both expert layouts of real checkpoints are handled: per-expert tensors
(``mlp.experts.{e}.gate_proj.weight`` ..., what Qwen3-MoE, DeepSeek-V3 and Mixtral ship,
and what transformers writes by default, ``save_original_format=True``) are read expert by
expert, only the experts asked for; stacked ``[E, ...]`` tensors (GPT-OSS, and transformers
with ``save_original_format=False``) are read by row slices.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be read as the model needs it (a file missing or damaged, a tensor missing)."""


def quantization_config(path: str | Path) -> dict | None:
    """The ``quantization_config`` of ``path/config.json`` (or of its ``text_config``), None if it has none."""
    config = json.loads((Path(path) / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc


def is_fp8_checkpoint(path: str | Path) -> bool:
    """Whether ``path/config.json`` declares fp8 quantization (``quant_method == "fp8"``)."""
    qc = quantization_config(path)
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


class Checkpoint:
    """The safetensors files of the checkpoint directory ``path``; every file opened (and checked) at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {exc}") from None
            self.files = {key: self.path / name for key, name in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            self.files = None
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX}; save the model with save_pretrained()")
        self._handles: dict[Path, object] = {}
        names = sorted(set(self.files.values())) if self.files is not None else [self.path / SINGLE]
        for file in names:
            self._open(file)
        if self.files is None:
            handle = self._handles[self.path / SINGLE]
            self.files = dict.fromkeys(handle.keys(), self.path / SINGLE)
        else:
            for file in names:  # the index must name what the files hold
                missing = [k for k, f in self.files.items() if f == file and k not in self._keys[file]]
                if missing:
                    raise CheckpointError(
                        f"{file}: holds no tensor {missing[0]!r} (and {len(missing) - 1} more) that {INDEX} puts "
                        "there; the file is not the one the index was written with, copy the checkpoint again"
                    )

    def _open(self, file: Path):
        from safetensors import SafetensorError, safe_open

        if not file.is_file():
            raise CheckpointError(f"{file}: shard file missing (named by {INDEX}); copy the checkpoint again")
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({exc}); it is truncated or damaged, copy it again"
            ) from None
        self._handles[file] = handle
        self._keys = getattr(self, "_keys", {})
        self._keys[file] = set(handle.keys())
        return handle

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def _slice(self, key: str):
        return self._handles[self.files[key]].get_slice(key)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``key``, or its rows ``[start, stop)`` (dim 0), as stored (dtype unchanged), in host memory."""
        try:
            if start is None:
                return self._handles[self.files[key]].get_tensor(key)
            return self._slice(key)[start:stop]
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own types; name the file
            raise CheckpointError(f"{self.files[key]}: tensor {key!r} could not be read ({exc})") from None

    def dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's floating-point tensors (the most common one), None if it has none."""
        counts: dict[torch.dtype, int] = {}
        for key in self.files:
            dtype = _DTYPES.get(self._slice(key).get_dtype())
            if dtype is not None and dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def expert_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter name -> E, for the expert tensors ``[E, ...]`` of ``model`` (weights and biases).

    An expert tensor is a direct parameter of a module named ``experts`` whose 3-d parameters
    share one first dimension E, with that first dimension (biases ``[E, N]`` included).
    """
    found = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        params = dict(module.named_parameters(recurse=False))
        dims = {p.shape[0] for p in params.values() if p.dim() == 3}
        if len(dims) != 1:
            continue
        (E,) = dims
        found.update({f"{name}.{n}": E for n, p in params.items() if p.dim() >= 2 and p.shape[0] == E})
    return found


@dataclasses.dataclass
class Source:
    """Where one parameter's value is in a checkpoint."""

    name: str  # the parameter (the model's name)
    key: str | None = None  # one checkpoint tensor holding it (same layout)
    #: per-expert layout: source pattern -> {expert id: checkpoint key}, and transformers' converter
    experts: dict[str, dict[int, str]] | None = None
    converter: object | None = None

    def read(self, checkpoint: Checkpoint, experts: list[int] | None = None) -> torch.Tensor:
        """The value, or only the rows of ``experts`` (expert ids, in that order) of an expert tensor."""
        if self.key is not None:
            if experts is None:
                return checkpoint.read(self.key)
            parts = [checkpoint.read(self.key, a, b) for a, b in _runs(experts)]  # contiguous runs: few reads
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        assert self.experts is not None and self.converter is not None
        ids = experts
        if ids is None:
            ids = sorted(next(iter(self.experts.values())))
        per_pattern = {}
        for pattern in self.converter.source_patterns:
            have = self.experts.get(pattern, {})
            missing = [e for e in ids if e not in have]
            if missing:
                raise CheckpointError(
                    f"{checkpoint.path}: no tensor for expert {missing[0]} of {self.name} "
                    f"(looked for {pattern.replace('*', str(missing[0]))!r})"
                )
            per_pattern[pattern] = [checkpoint.read(have[e]) for e in ids]
        value = per_pattern
        for op in self.converter.operations:  # transformers' own: MergeModulelist(dim=0), Concatenate(dim>=1)
            value = op.convert(
                value, source_patterns=self.converter.source_patterns, target_patterns=self.converter.target_patterns
            )
        (tensor,) = value.values()
        return tensor


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted-run ranges ``[(start, stop), ...]`` covering ``ids`` in their order."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, e + 1])
    return [(a, b) for a, b in runs]


def sources(model: nn.Module, checkpoint: Checkpoint) -> dict[str, Source]:
    """Parameter or persistent buffer name -> its :class:`Source`, through transformers' conversion mapping.

    The checkpoint's keys are renamed as ``from_pretrained`` renames them (its ``WeightRenaming``
    and ``WeightConverter`` entries for this model); a converter whose source patterns hold ``*``
    (an expert index) makes a per-expert :class:`Source`. Names without a source are left out.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    found: dict[str, Source] = {}
    for key in checkpoint.keys():  # noqa: SIM118 -- a Checkpoint, not a dict
        renamed = key
        for transform in transforms:
            if isinstance(transform, WeightConverter):
                continue
            renamed, _ = transform.rename_source_key(renamed)
        for transform in transforms:
            if not isinstance(transform, WeightConverter):
                continue
            target, pattern = transform.rename_source_key(renamed)
            if pattern is None:
                continue
            if "*" not in pattern:
                break  # a converter of whole tensors: not one the sharded loader takes apart (see below)
            ok = all(
                isinstance(op, MergeModulelist) and op.dim == 0 or isinstance(op, Concatenate) and op.dim >= 1
                for op in transform.operations
            )
            if not ok:
                raise CheckpointError(
                    f"{checkpoint.path}: {key} is converted by {[type(op).__name__ for op in transform.operations]}, "
                    "which the sharded loader does not take apart expert by expert; load with from_pretrained"
                )
            regex = re.escape(pattern).replace(r"\*", r"(\d+)")
            match = re.search(regex, renamed)
            if match is None:
                break
            source = found.setdefault(target, Source(target, experts={}, converter=transform))
            source.experts.setdefault(pattern, {})[int(match.group(1))] = key
            break
        else:
            found.setdefault(renamed, Source(renamed, key=key))
    return found
