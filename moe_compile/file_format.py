"""moe_compile's checked safetensors files: a format tag and version, JSON metadata, a checksum.

Used by the predictor files (:data:`moe_compile.predictor.checkpoint.PREDICTOR_FORMAT`) and the
routing statistics (:data:`moe_compile.routing_stats.STATS_FORMAT`). A file is plain safetensors
(nothing is unpickled) whose metadata holds, besides the format's own keys::

    format          the format's tag, e.g. "moe_compile.expert_predictors"
    format_version  "1"
    checksum        SHA-256 over every tensor's name, dtype, shape and bytes (:func:`checksum`)

:func:`read_file` checks, in order: the file exists and safetensors can parse it; the format and
version; the required metadata keys; the checksum (a flipped or truncated byte is caught here); the
JSON fields. Each failure raises the format's error type, naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["FileFormat", "checksum", "read_file", "write_file"]


@dataclasses.dataclass(frozen=True)
class FileFormat:
    """A kind of moe_compile safetensors file: its ``format`` tag, version, required metadata, how to remake one."""

    name: str  # the metadata "format" value
    version: int
    what: str  # in messages: "predictor", "routing statistics"
    required: tuple[str, ...]  # metadata keys besides format, format_version and checksum
    json_fields: tuple[str, ...]  # metadata values stored as JSON
    remake: str  # what to do about a bad file
    error: type[ValueError]


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_file(tensors: dict[str, torch.Tensor], path: str | Path, fmt: FileFormat, metadata: dict[str, Any]) -> None:
    """Write ``tensors`` with ``metadata`` (JSON fields encoded here), the format tag and a checksum."""
    encoded = {k: json.dumps(v, sort_keys=True) if k in fmt.json_fields else v for k, v in metadata.items()}
    encoded |= {"format": fmt.name, "format_version": str(fmt.version), "checksum": checksum(tensors)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=encoded)


def read_file(path: str | Path, fmt: FileFormat) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata (JSON fields decoded) of the ``fmt`` file at ``path``, checked for integrity."""
    path, error, remake = Path(path), fmt.error, fmt.remake
    if not path.is_file():
        raise error(f"{path}: no such {fmt.what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise error(f"{path}: not a readable safetensors file, corrupted or truncated ({err}); {remake}") from err
    if metadata.get("format") != fmt.name:
        raise error(
            f"{path}: not a moe_compile {fmt.what} file (metadata format is {metadata.get('format')!r}, "
            f"expected {fmt.name!r})"
        )
    if metadata.get("format_version") != str(fmt.version):
        raise error(
            f"{path}: {fmt.what} format version {metadata.get('format_version')!r}; this moe_compile reads "
            f"version {fmt.version}; {remake}"
        )
    missing = [key for key in (*fmt.required, "checksum") if key not in metadata]
    if missing:
        raise error(f"{path}: metadata lacks {', '.join(missing)}; {remake}")
    if checksum(tensors) != metadata["checksum"]:
        raise error(f"{path}: tensor data does not match its checksum: the file is corrupted; {remake}")
    try:
        decoded = {key: json.loads(value) if key in fmt.json_fields else value for key, value in metadata.items()}
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep to decode
        raise error(f"{path}: corrupted metadata ({type(err).__name__}: {str(err)[:200]}); {remake}") from None
    return tensors, decoded
