"""Compile gate: every kernel launch the package can make, compiled for sm_80 and sm_90 without a GPU.

``python -m moe_compile.kernels.compile_gate`` builds each launch with the real launchers
(:func:`~.grouped_gemm.up_launch`, :func:`~.grouped_gemm.down_launch`, :func:`~.grouped_gemm.reduce_launch`)
on meta tensors, applies Triton's own launch-time specialization to its arguments (pointer alignment,
integers equal to 1 or divisible by 16) and compiles it with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and the ptxas Triton ships. No
signature is written by hand: a kernel argument added to a launcher is compiled here at once.

What it compiles (:func:`cases`), for sm_80 (A100) and sm_90 (H100/H200):

- every config :func:`~.configs.select_config` can return, per dtype (fp32, fp16, bf16): the seed table
  (bf16 only, as ``select_config`` uses it), every :func:`~.configs.heuristic` bucket and every autotune
  :func:`~.configs.candidates`, each for the up kernel (gated SiLU, the default) and the down kernel;
- every expert layout (transposed weights, interleaved gate/up, biases, and GPT-OSS's all three with
  the clamped SwiGLU) on every config the default path (seed table or heuristic) can return;
- every activation, gated and not, on the config with the largest tile per dtype (the epilogue is the
  only code an activation changes, and the largest accumulator is where registers run out);
- the top-k reduce for every dtype;
- [fp8] the block-fp8 up and down kernels (:mod:`.fp8_moe`, dtype ``fp8``: e4m3 weights and activations,
  bf16 output) on every config the fp8 layer can select (bf16's seed table and heuristic), for sm_90
  (``native``: e4m3 dots) and sm_80 (``decode``: e4m3 decoded to bf16 in the kernel).

``GROUP_M`` is a runtime argument of the kernels, so configs that differ only in it compile to one
kernel; the routing's ``top_k`` is a compile-time constant that only enters index arithmetic and is
compiled at the models' 8 (4 for GPT-OSS's layout).

A case fails on: a compile error; any register spill (ptxas: spill stores or loads, or a stack frame;
a kernel over 255 registers shows as 32 registers plus a stack); shared memory over the device's
per-block limit (166,912 B on sm_80, 232,448 B on sm_90); a 16-bit GEMM with ``BLOCK_M >= 64`` on sm_90
whose PTX has no warp-group MMA (``wgmma``), or a pipelined (``num_stages > 1``) wgmma kernel whose every
``wgmma.wait_group`` leaves no MMA in flight. fp8 cases on sm_90 with ``BLOCK_M >= 64`` must use
``wgmma ... e4m3.e4m3``; the in-flight rule does not apply to them: each K step's dot is scaled (per K
block) as soon as it is done, so its MMA is waited for by design; their loads are still pipelined.
Results are cached by a hash of the kernel source, the case and the Triton version (``--cache-dir``),
so a rerun compiles only what changed; a process pool compiles the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..spec import ExpertSpec
from . import configs
from .configs import KernelConfig

__all__ = ["SHARED_LIMIT", "Case", "Result", "cases", "check", "compile_case", "main", "run"]

#: compute capability -> shared memory a block may use (opt-in maximum), bytes
SHARED_LIMIT = {80: 166_912, 90: 232_448}
TARGETS = tuple(SHARED_LIMIT)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: [fp8] the block-fp8 kernels' case dtype: e4m3 operands, fp32 scales, bf16 output
FP8 = "fp8"

# A representative MoE layer (Qwen3-30B-A3B-like widths): the sizes only matter through Triton's
# specialization (all are multiples of 16, as in every supported model).
_E, _H, _I, _T, _K = 8, 2048, 768, 512, 8

_BASE = ExpertSpec()
#: up-kernel layouts: name -> (spec, bias)
UP_LAYOUTS = {
    "standard": (_BASE, False),
    "transposed": (ExpertSpec(transposed=True), False),
    "interleaved": (ExpertSpec(gate_layout="interleaved"), False),
    "bias": (_BASE, True),
    "gpt-oss": (ExpertSpec(activation="swiglu_oai", gate_layout="interleaved", transposed=True), True),
}
DOWN_LAYOUTS = {"standard": (_BASE, False), "transposed": (ExpertSpec(transposed=True), False), "bias": (_BASE, True)}
ACTIVATIONS = {
    "gelu": ExpertSpec(activation="gelu"),
    "gelu_tanh": ExpertSpec(activation="gelu_tanh"),
    "relu": ExpertSpec(activation="relu"),
    "relu2": ExpertSpec(activation="relu2"),
    "swiglu_oai": ExpertSpec(activation="swiglu_oai"),
    "swiglu_softcap": ExpertSpec(activation="swiglu_softcap"),
    "silu/clamp-before": ExpertSpec(activation="silu", clamp="before", limit=10.0),
    "silu/clamp-after": ExpertSpec(activation="silu", clamp="after"),
    "silu/ungated": ExpertSpec(activation="silu", gated=False),
    "gelu/ungated": ExpertSpec(activation="gelu", gated=False),
    "relu/ungated": ExpertSpec(activation="relu", gated=False),
    "relu2/ungated": ExpertSpec(activation="relu2", gated=False),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch to compile: kernel, config (None for the reduce), dtype, layout and target."""

    kernel: str  # "up", "down" or "reduce"
    config: KernelConfig | None
    dtype: str  # a key of DTYPES
    layout: str  # a key of UP_LAYOUTS / DOWN_LAYOUTS / ACTIVATIONS, or "-" for the reduce
    cc: int
    source: str = ""  # where the config comes from: seed, heuristic, autotune (comma-separated)

    def spec_and_bias(self) -> tuple[ExpertSpec, bool]:
        if self.kernel == "up" and self.layout in UP_LAYOUTS:
            return UP_LAYOUTS[self.layout]
        if self.kernel == "up":
            return ACTIVATIONS[self.layout], False
        if self.kernel == "down":
            return DOWN_LAYOUTS[self.layout]
        return _BASE, False

    def config_str(self) -> str:
        c = self.config
        if c is None:
            return "-"
        return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"

    def key(self) -> dict:
        return {
            "kernel": self.kernel,
            "config": dataclasses.asdict(self.config) if self.config else None,
            "dtype": self.dtype,
            "layout": self.layout,
            "cc": self.cc,
        }


@dataclasses.dataclass
class Result:
    case: Case
    registers: int = 0
    stack: int = 0  # bytes of stack frame
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0  # bytes
    mma: str = "-"  # wgmma, mma.sync, fma (no tensor cores) or - (no dot)
    wgmma_in_flight: int = 0  # most wgmma groups left pending by a wait (0: each MMA waited for at once)
    seconds: float = 0.0
    error: str | None = None
    failures: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the cases


def _selectable(dtype: torch.dtype) -> dict[KernelConfig, set[str]]:
    """Every config ``select_config`` can return for ``dtype``, with where it comes from."""
    found: dict[KernelConfig, set[str]] = {}
    if dtype == torch.bfloat16:  # select_config consults the seed table for bf16 only
        for table in configs.SEED_CONFIGS.values():
            for buckets in table.values():
                for _, config in buckets:
                    found.setdefault(config, set()).add("seed")
    for config in configs.heuristic_configs(dtype):
        found.setdefault(config, set()).add("heuristic")
    for config in configs.candidates(dtype):
        found.setdefault(config, set()).add("autotune")
    return found


def _compile_key(config: KernelConfig) -> tuple:
    """A config as far as compilation sees it (``group_m`` is a runtime argument, 1 a specialized one)."""
    return (config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages, config.group_m == 1)


def cases(targets: tuple[int, ...] = TARGETS) -> list[Case]:
    """Every launch the package can make, up to configs that compile alike (see the module docstring)."""
    out: list[Case] = []
    for name, dtype in DTYPES.items():
        merged: dict[tuple, tuple[KernelConfig, set[str]]] = {}
        for config, sources in _selectable(dtype).items():
            entry = merged.setdefault(_compile_key(config), (config, set()))
            entry[1].update(sources)
        for cc in targets:
            for config, sources in merged.values():
                source = ",".join(sorted(sources))
                out.append(Case("up", config, name, "standard", cc, source))
                out.append(Case("down", config, name, "standard", cc, source))
                if sources & {"seed", "heuristic"}:  # reachable without autotuning: every layout
                    out += [Case("up", config, name, lay, cc, source) for lay in UP_LAYOUTS if lay != "standard"]
                    out += [Case("down", config, name, lay, cc, source) for lay in DOWN_LAYOUTS if lay != "standard"]
            largest, sources = max(merged.values(), key=lambda cs: (cs[0].block_m * cs[0].block_n, cs[0].block_k))
            out += [Case("up", largest, name, act, cc, ",".join(sorted(sources))) for act in ACTIVATIONS]
            out.append(Case("reduce", None, name, "-", cc))
    out += fp8_cases(targets)
    return out


def fp8_cases(targets: tuple[int, ...] = TARGETS) -> list[Case]:
    """[fp8] The block-fp8 up and down kernels on every config fused_moe_fp8 can select (no autotune there):
    on sm_90 the 16-bit seed table and heuristic (native e4m3), on sm_80 ``fp8_moe.DECODE_CONFIGS``."""
    from .fp8_moe import DECODE_CONFIGS

    merged: dict[tuple, tuple[KernelConfig, set[str]]] = {}
    for config, sources in _selectable(torch.bfloat16).items():
        if sources & {"seed", "heuristic"}:
            entry = merged.setdefault(_compile_key(config), (config, set()))
            entry[1].update(sources & {"seed", "heuristic"})
    out = []
    for cc in targets:
        chosen = merged.values() if cc >= 89 else [(c, {"fp8-decode"}) for _, c in DECODE_CONFIGS]
        out += [Case(k, c, FP8, "standard", cc, ",".join(sorted(s))) for c, s in chosen for k in ("up", "down")]
    return out


# ---------------------------------------------------------------------------------------------
# compiling one case (in a worker process)


def _launch(case: Case):
    """The real launcher's Launch for ``case``, on meta tensors."""
    from . import grouped_gemm
    from .align import padded_bound

    if case.dtype == FP8:
        return _fp8_launch(case)
    dtype = DTYPES[case.dtype]
    meta = torch.device("meta")
    spec, bias = case.spec_and_bias()
    S = _T * _K
    if case.kernel == "reduce":
        y_SH = torch.empty(S, _H, dtype=dtype, device=meta)
        return grouped_gemm.reduce_launch(y_SH, _K, dtype)[0]
    top_k = 4 if case.layout == "gpt-oss" else _K
    S = _T * top_k
    P = padded_bound(S, _E, case.config.block_m)
    alignment = grouped_gemm.Alignment(
        torch.empty(P, dtype=torch.int32, device=meta),
        torch.empty(P // case.config.block_m, dtype=torch.int32, device=meta),
        torch.empty(1, dtype=torch.int32, device=meta),
    )
    N = 2 * _I if spec.gated else _I
    if case.kernel == "up":
        x_TH = torch.empty(_T, _H, dtype=dtype, device=meta)
        w_up = torch.empty((_E, _H, N) if spec.transposed else (_E, N, _H), dtype=dtype, device=meta)
        b_up = torch.empty(_E, N, dtype=dtype, device=meta) if bias else None
        return grouped_gemm.up_launch(x_TH, alignment, w_up, b_up, spec, top_k, case.config, interpret=False)[0]
    act_SI = torch.empty(S, _I, dtype=dtype, device=meta)
    weights_TK = torch.empty(_T, top_k, dtype=torch.float32, device=meta)
    w_down = torch.empty((_E, _I, _H) if spec.transposed else (_E, _H, _I), dtype=dtype, device=meta)
    b_down = torch.empty(_E, _H, dtype=dtype, device=meta) if bias else None
    return grouped_gemm.down_launch(act_SI, alignment, weights_TK, w_down, b_down, spec, case.config, interpret=False)[
        0
    ]


def _fp8_launch(case: Case):
    """[fp8] The block-fp8 launcher's Launch for ``case`` (SiLU-gated, 128x128 blocks), on meta tensors."""
    from . import fp8_moe, grouped_gemm
    from .align import padded_bound

    meta, e4m3, f32 = torch.device("meta"), torch.float8_e4m3fn, torch.float32
    spec = ExpertSpec(quant="fp8_block", block_n=128, block_k=128, scale_dtype="float32")
    mode = fp8_moe.fp8_mode(cc=case.cc)
    P = padded_bound(_T * _K, _E, case.config.block_m)
    alignment = grouped_gemm.Alignment(
        torch.empty(P, dtype=torch.int32, device=meta),
        torch.empty(P // case.config.block_m, dtype=torch.int32, device=meta),
        torch.empty(1, dtype=torch.int32, device=meta),
    )
    kb_h, kb_i = -(-_H // 128), -(-_I // 128)
    if case.kernel == "up":
        qx = torch.empty(_T, _H, dtype=e4m3, device=meta)
        sx = torch.empty(_T, kb_h, dtype=f32, device=meta)
        w_up = torch.empty(_E, 2 * _I, _H, dtype=e4m3, device=meta)
        s_up = torch.empty(_E, 2 * kb_i, kb_h, dtype=f32, device=meta)
        args = (qx, sx, alignment, w_up, s_up, None, spec, _K, case.config, torch.bfloat16, mode)
        return fp8_moe.up_fp8_launch(*args, interpret=False)[0]
    qa = torch.empty(_T * _K, _I, dtype=e4m3, device=meta)
    sa = torch.empty(_T * _K, kb_i, dtype=f32, device=meta)
    weights = torch.empty(_T, _K, dtype=f32, device=meta)
    w_down = torch.empty(_E, _H, _I, dtype=e4m3, device=meta)
    s_down = torch.empty(_E, kb_h, kb_i, dtype=f32, device=meta)
    args = (qa, sa, alignment, weights, w_down, s_down, None, spec, case.config, torch.bfloat16, mode)
    return fp8_moe.down_fp8_launch(*args, interpret=False)[0]


def ast_source(launch, cc: int):
    """``(ASTSource, options)`` for a launch, specialized as Triton specializes it when launching."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource, make_backend

    backend = make_backend(GPUTarget("cuda", cc, 32))
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    runtime = iter(launch.args)
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = launch.constexprs[param.name]
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, next(runtime), False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if ty == "constexpr":  # an integer equal to 1
            signature[param.name] = "constexpr"
            constexprs[param.name] = attr
            continue
        signature[param.name] = ty
        if isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    if next(runtime, None) is not None:
        raise ValueError(f"{fn.__name__}: more runtime arguments than the kernel takes")
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return ASTSource(fn, signature, constexprs, attrs), options


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _mma_kind(ptx: str, kernel: str) -> str:
    if re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx):
        return "wgmma-e4m3"  # [fp8]
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "-" if kernel == "reduce" else "fma"


def compile_case(case: Case) -> Result:
    """Compile one case for its target and read registers, spills, shared memory and the MMA kind."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(case)
    start = time.perf_counter()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        src, options = ast_source(_launch(case), case.cc)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log
            kernel = triton.compile(src, target=GPUTarget("cuda", case.cc, 32), options=options)
        text = log.getvalue()
        props, regs = _PTXAS_PROPS.search(text), _PTXAS_REGS.search(text)
        if props is None or regs is None:
            raise RuntimeError(f"no ptxas statistics in its log: {text[-500:]!r}")
        result.stack, result.spill_stores, result.spill_loads = map(int, props.groups())
        result.registers = int(regs.group(1))
        result.shared = int(kernel.metadata.shared)
        result.mma = _mma_kind(kernel.asm["ptx"], case.kernel)
        waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", kernel.asm["ptx"])]
        result.wgmma_in_flight = max(waits, default=0)
    except Exception as err:  # noqa: BLE001 - every compile error is a gate failure, reported per case
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def check(result: Result) -> list[str]:
    """The gate's verdict on one result: a list of failures (empty when it passes)."""
    case, failures = result.case, []
    if result.error is not None:
        return [f"compile error: {result.error}"]
    if result.spill_stores or result.spill_loads or result.stack:
        over = " (over 255 registers: ptxas reports 32 plus a stack)" if result.registers == 32 else ""
        failures.append(
            f"register spill: {result.stack} B stack, {result.spill_stores} B stores, "
            f"{result.spill_loads} B loads{over}"
        )
    if result.shared > SHARED_LIMIT[case.cc]:
        failures.append(f"shared memory {result.shared} B > {SHARED_LIMIT[case.cc]} B on sm_{case.cc}")
    wants_wgmma = case.kernel in ("up", "down") and case.dtype in ("fp16", "bf16") and case.config.block_m >= 64
    if case.cc == 90 and wants_wgmma and result.mma != "wgmma":
        failures.append(f"16-bit BLOCK_M={case.config.block_m} GEMM on sm_90 without wgmma ({result.mma})")
    if case.dtype == FP8 and case.cc == 90 and case.config.block_m >= 64 and result.mma != "wgmma-e4m3":
        failures.append(f"fp8 BLOCK_M={case.config.block_m} GEMM on sm_90 without wgmma e4m3 ({result.mma})")
    # fp8: each K step's MMA is waited for before its block scale applies (by design), so no in-flight rule
    if result.mma == "wgmma" and case.config.num_stages > 1 and not result.wgmma_in_flight:
        failures.append("wgmma not pipelined: every wait leaves no MMA group in flight")
    return failures


# ---------------------------------------------------------------------------------------------
# driver: cache, pool, table


def _source_hash() -> str:
    """The kernels' module and the code here that builds and compiles a case (not the checks or the table)."""
    import inspect

    digest = hashlib.sha256((Path(__file__).parent / "grouped_gemm.py").read_bytes())
    digest.update((Path(__file__).parent / "fp8_moe.py").read_bytes())  # [fp8]
    for fn in (_launch, _fp8_launch, ast_source, compile_case, _mma_kind):
        digest.update(inspect.getsource(fn).encode())
    digest.update(repr((_E, _H, _I, _T, _K, UP_LAYOUTS, DOWN_LAYOUTS, ACTIVATIONS)).encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, case: Case, source_hash: str) -> Path:
    import triton

    key = json.dumps({"case": case.key(), "source": source_hash, "triton": triton.__version__}, sort_keys=True)
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe_compile" / "compile_gate"


def run(
    selected: list[Case] | None = None,
    workers: int | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> list[Result]:
    """Compile ``selected`` (default: :func:`cases`) in a process pool, cached; every result is checked."""
    selected = cases() if selected is None else selected
    cache_dir = cache_dir or _default_cache_dir()
    source_hash = _source_hash()
    results: dict[int, Result] = {}
    todo: list[int] = []
    for i, case in enumerate(selected):
        path = _cache_path(cache_dir, case, source_hash)
        if use_cache and path.exists():
            fields = json.loads(path.read_text())
            results[i] = Result(case, **fields)
        else:
            todo.append(i)
    if todo:
        workers = workers or min(len(todo), os.cpu_count() or 1)
        # The workers compile for real targets: Triton must not be in interpreter mode when they import the
        # kernels (spawned processes copy the environment when they start, here, during the submits).
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            with ProcessPoolExecutor(workers, mp_context=_spawn()) as pool:
                futures = {i: pool.submit(compile_case, selected[i]) for i in todo}
                for i, future in futures.items():
                    results[i] = future.result()
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
        if use_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for i in todo:
                fields = dataclasses.asdict(results[i])
                fields.pop("case"), fields.pop("failures")
                _cache_path(cache_dir, selected[i], source_hash).write_text(json.dumps(fields))
    ordered = [results[i] for i in range(len(selected))]
    for result in ordered:
        result.failures = check(result)
    return ordered


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def table(results: list[Result]) -> str:
    """A markdown table of the results (one row per case)."""
    head = (
        "| kernel | config | dtype | layout | target | registers | spills (B) | shared (B) | MMA | config from | ok |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        c = r.case
        spills = r.spill_stores + r.spill_loads + r.stack
        ok = "yes" if not r.failures else "**no**"
        lines.append(
            f"| {c.kernel} | {c.config_str()} | {c.dtype} | {c.layout} | sm_{c.cc} | {r.registers} | {spills} | "
            f"{r.shared} | {r.mma}{' async' if r.wgmma_in_flight else ''} | {c.source or '-'} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"result cache (default {_default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="compile every case again")
    parser.add_argument("--target", type=int, action="append", choices=TARGETS, help="only this compute capability")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    selected = cases(tuple(args.target) if args.target else TARGETS)
    if args.list:
        for case in selected:
            print(case.kernel, case.config_str(), case.dtype, case.layout, f"sm_{case.cc}", case.source)
        print(f"{len(selected)} cases")
        return 0
    start = time.perf_counter()
    results = run(selected, workers=args.workers, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    print(table(results))
    failed = [r for r in results if r.failures]
    compiled = sum(r.seconds for r in results)
    print(
        f"\n{len(results)} cases, {len(failed)} failed; {time.perf_counter() - start:.1f} s wall "
        f"({compiled:.0f} s of compiles, cached or not)"
    )
    for r in failed:
        c = r.case
        print(f"FAIL {c.kernel} {c.config_str()} {c.dtype} {c.layout} sm_{c.cc}: {'; '.join(r.failures)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
