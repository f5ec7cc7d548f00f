"""Block sizes of the MoE kernels, chosen per shape and device.

Order of choice (:func:`select_config`):

1. under ``TRITON_INTERPRET=1``: :data:`INTERPRETER_CONFIG`, tiny blocks so tests run fast;
2. ``MOE_COMPILE_AUTOTUNE=1`` (opt-in, never on by default): time :func:`candidates` with the
   caller's benchmark once per key, cache and log the winner;
3. :data:`SEED_CONFIGS` (bf16): keyed by a device-name substring, then ``(E, N, H)``, then token bucket.
   Seeds, never measured on a GPU: starting points until a GPU run writes measured tables;
4. :func:`heuristic`, from the rows per expert ``T*K/E``; the fallback is logged once per key.

Every config this module can return compiles for sm_80 and sm_90 without register spills, within
shared memory, and (16-bit, ``BLOCK_M >= 64``) with Hopper's wgmma: ``python -m
moe_compile.kernels.compile_gate`` checks it (``tests/kernels/test_compile_gate.py``).

One :class:`KernelConfig` drives both GEMMs (they share ``BLOCK_M``, which the alignment
pads to). ``block_n`` is the width of the weight tile a program reads per K step: the
down kernel's output columns, and for gated experts the up kernel's gate + up columns
(so ``block_n // 2`` activation columns, two accumulators).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)

__all__ = [
    "SEED_CONFIGS",
    "KernelConfig",
    "autotune_enabled",
    "candidates",
    "heuristic",
    "heuristic_configs",
    "interpreting",
    "select_config",
]


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
# 16-bit (tensor cores). BLOCK_M = 16/32 tiles are for few rows per expert: Hopper's wgmma needs
# BLOCK_M >= 64, so they run on mma.sync there, knowingly: with 16 rows per expert a 64-row block
# would pad 75% of its rows (docs/benchmarks.md, "Compile gate"). No 256-wide weight tiles: they
# spill on sm_80 and, ungated, on sm_90 (compile gate).
_DECODE_SMALL = _C(16, 64, 128, 1, 4, 4)
_SMALL_M = _C(32, 64, 128, 8, 4, 4)
_MID = _C(64, 128, 64, 8, 8, 4)  # 8 warps: with 4, the interleaved gate/up split spills on sm_80
_LARGE = _C(128, 128, 64, 16, 8, 3)
# fp32 runs the exact (ieee) FMA path with both operand tiles in registers: small tiles or it spills.
# 32x64x32, 128x64x32 and 128x64x16 spill 8-40 B in some layout on triton 3.6 or 3.9 (compile gate);
# these two spill in none, on either version. fp32 is the exactness path, not the fast one.
_FP32_DECODE = _C(16, 64, 32, 1, 4, 3)
_FP32_MID = _C(64, 64, 16, 8, 4, 3)

#: device substring -> (E, N, H) -> [(max tokens T, config)], buckets ascending; the last one covers
#: everything larger. Seed values for the benchmark shapes (bf16), never measured on a GPU: guesses
#: from the shapes, checked only by the compile gate, until a GPU run writes measured tables.
_HOPPER = {
    (128, 1536, 2048): [(512, _MID), (4096, _LARGE)],  # Qwen3-30B-A3B
    (128, 3072, 4096): [(512, _MID), (4096, _LARGE)],  # Qwen3-235B-A22B
    (8, 28672, 4096): [(16384, _LARGE)],  # Mixtral-8x7B
    (256, 4096, 7168): [(512, _C(32, 128, 64, 8, 4, 4)), (4096, _MID), (16384, _LARGE)],  # DeepSeek-V3
}
SEED_CONFIGS: dict[str, dict[tuple[int, int, int], list[tuple[int, KernelConfig]]]] = {
    "H100": _HOPPER,
    "H200": _HOPPER,
}

_AUTOTUNED: dict[tuple, KernelConfig] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("MOE_COMPILE_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


#: heuristic buckets: (max rows per expert, config), ascending; the last covers everything larger
_HEURISTIC = ((16, _DECODE_SMALL), (64, _SMALL_M), (512, _MID), (float("inf"), _LARGE))
_HEURISTIC_FP32 = ((16, _FP32_DECODE), (float("inf"), _FP32_MID))


def heuristic_configs(dtype: torch.dtype) -> tuple[KernelConfig, ...]:
    """Every config :func:`heuristic` can return for ``dtype``."""
    return tuple(config for _, config in (_HEURISTIC_FP32 if dtype == torch.float32 else _HEURISTIC))


def heuristic(num_experts: int, num_tokens: int, top_k: int, dtype: torch.dtype) -> KernelConfig:
    """Blocks from the mean rows per expert: small blocks waste less padding, large ones reuse weights."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    buckets = _HEURISTIC_FP32 if dtype == torch.float32 else _HEURISTIC
    return next(config for max_rows, config in buckets if rows_per_expert <= max_rows)


def _seeded(device_name: str, key: tuple[int, int, int], num_tokens: int) -> KernelConfig | None:
    for substring, table in SEED_CONFIGS.items():
        if substring in device_name and key in table:
            buckets = table[key]
            for max_tokens, config in buckets:
                if num_tokens <= max_tokens:
                    return config
            return buckets[-1][1]
    return None


@functools.cache
def _log_fallback(device_name: str, key: tuple[int, int, int], dtype: torch.dtype) -> None:
    logger.info("moe kernels: no seed config for %s (E, N, H)=%s %s; using the heuristic", device_name, key, dtype)


def candidates(dtype: torch.dtype) -> list[KernelConfig]:
    """The autotune search space: tiles that compile without spills on sm_80 and sm_90 (compile gate).

    16-bit: wgmma-able ``BLOCK_M`` 64/128 tiles plus small-M ones; fp32: the heuristic's FMA tiles.
    ``group_m`` (8 or 16) is a runtime argument of the kernels: it costs no extra compile.
    """
    if dtype == torch.float32:
        tiles = [_FP32_DECODE, _FP32_MID]
    else:
        bm_bn_bk_warps_stages = [
            (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (32, 128, 128, 4, 3),
            (64, 64, 128, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (64, 128, 128, 4, 3),
            (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
        ]  # fmt: skip
        tiles = [_C(bm, bn, bk, 8, w, s) for bm, bn, bk, w, s in bm_bn_bk_warps_stages]
    return [dataclasses.replace(tile, group_m=gm) for tile in tiles for gm in (8, 16)]


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
    config = _seeded(device_name, key, num_tokens) if dtype == torch.bfloat16 else None
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
