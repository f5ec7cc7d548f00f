"""Text every machine has offline: the Python standard library's sources, as byte-level token ids.

Vocabulary (ByT5's convention, so ``transformers.ByT5Tokenizer(extra_ids=0)`` encodes identically):
ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>``; byte ``b`` is id ``b + 3``; 259 ids in all.

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except test suites, installed
packages, codec tables and machine-generated build data (:data:`EXCLUDED_DIRS`,
:data:`EXCLUDED_PREFIXES`). A file is held out when the first byte of the SHA-1 of its path relative to
the stdlib root is a multiple of 10 (about 10% of the files), so the split is by file and the same on
every machine with the same Python version.

Legend: ``N`` tokens in a stream, ``B`` chunks, ``S`` tokens per chunk.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3  # byte b -> token id b + 3
VOCAB_SIZE = 256 + BYTE_OFFSET

#: directory names skipped anywhere under the stdlib root
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "lib-dynload"})
#: file or directory name prefixes skipped (generated per machine: ``_sysconfigdata_*``, ``config-3.x-*``)
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
#: suffixes read when a directory is passed as a text source
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
HELDOUT_MODULUS = 10

Split = Literal["train", "heldout", "all"]


def stdlib_root() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    """Whether the stdlib file at ``relative_path`` (POSIX form, relative to the stdlib root) is held out."""
    return hashlib.sha1(relative_path.encode()).digest()[0] % HELDOUT_MODULUS == 0


def stdlib_files(split: Split = "train") -> list[Path]:
    """The stdlib ``.py`` files of ``split``, sorted by relative path."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_PREFIXES) for part in relative.parts):
            continue
        if split == "all" or is_heldout(relative.as_posix()) == (split == "heldout"):
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no {split} .py files found under the standard library at {root}")
    return files


def expand_sources(sources: Iterable[str | Path]) -> list[Path]:
    """Files named by ``sources``; a directory stands for its files with a :data:`TEXT_SUFFIXES` suffix."""
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def encode(data: bytes) -> torch.Tensor:
    """Token ids ``[N]`` (int64) of the bytes ``data``."""
    if not data:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET


def decode(ids: torch.Tensor) -> bytes:
    """The bytes of token ids ``ids`` (special tokens dropped)."""
    ids = ids[ids >= BYTE_OFFSET]
    return bytes((ids - BYTE_OFFSET).to(torch.uint8).tolist())


def token_stream(files: Sequence[Path]) -> torch.Tensor:
    """All ``files`` encoded and concatenated, each followed by ``</s>``: ``[N]`` int64."""
    eos = torch.tensor([EOS_ID])
    parts = []
    for path in files:
        parts += [encode(path.read_bytes()), eos]
    return torch.cat(parts)


def chunks(stream: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[B, S]`` of ``stream`` ``[N]``, evenly spaced over it when ``max_chunks`` cuts.

    Taking every k-th window instead of the first ``max_chunks`` spreads a small sample over all files.
    """
    count = stream.numel() // seq_len
    if count == 0:
        raise ValueError(f"text too short: {stream.numel()} tokens, need at least one chunk of {seq_len}")
    windows = stream[: count * seq_len].view(count, seq_len)  # [B, S]
    if max_chunks is not None and count > max_chunks:
        windows = windows[torch.linspace(0, count - 1, max_chunks).long()]
    return windows


def text_chunks(
    sources: Iterable[str | Path] | None,
    split: Split,
    seq_len: int,
    max_tokens: int,
) -> torch.Tensor:
    """Chunks ``[B, S]`` (``B * S <= max_tokens``) of the files in ``sources``, or of the stdlib ``split``."""
    files = expand_sources(sources) if sources else stdlib_files(split)
    return chunks(token_stream(files), seq_len, max_chunks=max(1, max_tokens // seq_len))
