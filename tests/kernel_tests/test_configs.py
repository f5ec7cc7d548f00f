"""Config choice: interpreter blocks, seed table, heuristic fallback, opt-in autotune."""

import logging

import pytest
import torch

from moe_compile.kernels import configs
from moe_compile.kernels.configs import INTERPRETER_CONFIG, KernelConfig, select_config

QWEN3_30B = {"num_experts": 128, "up_width": 1536, "hidden_size": 2048, "top_k": 8}


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend not to interpret, on a device named like an H100."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("MOE_COMPILE_AUTOTUNE", raising=False)
    monkeypatch.delenv("MOE_COMPILE_TUNED_DIR", raising=False)  # the seed table, whatever tuned files exist
    monkeypatch.setattr(configs, "TUNED_DIR", "/nonexistent")


def _never(config: KernelConfig) -> float:
    raise AssertionError("autotune ran without MOE_COMPILE_AUTOTUNE=1")


@pytest.mark.skipif(not configs.interpreting(), reason="interpreter only")
def test_interpreter_uses_tiny_blocks():
    config = select_config(**QWEN3_30B, num_tokens=4096, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert config == INTERPRETER_CONFIG


def test_seed_table_by_token_bucket(on_gpu):
    cuda = torch.device("cuda")
    small = select_config(**QWEN3_30B, num_tokens=300, dtype=torch.bfloat16, device=cuda, bench=_never)
    large = select_config(**QWEN3_30B, num_tokens=16384, dtype=torch.bfloat16, device=cuda, bench=_never)
    assert small == configs.SEED_CONFIGS["H100"][(128, 1536, 2048)][0][1]
    assert large == configs.SEED_CONFIGS["H100"][(128, 1536, 2048)][-1][1]


def test_heuristic_fallback_is_logged(on_gpu, caplog):
    with caplog.at_level(logging.INFO, logger=configs.__name__):
        config = select_config(7, 96, 64, 5, 2, torch.float32, torch.device("cuda"), bench=_never)
    assert config == configs.heuristic(7, 5, 2, torch.float32) and config.block_k == 32
    assert "no seed config" in caplog.text


def test_heuristic_grows_with_rows_per_expert():
    block_ms = [configs.heuristic(128, T, 8, torch.bfloat16).block_m for T in (16, 512, 4096, 65536)]
    assert block_ms == sorted(block_ms) and block_ms[0] < block_ms[-1]


def test_autotune_is_opt_in(on_gpu, monkeypatch):
    monkeypatch.setattr(configs, "_AUTOTUNED", {})
    monkeypatch.setenv("MOE_COMPILE_AUTOTUNE", "1")
    timed: list[KernelConfig] = []

    def bench(config: KernelConfig) -> float:
        timed.append(config)
        return abs(config.block_m - 64) + config.block_n / 1000 + config.num_stages

    args = dict(**QWEN3_30B, num_tokens=1000, dtype=torch.bfloat16, device=torch.device("cuda"))
    best = select_config(**args, bench=bench)
    assert timed == configs.candidates(torch.bfloat16)
    assert best == min(configs.candidates(torch.bfloat16), key=bench) and best.block_m == 64
    assert select_config(**args, bench=_never) == best  # cached per shape bucket
