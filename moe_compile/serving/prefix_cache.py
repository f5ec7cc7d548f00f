"""Prefix cache: keys/values of token blocks, found by prefix, evicted least recently used.

A prompt is cut into blocks of ``block_size`` tokens. Block ``j`` is identified by its
tokens and by its parent (block ``j-1``), so a chain of blocks names a prefix exactly:
two prompts share the first ``n`` blocks iff their first ``n * block_size`` tokens are
equal. The key of a block is ``hash((parent_key, tokens))``; the entry keeps the parent
key and the tokens and a lookup compares both, so a hash collision is a miss, never a
wrong reuse. Only whole blocks are cached.

:class:`BlockStore` holds the chain structure, an optional value per block and an LRU
order bounded by a token capacity. Invariant: a block is always more recently used than
its children (a chain is touched from its deepest block up to its root), so the least
recently used block is a leaf and evicting it never orphans a cached block.

- :class:`PrefixCache` stores per block the keys/values of every layer
  (``[kv_heads, block_size, head_dim]`` each) for :class:`~moe_compile.serving.PrefillEngine`.
- The router keeps a value-less :class:`BlockStore` per rank to know which prefixes each
  rank holds (:mod:`moe_compile.serving.routing`).
- :func:`shared_prefixes` finds, in a set of prompts, the uncached prefixes that two or more
  of them share, so the engine can compute each of them once before the prompts run.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import torch

#: keys and values of one block, per layer: ``[(k [Hkv, B, Dk], v [Hkv, B, Dv]), ...]``
BlockKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    value: Any
    children: int = 0


def chain_keys(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Keys of the whole blocks of ``tokens[:limit]``, root first."""
    end = len(tokens) if limit is None else min(limit, len(tokens))
    keys: list[int] = []
    parent = None
    for start in range(0, end - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        keys.append(parent)
    return keys


class BlockStore:
    """Blocks of token ids in prefix chains, with a value each, LRU-bounded to ``capacity_tokens``."""

    def __init__(self, capacity_tokens: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.block_size = block_size
        self.capacity_blocks = capacity_tokens // block_size
        self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # LRU first
        self.evicted_blocks = 0

    @property
    def capacity_tokens(self) -> int:
        """The capacity in tokens: whole blocks of ``block_size``."""
        return self.capacity_blocks * self.block_size

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._blocks)

    def __contains__(self, key: int) -> bool:
        return key in self._blocks

    def match(self, tokens: Sequence[int], limit: int | None = None, *, touch: bool = True) -> list[tuple[int, Any]]:
        """``(key, value)`` of the longest cached chain of whole blocks within ``tokens[:limit]``, root first.

        With ``touch`` the matched blocks become the most recently used.
        """
        found: list[tuple[int, Any]] = []
        parent = None
        for key, start in zip(
            chain_keys(tokens, self.block_size, limit), range(0, len(tokens), self.block_size), strict=False
        ):
            block = self._blocks.get(key)
            if (
                block is None
                or block.parent != parent
                or block.tokens != tuple(tokens[start : start + self.block_size])
            ):
                break
            found.append((key, block.value))
            parent = key
        if touch:
            self._touch([key for key, _ in found])
        return found

    def insert(self, tokens: Sequence[int], values: Sequence[Any], first_block: int = 0) -> None:
        """Cache blocks ``first_block ..`` of ``tokens`` with ``values`` (one per block).

        The blocks before ``first_block`` must be cached already (they are the prefix the
        values were computed on); blocks already cached keep their value.
        """
        keys = chain_keys(tokens, self.block_size, (first_block + len(values)) * self.block_size)
        if len(keys) < first_block + len(values):
            raise ValueError("more values than whole blocks in the tokens")
        if first_block and keys[first_block - 1] not in self._blocks:
            return  # the prefix was evicted meanwhile: a chain with a hole could never be matched
        for j, value in enumerate(values, start=first_block):
            key = keys[j]
            if key in self._blocks:
                continue
            parent = keys[j - 1] if j else None
            if parent is not None:
                self._blocks[parent].children += 1
            start = j * self.block_size
            self._blocks[key] = _Block(parent, tuple(tokens[start : start + self.block_size]), value)
        self._touch(keys)
        self._evict()

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # deepest first: a parent ends up more recent than its children
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while len(self._blocks) > self.capacity_blocks:
            _, block = self._blocks.popitem(last=False)
            assert block.children == 0, "LRU invariant broken: evicting a block with cached children"
            if block.parent is not None:
                self._blocks[block.parent].children -= 1
            self.evicted_blocks += 1


class PrefixCache(BlockStore):
    """A :class:`BlockStore` whose values are the keys/values of each block (:data:`BlockKV`)."""

    def lookup(
        self, tokens: Sequence[int], limit: int, joined: dict[int, BlockKV] | None = None
    ) -> tuple[int, BlockKV | None]:
        """``(cached_tokens, kv)``: the longest cached prefix of ``tokens[:limit]`` and its keys/values.

        ``kv`` is per layer ``(k [Hkv, P, Dk], v [Hkv, P, Dv])`` with ``P = cached_tokens``, or ``None``.
        ``joined`` memoises the concatenated blocks by the chain's last key, so prompts that share
        a prefix share one ``kv`` object (and one copy per batch, see ``batching.collate``).
        """
        found: list[tuple[int, BlockKV]] = self.match(tokens, limit)
        if not found:
            return 0, None
        joined = {} if joined is None else joined
        last = found[-1][0]
        if last not in joined:
            blocks = [value for _, value in found]
            joined[last] = [
                (torch.cat([b[layer][0] for b in blocks], dim=1), torch.cat([b[layer][1] for b in blocks], dim=1))
                for layer in range(len(blocks[0]))
            ]  # per layer [Hkv, P, D]
        return len(found) * self.block_size, joined[last]


def shared_prefixes(
    prompts: Sequence[Sequence[int]], limits: Sequence[int], store: BlockStore
) -> list[list[list[int]]]:
    """Uncached prefixes shared by two or more of ``prompts``, in waves: compute wave 0 first, then wave 1, ...

    Consider the trie of the prompts' whole blocks (prompt ``i`` up to ``limits[i]`` tokens).
    A node that two or more prompts pass through is worth computing once if the prompts
    part there: it has two or more children, or a prompt's blocks end there. Every prompt's
    deepest shared node is such a node. Each returned prefix is such a node that ``store``
    does not hold; a prefix comes in a later wave than every returned prefix of its own,
    so that it can reuse them. Returns token lists, grouped by wave.
    """
    block = store.block_size
    paths = [chain_keys(p, block, limit) for p, limit in zip(prompts, limits, strict=True)]
    passes: collections.Counter[int] = collections.Counter()
    ends: collections.Counter[int] = collections.Counter()
    children: dict[int, set[int]] = collections.defaultdict(set)
    for path in paths:
        passes.update(path)
        if path:
            ends[path[-1]] += 1
        for parent, child in itertools.pairwise(path):
            children[parent].add(child)
    chosen: dict[int, tuple[int, list[int]]] = {}  # key -> (wave, tokens)
    for prompt, path in zip(prompts, paths, strict=True):
        wave = 0
        for depth, key in enumerate(path, start=1):
            if passes[key] < 2:
                break
            if key in store or not (len(children[key]) >= 2 or ends[key]):
                continue
            if key not in chosen:
                chosen[key] = (wave, list(prompt[: depth * block]))
            wave = chosen[key][0] + 1
    waves: list[list[list[int]]] = [[] for _ in range(1 + max((w for w, _ in chosen.values()), default=-1))]
    for wave, tokens in chosen.values():
        waves[wave].append(tokens)
    return waves
