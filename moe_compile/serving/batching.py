"""Packing prompts into batches under a token budget, and building a batch's tensors.

A row is a prompt whose first ``cached`` tokens have keys/values from the prefix cache
(``prefix``, per layer ``[Hkv, cached, D]``) and whose remaining ``new`` tokens run.

:func:`plan_batches` sorts rows by (new, cached) length and fills each batch while
``rows * max(new) <= token_budget`` (the padded tokens that run); a row longer than the
budget runs alone. Sorting by length keeps padding small.

:func:`collate` pads on the right. With ``P = max(cached)`` and ``S = max(new)``:

    cache slots   [0, P)        row r's prefix in [0, cached_r), padding after it
    new slots     [P, P + S)    row r's new tokens in [P, P + new_r), padding after them
    attention_mask [B, P + S]   1 on the prefix and the new tokens of the row, 0 on padding
    position_ids   [B, S]       cached_r + j (padding repeats the last real position)

``S`` is at least 2, and so is ``P`` when a cache is built (masked zero slots): Dynamo
specialises sizes 0 and 1, so without this a batch of one-token suffixes, or one with no
cached prefix, would each compile a graph of its own. Masked slots weigh exactly zero.

transformers builds the causal mask from the cache length (query ``j`` sees slots
``< P + j + 1``) and the padding mask, so a real query sees exactly its prefix and its own
earlier tokens, wherever they sit. Padded queries see real keys only (no empty softmax
row, no NaN); their outputs are never read. Keys carry their rotary position from when
they were computed, so a prefix's slots need not match its positions. Exact as long as
tokens do not interact outside attention: per-token routing, no expert capacity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v)

#: the least number of new-token columns, and of cache slots when there is a cache (see the module docstring)
MIN_NEW = 2
MIN_PREFIX = 2


@dataclasses.dataclass
class Row:
    """One prompt in a batch."""

    tokens: list[int]
    cached: int = 0  # leading tokens whose keys/values are in `prefix`
    prefix: KV | None = None  # per layer ([Hkv, cached, Dk], [Hkv, cached, Dv]); shared objects for shared prefixes

    @property
    def new(self) -> int:
        """Tokens that run."""
        return len(self.tokens) - self.cached


@dataclasses.dataclass
class Batch:
    """The tensors of one forward pass (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, P + S] int64
    position_ids: torch.Tensor  # [B, S] int64
    past: KV | None  # per layer ([B, Hkv, P, Dk], [B, Hkv, P, Dv]); None without a cache
    prefix_len: int  # P

    @property
    def padded_tokens(self) -> int:
        """Tokens that run, padding included: ``B * S``."""
        return self.input_ids.numel()


def plan_batches(rows: Sequence[Row], token_budget: int) -> list[list[int]]:
    """Indices of ``rows`` grouped into batches of at most ``token_budget`` padded new tokens."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(rows)), key=lambda i: (rows[i].new, rows[i].cached))
    batches: list[list[int]] = []
    for i in order:
        # sorted ascending, so row i is the longest of the batch it joins
        if batches and (len(batches[-1]) + 1) * rows[i].new <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(rows: Sequence[Row], pad_id: int, kv_template: KV | None = None) -> Batch:
    """Right-padded tensors for ``rows``, with their cached prefixes stacked into a batch cache.

    ``kv_template``: per layer ``(k, v)`` tensors ``[Hkv, ., D]`` giving the cache's head
    counts, sizes, dtype and device. With it, ``past`` always exists, with at least
    ``MIN_PREFIX`` slots; without it no row may have a cached prefix and ``past`` is None.
    """
    B = len(rows)
    P = max(MIN_PREFIX if kv_template is not None else 0, *(r.cached for r in rows))
    S = max(MIN_NEW, *(r.new for r in rows))
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros(B, P + S, dtype=torch.long)  # [B, P + S]
    position_ids = torch.empty(B, S, dtype=torch.long)  # [B, S]
    steps = torch.arange(S)  # [S]
    for b, row in enumerate(rows):
        input_ids[b, : row.new] = torch.tensor(row.tokens[row.cached :])
        attention_mask[b, : row.cached] = 1
        attention_mask[b, P : P + row.new] = 1
        position_ids[b] = row.cached + steps.clamp(max=row.new - 1)
    if P and kv_template is None:
        raise ValueError("rows with cached prefixes need a kv_template")
    past = _stack_prefixes(rows, P, kv_template) if kv_template is not None else None
    return Batch(input_ids, attention_mask, position_ids, past, P)


def _stack_prefixes(rows: Sequence[Row], P: int, template: KV) -> KV:
    """Per layer ``[B, Hkv, P, D]`` caches holding each row's prefix in slots ``[0, cached)``, zeros after."""
    groups: dict[int, list[int]] = {}  # rows that share one prefix object get one broadcast copy
    for b, row in enumerate(rows):
        if row.cached:
            groups.setdefault(id(row.prefix), []).append(b)
    past: KV = []
    for layer, (k0, v0) in enumerate(template):
        k = k0.new_zeros(len(rows), k0.shape[0], P, k0.shape[2])  # [B, Hkv, P, Dk]
        v = v0.new_zeros(len(rows), v0.shape[0], P, v0.shape[2])  # [B, Hkv, P, Dv]
        for members in groups.values():
            row = rows[members[0]]
            index = torch.tensor(members)
            k[index, :, : row.cached] = row.prefix[layer][0]  # [Hkv, cached, Dk] broadcast over the group
            v[index, :, : row.cached] = row.prefix[layer][1]
        past.append((k, v))
    return past
