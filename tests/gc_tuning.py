"""Fewer garbage collections in the test processes (pytest's workers and the ranks they spawn).

A compile allocates many short-lived objects (FX nodes, fake tensors, sympy expressions): with CPython's default
thresholds (700, 10, 10) a compile of a tiny zoo model at two lengths runs about 380 collections, a tenth of its
time. With (20000, 20, 10) it runs a few dozen and the compiles of qwen3_moe, deepseek_v3 and mixtral take about
7% less CPU (interleaved runs in one process, 2026-12-07). Memory is not the limit here: the garbage of one
compile is small next to torch itself.

Not in the ranks that ``dist_workers.spawn`` forks (they keep CPython's defaults): with these thresholds in the
ranks too, one CI run (2026-12-07, 5184839) saw a 4-rank hot-experts group where rank 0 reached a compile-time
check (two all-reduces) more than the group's 120 s after the other three. It did not recur in four runs of the
test alone or beside two busy processes, and no mechanism is known; the ranks stay as they were until one is.
"""

import gc

THRESHOLDS = (20_000, 20, 10)


def fewer_collections() -> None:
    gc.set_threshold(*THRESHOLDS)
