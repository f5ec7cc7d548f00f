"""``--token-budget auto`` / ``--prefix-cache-tokens auto`` (serving/sizing.py): the maths on an injected
free-memory figure, the CPU's defaults, the CLI's parsing, and what ``/health`` and ``score`` report."""

import argparse

import pytest
import torch

from moe_compile.planner import model_shape
from moe_compile.serving import PrefillEngine
from moe_compile.serving.cli import add_subcommands
from moe_compile.serving.memory import kv_bytes_per_token, memory_accounting
from moe_compile.serving.readout import CHUNK_ROWS
from moe_compile.serving.sizing import (
    ACTIVATION_SAFETY,
    HIDDEN_COPIES,
    MAX_AUTO_TOKEN_BUDGET,
    TOKEN_ROUND,
    TOKEN_SHARE,
    Costs,
    engine_costs,
    plan_sizes,
    resolve,
)
from moe_compile.testing import zoo

MIB = 2**20
GIB = 2**30


@pytest.fixture(scope="module")
def engine():
    return PrefillEngine(zoo.build("qwen3_moe"), compile=False, block_size=8)


def test_costs_come_from_the_planner_shape_and_the_memory_accounting(engine):
    costs = engine_costs(engine)
    shape = model_shape(engine.model.config)
    text = engine.model.config
    # the prefix cache's unit is the memory accounting's; float32 keys and values of every layer
    assert costs.kv_bytes_per_token == kv_bytes_per_token(engine) == shape.kv_elements_per_token * 4
    assert costs.kv_bytes_per_token == text.num_hidden_layers * text.num_key_value_heads * 2 * text.head_dim * 4
    moe = text.num_experts_per_tok * 3 * text.moe_intermediate_size  # gate, up, down of top_k experts
    expected = ACTIVATION_SAFETY * (shape.kv_elements_per_token + HIDDEN_COPIES * text.hidden_size + moe) * 4
    assert costs.activation_bytes_per_token == int(expected)
    assert costs.fixed_bytes == memory_accounting(engine)["ring_bytes"] + CHUNK_ROWS * engine.vocab_out * 4


COSTS = Costs(kv_bytes_per_token=1000, activation_bytes_per_token=10_000, fixed_bytes=10 * MIB)


def test_both_auto_split_the_usable_memory_between_batches_and_the_cache():
    free, total = 30 * GIB, 80 * GIB
    s = plan_sizes(free, total, COSTS, None, None, block_size=16, utilization=0.9)
    usable = free - 0.1 * total - 10 * MIB  # the headroom: 10 % of the GPU, and the ring and head chunk
    assert s.token_budget == MAX_AUTO_TOKEN_BUDGET  # TOKEN_SHARE of 22 GiB holds far more than the cap
    left = usable - s.token_budget * COSTS.activation_bytes_per_token
    assert s.prefix_cache_tokens == int(left // (1000 * 16)) * 16
    assert s.prefix_cache_tokens % 16 == 0
    assert "30720 MiB free of 81920 MiB" in s.how and "--gpu-memory-utilization 0.9" in s.how


def test_the_token_budget_is_a_rounded_share_and_the_cache_the_rest():
    free, total = 1 * GIB, 2 * GIB
    s = plan_sizes(free, total, COSTS, None, None, block_size=8, utilization=0.75)
    usable = free - 0.25 * total - 10 * MIB
    assert s.token_budget == int(usable * TOKEN_SHARE // 10_000) // TOKEN_ROUND * TOKEN_ROUND
    assert s.token_budget < MAX_AUTO_TOKEN_BUDGET
    assert s.prefix_cache_tokens == int((usable - s.token_budget * 10_000) // 8000) * 8
    # the figures fill the usable memory, up to less than one block of the cache
    spent = s.token_budget * 10_000 + s.prefix_cache_tokens * 1000
    assert usable - 8000 < spent <= usable


def test_a_given_size_is_kept_and_the_other_takes_the_rest():
    free, total = 2 * GIB, 4 * GIB
    usable = free - 0.1 * total - 10 * MIB
    s = plan_sizes(free, total, COSTS, 512, None, block_size=16)
    assert s.token_budget == 512
    assert s.prefix_cache_tokens == int((usable - 512 * 10_000) // 16_000) * 16
    s = plan_sizes(free, total, COSTS, None, 100_000, block_size=16)
    assert s.prefix_cache_tokens == 100_000
    assert s.token_budget == min(MAX_AUTO_TOKEN_BUDGET, int((usable - 100_000 * 1000) // 10_000) // 256 * 256)


@pytest.mark.parametrize("free, budget, cache, expected", [
    (3 * GIB, None, None, "nothing is left after the weights"),  # 3 GiB free of 32 at 0.9: -0.2 GiB
    (4 * GIB, None, None, "fewer than 256"),  # a few MiB left: not 256 tokens
    (4 * GIB, 512, None, "leaves no block of 16 tokens"),  # a batch of 512 needs 1 GiB of 0.8
    (4 * GIB + 200 * MIB, None, 10**9, "lower --prefix-cache-tokens"),
])  # fmt: skip
def test_too_little_memory_is_a_clear_error(free, budget, cache, expected):
    costs = Costs(kv_bytes_per_token=1000, activation_bytes_per_token=2 * MIB, fixed_bytes=0)
    total = 32 * GIB
    with pytest.raises(ValueError, match=expected) as info:
        plan_sizes(free, total, costs, budget, cache, block_size=16)
    assert "MiB free of 32768 MiB" in str(info.value)


def test_resolve_with_an_injected_free_memory_figure_resizes_the_engine(engine):
    costs = engine_costs(engine)
    free, total = 64 * MIB, 100 * MIB
    sizing = resolve(engine, "auto", "auto", utilization=0.9, mem_info=(free, total))
    expected = plan_sizes(free, total, costs, None, None, engine.cache.block_size, 0.9)
    assert sizing == expected
    assert engine.token_budget == sizing.token_budget >= TOKEN_ROUND
    assert engine.cache.capacity_blocks * engine.cache.block_size == sizing.prefix_cache_tokens > 0
    assert engine.sizing == sizing.to_json()
    assert memory_accounting(engine)["prefix_cache_bytes"] == sizing.prefix_cache_tokens * costs.kv_bytes_per_token


def test_on_the_cpu_auto_keeps_the_defaults_and_says_so():
    engine = PrefillEngine(zoo.build("qwen3_moe"), compile=False, token_budget=64, prefix_cache_tokens=128)
    sizing = resolve(engine, "auto", 0)
    assert (sizing.token_budget, sizing.prefix_cache_tokens) == (2048, 0)
    assert "on cpu 'auto' keeps the defaults" in sizing.how
    assert engine.token_budget == 2048 and engine.cache is None and engine.prefix_cache_off
    assert resolve(engine, 64, 128) is None  # no auto: nothing changes
    assert engine.token_budget == 2048


def test_resolve_on_cuda_asks_the_device(engine, monkeypatch):
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 64 * MIB, 100 * MIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    sizing = resolve(engine, 256, "auto")
    assert calls == [torch.device("cuda", 0)]
    assert sizing.token_budget == 256 and "64 MiB free of 100 MiB" in sizing.how


def parse(argv):
    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_flags_take_auto_or_a_number(capsys):
    args = parse(["score", "--model", "m", "--input", "i", "--output", "o", "--token-budget", "auto",
                  "--prefix-cache-tokens", "auto", "--gpu-memory-utilization", "0.8"])  # fmt: skip
    assert (args.token_budget, args.prefix_cache_tokens, args.gpu_memory_utilization) == ("auto", "auto", 0.8)
    args = parse(["serve", "--model", "m", "--token-budget", "512"])
    assert (args.token_budget, args.prefix_cache_tokens, args.gpu_memory_utilization) == (512, 65536, 0.9)
    for flag, value, expected in [
        ("--token-budget", "automatic", "must be an integer, got 'automatic' (or auto)"),
        ("--gpu-memory-utilization", "1.5", "must be a number in [0.01, 1.0]"),
    ]:
        with pytest.raises(SystemExit):
            parse(["serve", "--model", "m", flag, value])
        assert expected in capsys.readouterr().err
