"""Block sizes of the MoE kernels, chosen per shape and device.

Order of choice (:func:`select_config`):

1. under ``TRITON_INTERPRET=1``: :data:`INTERPRETER_CONFIG`, tiny blocks so tests run fast;
2. ``MOE_COMPILE_AUTOTUNE=1`` (opt-in, never on by default): time :func:`candidates` with the
   caller's benchmark once per key, cache and log the winner;
3. a measured table for this device: ``kernels/tuned/<device>.json`` (or ``$MOE_COMPILE_TUNED_DIR``),
   written by ``benchmarks/gpu_suite.py --autotune`` from :func:`candidates` (:func:`load_tuned`);
4. :data:`SEED_CONFIGS` (bf16): keyed by a device-name substring, then ``(E, N, H)``, then token bucket.
   Seeds, never measured on a GPU: starting points until a GPU run writes measured tables;
5. :func:`heuristic`, from the rows per expert ``T*K/E``; the fallback is logged once per key.

Every config this module can return compiles for sm_80 and sm_90 without register spills, within
shared memory, and (16-bit, ``BLOCK_M >= 64``) with Hopper's wgmma: ``python -m
moe_compile.kernels.compile_gate`` checks it (``tests/kernel_tests/test_compile_gate.py``).

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
    config = tuned_from_file(device_name, key, num_tokens, dtype)  # a measured table for this device first
    if config is None:
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


# --- measured tables: one JSON file per device ----------------------------------------------------
#
# ``benchmarks/gpu_suite.py --autotune`` writes the winners of the autotune (``MOE_COMPILE_AUTOTUNE=1``)
# as ``tuned/<device file name>.json`` (as vLLM keeps ``configs/E=..,N=..,device_name=...json``), so
# measured values are never hand-pasted. :func:`select_config` consults such a file before the seed
# table above; with no file for the device it falls back to the seeds, then to the heuristic.
# ``MOE_COMPILE_TUNED_DIR`` names another folder searched before the package's own. File format::
#
#     {"format": 1, "device_name": "NVIDIA H200", "dtype": "bfloat16",
#      "tables": [{"E": 128, "N": 1536, "H": 2048,
#                  "buckets": [{"max_tokens": 512, "config": {"block_m": 64, "block_n": 128,
#                               "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 4}}, ...]}],
#      ...provenance fields (versions, date, writer), ignored by the loader}
#
# Buckets ascend by ``max_tokens``; the first with ``num_tokens <= max_tokens`` is used, the last covers
# everything larger (as in the seed table).

TUNED_FORMAT = 1
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")

Table = dict[tuple[int, int, int], list[tuple[int, KernelConfig]]]


def tuned_file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3.json``."""
    stem = "".join(c if c.isalnum() else "_" for c in device_name.strip().lower())
    stem = "_".join(part for part in stem.split("_") if part)
    if not stem:
        raise ValueError(f"moe kernels: cannot name a tuned-config file after device name {device_name!r}")
    return stem + ".json"


def _tuned_dirs() -> list[str]:
    extra = os.environ.get("MOE_COMPILE_TUNED_DIR", "").strip()
    return [extra, TUNED_DIR] if extra else [TUNED_DIR]


def parse_tuned(data: object, source: str = "<data>") -> tuple[str, Table]:
    """Validate a tuned-config document; ``(dtype name, table)``. Raises ``ValueError`` naming the problem."""

    def bad(what: str) -> ValueError:
        return ValueError(
            f"moe kernels: malformed tuned-config file {source}: {what}; "
            "rewrite it with `python benchmarks/gpu_suite.py --autotune` or delete it to use the seed table"
        )

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != TUNED_FORMAT:
        raise bad(f"'format' must be {TUNED_FORMAT}, got {data.get('format')!r}")
    dtype = data.get("dtype")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise bad(f"'dtype' must be 'bfloat16', 'float16' or 'float32', got {dtype!r}")
    tables = data.get("tables")
    if not isinstance(tables, list):
        raise bad("'tables' must be a list")
    fields = [f.name for f in dataclasses.fields(KernelConfig)]
    table: Table = {}
    for i, entry in enumerate(tables):
        where = f"tables[{i}]"
        if not isinstance(entry, dict):
            raise bad(f"{where} must be an object")
        key = tuple(entry.get(k) for k in ("E", "N", "H"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in key):
            raise bad(f"{where}: 'E', 'N', 'H' must be positive integers, got {key}")
        if key in table:
            raise bad(f"{where}: (E, N, H)={key} appears twice")
        buckets = entry.get("buckets")
        if not isinstance(buckets, list) or not buckets:
            raise bad(f"{where}: 'buckets' must be a non-empty list")
        parsed: list[tuple[int, KernelConfig]] = []
        for j, bucket in enumerate(buckets):
            at = f"{where}.buckets[{j}]"
            if not isinstance(bucket, dict) or not isinstance(bucket.get("config"), dict):
                raise bad(f"{at} must be an object with 'max_tokens' and 'config'")
            max_tokens, config = bucket.get("max_tokens"), bucket["config"]
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise bad(f"{at}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
            if parsed and max_tokens <= parsed[-1][0]:
                raise bad(f"{at}: 'max_tokens' must ascend ({max_tokens} after {parsed[-1][0]})")
            if sorted(config) != sorted(fields):
                raise bad(f"{at}: 'config' must have exactly the fields {fields}, got {sorted(config)}")
            values = [config[f] for f in fields]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise bad(f"{at}: config values must be positive integers, got {config}")
            powers = ("block_m", "block_n", "block_k", "num_warps")
            if any(config[f] & (config[f] - 1) for f in powers):
                raise bad(f"{at}: {', '.join(powers)} must be powers of two, got {config}")
            parsed.append((max_tokens, KernelConfig(**config)))
        table[key] = parsed
    return dtype, table


@functools.cache
def _load_tuned_file(path: str, mtime: float) -> tuple[str, Table]:
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"moe kernels: malformed tuned-config file {path}: not JSON ({err}); "
            "rewrite it with `python benchmarks/gpu_suite.py --autotune` or delete it to use the seed table"
        ) from None
    return parse_tuned(data, path)


def tuned_file(device_name: str) -> str | None:
    """The tuned-config file for ``device_name`` (``MOE_COMPILE_TUNED_DIR`` first, then the package's), or None."""
    name = tuned_file_name(device_name)
    for folder in _tuned_dirs():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_tuned(device_name: str) -> tuple[str, Table] | None:
    """``(dtype name, table)`` of the device's tuned-config file (validated, cached), or None without one."""
    path = tuned_file(device_name)
    return None if path is None else _load_tuned_file(path, os.path.getmtime(path))


def tuned_from_file(
    device_name: str, key: tuple[int, int, int], num_tokens: int, dtype: torch.dtype
) -> KernelConfig | None:
    """The measured config for ``key`` at ``num_tokens`` from the device's file, or None."""
    if not device_name or device_name == "cpu":
        return None
    loaded = load_tuned(device_name)
    if loaded is None or str(dtype).removeprefix("torch.") != loaded[0] or key not in loaded[1]:
        return None
    buckets = loaded[1][key]
    return next((config for max_tokens, config in buckets if num_tokens <= max_tokens), buckets[-1][1])


def autotuned_table(device_name: str, dtype: torch.dtype) -> Table:
    """The winners cached by this process's autotune runs on ``device_name`` in ``dtype``, as a table."""
    table: Table = {}
    for (name, key, bucket, _top_k, dt), config in sorted(_AUTOTUNED.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if name == device_name and dt == dtype:
            buckets = table.setdefault(key, [])
            if not buckets or buckets[-1][0] != bucket:  # one per bucket (the first top_k wins)
                buckets.append((bucket, config))
    return table


def write_tuned(path: str, device_name: str, dtype: torch.dtype, table: Table, **provenance: object) -> dict:
    """Write ``table`` as a tuned-config file (validated by reading it back); the document written."""
    import json

    doc = {
        "format": TUNED_FORMAT,
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        **provenance,
        "tables": [
            {
                "E": key[0],
                "N": key[1],
                "H": key[2],
                "buckets": [{"max_tokens": m, "config": dataclasses.asdict(c)} for m, c in buckets],
            }
            for key, buckets in sorted(table.items())
        ],
    }
    parse_tuned(json.loads(json.dumps(doc)), path)  # never write what the loader would refuse
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc
