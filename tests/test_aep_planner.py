"""The AEP planner: sizes read from a config, its stated model checked by hand, the CLI, auto depth."""

import json

import pytest
import torch

from moe_compile import cli, planner

# a tiny Qwen3-MoE: hidden 64, 4 heads of 16 (2 KV heads), 8 experts of 32, top-2, 3 layers (layer 0 dense)
CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "mlp_only_layers": [0],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 128,
    "tie_word_embeddings": False,
}
EXPERT = 2 * 32 * 64 + 64 * 32  # gate_up [2I, H] + down [H, I]
ATTENTION = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 2 * 16  # q, k, v, o, q/k norms
DENSE = ATTENTION + 2 * 64 + 8 * 64  # + the two layer norms + the router
DENSE_MLP = ATTENTION + 2 * 64 + 3 * 64 * 96  # layer 0: a dense SwiGLU MLP instead of experts


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def test_model_shape_counts_parameters_by_structure(config_path):
    shape = planner.model_shape(cli._load_config(str(config_path)))
    assert [layer.moe for layer in shape.layers] == [False, True, True]
    dense, moe = shape.layers[0], shape.layers[1]
    assert (dense.experts, dense.dense_params) == (0, DENSE_MLP)
    assert (moe.experts, moe.expert_params, moe.top_k, moe.dense_params) == (8, EXPERT, 2, DENSE)
    assert shape.attention_flops_per_context_token == 2 * 4 * (16 + 16)
    assert shape.embedding_params == 2 * 128 * 64 + 64  # embedding, head, final norm


def test_plan_follows_the_stated_model(config_path):
    shape = planner.model_shape(cli._load_config(str(config_path)))
    s = planner.Setting(gpus=4, gpu="h100", link="nvlink", tokens_per_gpu=1000, dtype="bf16", seq_len=100)
    p = planner.plan(shape, s)
    flops_per_s = 989e12 * 0.4
    lp = p.layers[1]
    attention = 1000 * (2 * DENSE + 2 * 4 * 32 * 100 // 2) / flops_per_s
    experts = 1000 * 2 * 2 * EXPERT / flops_per_s
    assert lp.attention_s == pytest.approx(attention) and lp.compute_s == pytest.approx(attention + experts)
    assert lp.gather_s == pytest.approx(0.75 * 8 * EXPERT * 2 / 360e9)
    a2a = 1000 * 2 * 0.75 * 64 * (2 + 2) / 360e9
    assert lp.ep_s == pytest.approx(attention + 1.25 * experts + a2a + 50e-6)
    assert lp.tp_s == pytest.approx(attention + experts + 2 * (2 * 0.75 * 4 * 1000 * 64 * 2 / 360e9))
    # a tiny model on few tokens: the gather takes longer than the layer, it never hides
    assert lp.gather_s > lp.compute_s and not lp.hides and p.depth == 1
    assert p.throughput("aep") == pytest.approx(4 * 1000 / sum(x.aep_s for x in p.layers))
    assert p.memory_gb["aep"] == pytest.approx(p.memory_gb["ep"] + 2 * 8 * EXPERT * 2 / 1e9)


def test_hiding_depth():
    assert planner.hiding_depth(1.0, lambda d: 1.5 + d * 2.0) == 0  # the attention alone covers it
    assert planner.hiding_depth(1.8, lambda d: 0.5 + d * 2.0) == 1
    assert planner.hiding_depth(3.0, lambda d: 0.5 + d * 2.0) is None  # a layer's compute < its gather: link-bound
    assert planner.hiding_depth(3.0, lambda d: 0.5 + d * 2.0 if d < 2 else 10.0) is None


def test_plan_command_prints_layers_and_throughput(config_path, capsys):
    argv = ["plan", "--config", str(config_path), "--gpus", "4", "--gpu", "h200", "--link", "pcie"]
    assert cli.main([*argv, "--tokens-per-gpu", "100000", "--dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "4 x H200 SXM (141 GB), pcie (40 GB/s bus bandwidth), fp8, 100000 tokens per GPU" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("1-2"))  # layers 1 and 2 merged
    assert row.split()[1:2] == ["8"] and "yes" in row
    assert "predicted throughput (tokens/s, all GPUs): TP" in out and "AEP / best baseline" in out
    with pytest.raises(SystemExit):
        cli.main([*argv, "--tokens-per-gpu", "0", "--dtype", "fp8"])


def test_auto_depth_on_cpu_and_on_a_known_gpu(monkeypatch):
    args = {"world_size": 8, "gather_bytes": [4 * 10**9] * 4, "num_layers": 4}
    depth, why = planner.auto_prefetch_depth(torch.device("cpu"), window_flops=lambda i, d: 0, **args)
    assert (depth, why) == (1, "auto: cpu is not a device the planner models; depth 1")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    layer_flops = 5e12  # ~12.6 ms at 40% of 989 TFLOP/s; the gather of 4 GB takes ~9.7 ms
    depth, why = planner.auto_prefetch_depth(
        torch.device("cuda"), window_flops=lambda i, d: layer_flops * (d + 0.3), **args
    )
    assert (depth, why) == (1, "auto: smallest depth that hides every gather on H100 SXM over NVLink")
    depth, why = planner.auto_prefetch_depth(torch.device("cuda"), window_flops=lambda i, d: 1e9 * d, **args)
    assert depth == 1 and "link-bound" in why


def test_hot_experts_shrink_the_gather_and_add_resident_memory(config_path, capsys):
    shape = planner.model_shape(cli._load_config(str(config_path)))
    setting = dict(gpus=4, gpu="h100", link="nvlink", tokens_per_gpu=1000, dtype="bf16", seq_len=100)
    base = planner.plan(shape, planner.Setting(**setting))
    hot = planner.plan(shape, planner.Setting(**setting, hot_experts=4))
    assert hot.layers[1].gather_s == pytest.approx(base.layers[1].gather_s * 4 / 8)  # E - R = 4 of 8 gathered
    # per GPU: + the 4 resident experts of both MoE layers (minus their 1/4 shards), ring of 2 half layers + 1 cat
    resident = 2 * 4 * EXPERT * 2 * (1 - 1 / 4)
    ring_change = (2 * 4 + 8 - 2 * 8) * EXPERT * 2
    assert hot.memory_gb["aep"] == pytest.approx(base.memory_gb["aep"] + (resident + ring_change) / 1e9)
    argv = ["plan", "--config", str(config_path), "--gpus", "4", "--gpu", "h100", "--link", "nvlink"]
    assert cli.main([*argv, "--tokens-per-gpu", "1000", "--dtype", "bf16", "--hot-experts", "4"]) == 0
    assert "AEP hot experts: 4 of 8 per layer resident on every GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # the compile would refuse it
        cli.main([*argv, "--tokens-per-gpu", "1000", "--dtype", "bf16", "--hot-experts", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --hot-experts: E - R = 5 experts do not divide over 4 GPUs" in err
    assert "valid R with 4 GPUs: 0, 4, 8" in err


@pytest.mark.parametrize("args, expected", [
    (["--gpus", "3"], "argument --gpus: 3 GPUs do not divide the 8 experts of a MoE layer"),
    (["--gpus", "3"], "use --gpus 1, 2, 4 or 8"),
    (["--gpus", "16"], "argument --gpus: 16 GPUs do not divide the 8 experts"),
    (["--gpus", "4", "--hot-experts", "-5"], "argument --hot-experts: must be an integer >= 0, got -5"),
    (["--gpus", "0"], "argument --gpus: must be > 0, got 0"),
])  # fmt: skip
def test_plan_refuses_settings_the_compile_would_refuse(config_path, capsys, args, expected):
    argv = ["plan", "--config", str(config_path), "--gpu", "h100", "--link", "nvlink", "--tokens-per-gpu", "100"]
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--dtype", "bf16", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err, err
