"""Block sizes of the MoE kernels, chosen per shape and device.

Order of choice (:func:`select_config`):

1. under ``TRITON_INTERPRET=1``: :data:`INTERPRETER_CONFIG`, tiny blocks so tests run fast;
2. ``MOE_COMPILE_AUTOTUNE=1`` (opt-in, never on by default): time :func:`candidates` with the
   caller's benchmark once per key, cache and log the winner (paste it into :data:`TUNED`);
3. :data:`TUNED`: keyed by a device-name substring, then ``(E, N, H)``, then token bucket;
4. :func:`heuristic`, from the rows per expert ``T*K/E``; the fallback is logged once per key.

One :class:`KernelConfig` drives both GEMMs (they share ``BLOCK_M``, which the alignment
pads to). ``block_n`` is the width of the weight tile a program reads per K step: the
down kernel's output columns, and for gated experts the up kernel's gate + up columns
(so ``block_n // 2`` activation columns, two accumulators).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)

__all__ = ["KernelConfig", "autotune_enabled", "candidates", "heuristic", "interpreting", "select_config"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows (pairs) per program; every expert segment is padded to it
    block_n: int  # weight columns per program (see the module docstring)
    block_k: int  # reduction step
    group_m: int  # row blocks per column sweep (L2 reuse of weight tiles)
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)

_C = KernelConfig
_DECODE_SMALL = _C(16, 64, 128, 1, 4, 4)
_MID = _C(64, 128, 64, 8, 4, 4)
_LARGE = _C(128, 128, 64, 16, 8, 3)
_LARGE_WIDE_K = _C(128, 256, 64, 16, 8, 3)

#: device substring -> (E, N, H) -> [(max tokens T, config)], buckets ascending; the last one covers
#: everything larger. Seed values for the benchmark shapes (bf16), to be refreshed from
#: ``MOE_COMPILE_AUTOTUNE=1`` runs of ``benchmarks/grouped_gemm.py``.
_HOPPER = {
    (128, 1536, 2048): [(512, _MID), (4096, _LARGE)],  # Qwen3-30B-A3B
    (128, 3072, 4096): [(512, _MID), (4096, _LARGE)],  # Qwen3-235B-A22B
    (8, 28672, 4096): [(512, _LARGE), (16384, _LARGE_WIDE_K)],  # Mixtral-8x7B
    (256, 4096, 7168): [(512, _C(32, 128, 64, 8, 4, 4)), (4096, _MID), (16384, _LARGE)],  # DeepSeek-V3
}
TUNED: dict[str, dict[tuple[int, int, int], list[tuple[int, KernelConfig]]]] = {"H100": _HOPPER, "H200": _HOPPER}

_AUTOTUNED: dict[tuple, KernelConfig] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("MOE_COMPILE_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def heuristic(num_experts: int, num_tokens: int, top_k: int, dtype: torch.dtype) -> KernelConfig:
    """Blocks from the mean rows per expert: small blocks waste less padding, large ones reuse weights."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        config = _DECODE_SMALL
    elif rows_per_expert <= 64:
        config = _C(32, 64, 128, 8, 4, 4)
    elif rows_per_expert <= 512:
        config = _MID
    else:
        config = _LARGE
    if dtype == torch.float32:  # twice the bytes per tile: keep shared memory in budget
        config = dataclasses.replace(config, block_k=32, num_stages=min(config.num_stages, 3))
    return config


def _tuned(device_name: str, key: tuple[int, int, int], num_tokens: int) -> KernelConfig | None:
    for substring, table in TUNED.items():
        if substring in device_name and key in table:
            buckets = table[key]
            for max_tokens, config in buckets:
                if num_tokens <= max_tokens:
                    return config
            return buckets[-1][1]
    return None


@functools.cache
def _log_fallback(device_name: str, key: tuple[int, int, int], dtype: torch.dtype) -> None:
    logger.info("moe kernels: no tuned config for %s (E, N, H)=%s %s; using the heuristic", device_name, key, dtype)


def candidates(dtype: torch.dtype) -> list[KernelConfig]:
    """The autotune search space."""
    configs = [
        KernelConfig(bm, bn, bk, gm, w, s)
        for bm, bn, bk, gm, w, s in itertools.product((32, 64, 128), (64, 128, 256), (64, 128), (8, 16), (4, 8), (3, 4))
        if not (bn == 256 and bk == 128) and not (bm == 32 and w == 8)
    ]
    if dtype == torch.float32:
        configs = [dataclasses.replace(c, block_k=32) for c in configs if c.block_k == 64]
    return configs


def select_config(
    num_experts: int,
    up_width: int,
    hidden_size: int,
    num_tokens: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device,
    bench: Callable[[KernelConfig], float] | None = None,
) -> KernelConfig:
    """The config for one MoE layer call; ``bench(config) -> ms`` is used only when autotuning."""
    if interpreting():
        return INTERPRETER_CONFIG
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = (num_experts, up_width, hidden_size)
    if autotune_enabled() and bench is not None:
        bucket = 1 << max(num_tokens - 1, 0).bit_length()  # next power of two
        cache_key = (device_name, key, bucket, top_k, dtype)
        if cache_key not in _AUTOTUNED:
            _AUTOTUNED[cache_key] = _autotune(bench, dtype, cache_key)
        return _AUTOTUNED[cache_key]
    config = _tuned(device_name, key, num_tokens) if dtype == torch.bfloat16 else None
    if config is None:
        _log_fallback(device_name, key, dtype)
        config = heuristic(num_experts, num_tokens, top_k, dtype)
    return config


def _autotune(bench: Callable[[KernelConfig], float], dtype: torch.dtype, cache_key: tuple) -> KernelConfig:
    """Time every candidate (NOTE: syncs with the host; run once before any CUDA graph capture)."""
    timings: list[tuple[float, KernelConfig]] = []
    for config in candidates(dtype):
        try:
            timings.append((bench(config), config))
        except OutOfResources as err:  # too much shared memory or too many registers here
            logger.debug("moe autotune: %s failed: %s", config, err)
    if not timings:
        raise RuntimeError(f"moe autotune: every candidate failed for {cache_key}")
    ms, best = min(timings, key=lambda t: t[0])
    logger.warning("moe autotune %s: best %s (%.3f ms)", cache_key, best, ms)
    return best
