"""Synthetic prefill workloads: prompts that share prefixes, with skewed lengths.

Used by the routing tests and ``benchmarks/serving.py``. A workload has ``families``
prefixes (for instance one instruction block each); a prompt picks a family with a Zipf
law (a few families are hot), takes its prefix and appends a fresh random suffix whose
length is log-uniform in ``suffix_len`` (most suffixes short, a few long).
"""

from __future__ import annotations

import math
import random

#: token ids below this are left out (special tokens of the tiny test models)
FIRST_TOKEN = 3


def synthetic_prompts(
    n: int,
    vocab_size: int,
    *,
    families: int = 8,
    prefix_len: tuple[int, int] = (64, 512),
    suffix_len: tuple[int, int] = (8, 256),
    zipf: float = 1.2,
    seed: int = 0,
) -> list[list[int]]:
    """``n`` prompts (token ids): family prefixes of lengths uniform in ``prefix_len``, suffixes log-uniform."""
    rng = random.Random(seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(count)]

    prefixes = [tokens(rng.randint(*prefix_len)) for _ in range(families)]
    weights = [1.0 / (f + 1) ** zipf for f in range(families)]
    lo, hi = math.log(suffix_len[0]), math.log(suffix_len[1])
    prompts = []
    for _ in range(n):
        family = rng.choices(range(families), weights)[0]
        prompts.append(prefixes[family] + tokens(round(math.exp(rng.uniform(lo, hi)))))
    return prompts
