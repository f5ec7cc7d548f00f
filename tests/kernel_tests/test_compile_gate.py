"""The compile gate: every launchable kernel compiles for sm_80/sm_90 without spills, and its checks can fail."""

import dataclasses

import pytest
import torch

from moe_compile.kernels import compile_gate, configs
from moe_compile.kernels.compile_gate import Case, Result, check
from moe_compile.kernels.configs import KernelConfig

_MID = KernelConfig(64, 128, 64, 8, 4, 4)


def _result(case: Case, **fields) -> Result:
    base = {
        "registers": 128,
        "stack": 0,
        "spill_stores": 0,
        "spill_loads": 0,
        "shared": 98_304,
        "mma": "wgmma",
        "wgmma_in_flight": 1,
    }
    return Result(case, **{**base, **fields})


def test_check_flags_each_failure_kind():
    case = Case("up", _MID, "bf16", "standard", 90)
    assert check(_result(case)) == []
    assert "register spill" in check(_result(case, spill_stores=24, spill_loads=24))[0]
    over_255 = check(_result(case, registers=32, stack=35_000))
    assert len(over_255) == 1 and "over 255 registers" in over_255[0]
    assert "shared memory 232449 B > 232448 B" in check(_result(case, shared=232_449))[0]
    assert "shared memory" in check(_result(dataclasses.replace(case, cc=80), shared=166_913, mma="mma.sync"))[0]
    assert "without wgmma (mma.sync)" in check(_result(case, mma="mma.sync"))[0]
    assert "compile error" in check(_result(case, error="CompilationError: boom"))[0]
    assert "not pipelined" in check(_result(case, wgmma_in_flight=0))[0]


def test_check_asks_wgmma_only_where_hopper_can_use_it():
    small_m = Case("up", KernelConfig(32, 128, 64, 8, 4, 4), "bf16", "standard", 90)
    fp32 = Case("down", _MID, "fp32", "standard", 90)
    ampere = Case("up", _MID, "fp16", "standard", 80)
    assert check(_result(small_m, mma="mma.sync")) == []
    assert check(_result(fp32, mma="fma")) == []
    assert check(_result(ampere, mma="mma.sync")) == []


def test_check_fp8_rules():
    """[fp8] sm_90 wants wgmma on e4m3 operands at BLOCK_M >= 64; no in-flight rule (scaled per K step by design)."""
    fp8 = Case("up", _MID, "fp8", "standard", 90)
    assert check(_result(fp8, mma="wgmma-e4m3", wgmma_in_flight=0)) == []
    assert "without wgmma e4m3 (wgmma)" in check(_result(fp8, mma="wgmma"))[0]
    assert "without wgmma e4m3 (mma.sync)" in check(_result(fp8, mma="mma.sync"))[0]
    assert check(_result(dataclasses.replace(fp8, cc=80), mma="mma.sync", wgmma_in_flight=0)) == []


def test_fp8_cases_cover_both_targets():
    from moe_compile.kernels.fp8_moe import DECODE_CONFIGS

    fp8 = [c for c in compile_gate.cases() if c.dtype == "fp8"]
    for cc in compile_gate.TARGETS:
        assert {("up", cc), ("down", cc)} <= {(c.kernel, c.cc) for c in fp8}
    assert {c.config for c in fp8 if c.cc == 80} == {c for _, c in DECODE_CONFIGS}
    native = {compile_gate._compile_key(c.config) for c in fp8 if c.cc == 90}
    reachable = set(configs.heuristic_configs(torch.bfloat16)) | {
        c for table in configs.SEED_CONFIGS.values() for bs in table.values() for _, c in bs
    }
    assert {compile_gate._compile_key(c) for c in reachable} <= native
    assert all(128 % c.config.block_k == 0 for c in fp8)  # a K step never straddles two scale blocks


def _compile_keys(dtype_name: str) -> set[tuple]:
    return {compile_gate._compile_key(c.config) for c in compile_gate.cases() if c.dtype == dtype_name and c.config}


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_cases_cover_every_selectable_config(dtype_name):
    dtype = compile_gate.DTYPES[dtype_name]
    selectable = set(configs.heuristic_configs(dtype)) | set(configs.candidates(dtype))
    if dtype == torch.bfloat16:
        selectable |= {c for table in configs.SEED_CONFIGS.values() for bs in table.values() for _, c in bs}
    assert {compile_gate._compile_key(c) for c in selectable} <= _compile_keys(dtype_name)
    layouts = {(c.kernel, c.layout, c.cc) for c in compile_gate.cases() if c.dtype == dtype_name}
    for cc in compile_gate.TARGETS:
        assert {("up", name, cc) for name in compile_gate.UP_LAYOUTS} <= layouts
        assert {("up", name, cc) for name in compile_gate.ACTIVATIONS} <= layouts
        assert {("down", name, cc) for name in compile_gate.DOWN_LAYOUTS} <= layouts
        assert ("reduce", "-", cc) in layouts


@pytest.mark.slow  # real ptxas compiles (over 10 s)
def test_real_compiles_are_flagged(tmp_path):
    """Deliberately bad configs, compiled for real: a spilling tile and one over Hopper's shared memory."""
    spilling = Case("down", KernelConfig(128, 256, 32, 8, 4, 2), "fp32", "standard", 80)  # 256 fp32 acc/thread
    too_much_shared = Case("down", KernelConfig(64, 256, 128, 8, 4, 6), "bf16", "standard", 90)  # 6 x 80 KiB
    fine = Case("down", _MID, "bf16", "standard", 90)
    spill, shared, ok = compile_gate.run([spilling, too_much_shared, fine], workers=2, cache_dir=tmp_path)
    assert any("register spill" in f for f in spill.failures), spill
    assert any("shared memory" in f for f in shared.failures), shared
    assert ok.failures == [] and ok.mma == "wgmma" and 0 < ok.shared <= compile_gate.SHARED_LIMIT[90], ok
    # cached: the same results without compiling
    again = compile_gate.run([spilling, too_much_shared, fine], workers=2, cache_dir=tmp_path)
    assert [(r.registers, r.shared, r.failures) for r in again] == [
        (r.registers, r.shared, r.failures) for r in (spill, shared, ok)
    ]


@pytest.mark.slow
def test_every_launchable_kernel_compiles_clean_for_sm80_and_sm90():
    results = compile_gate.run(workers=2)
    failed = [(r.case, r.failures) for r in results if r.failures]
    assert not failed, "\n".join(f"{c}: {f}" for c, f in failed)
    gpt_oss = [r for r in results if r.case.layout == "gpt-oss" and r.case.dtype == "bf16" and r.case.cc == 90]
    assert gpt_oss and all(r.mma == "wgmma" for r in gpt_oss if r.case.config.block_m >= 64)
    fp8 = [r for r in results if r.case.dtype == "fp8" and r.case.cc == 90 and r.case.config.block_m >= 64]
    assert fp8 and all(r.mma == "wgmma-e4m3" for r in fp8)
