"""moe_compile.loading in one process: layouts, files, dtypes, devices (ranks: tests/test_loading_dist.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_compile.loading import Checkpoint, CheckpointError, expert_parameters, load_model
from moe_compile.runtime import dist as rdist
from moe_compile.testing import zoo

LAYOUTS = {
    "per_expert": {},  # transformers' default: save_original_format=True, experts.{e}.gate_proj.weight ...
    "stacked": {"save_original_format": False},  # [E, ...] tensors, as GPT-OSS ships them
    "multi_file": {"max_shard_size": "40KB"},  # model.safetensors.index.json over several files
}


def save(model, path, layout: str) -> None:
    model.save_pretrained(path, **LAYOUTS[layout])


def checkpoint_keys(path) -> list[str]:
    return Checkpoint(path).keys()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_load_model_equals_the_model_it_was_saved_from(tmp_path, family, layout):
    model = zoo.build(family, num_layers=2)
    save(model, tmp_path, layout)
    keys = checkpoint_keys(tmp_path)
    if layout == "multi_file":
        assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    if family != "gpt_oss" and layout != "stacked":  # the layout under test is the one on disk
        assert any(".experts.1." in k for k in keys), keys
    else:
        assert not any(".experts.1." in k for k in keys), keys
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    x = zoo.make_inputs(model, seed=7)  # fresh inputs
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    # every tensor owns its memory: none is a view of the file's memory map (which would keep it mapped)
    assert all(t.untyped_storage().resizable() for t in [*loaded.parameters(), *loaded.buffers()])
    info = loaded.moe_compile_load
    experts = expert_parameters(loaded)
    assert experts and info.expert_bytes == info.full_expert_bytes
    assert info.expert_bytes == sum(loaded.get_parameter(n).nbytes for n in experts)


def test_dtype_defaults_float32_on_the_cpu_and_auto_keeps_the_checkpoints(tmp_path):
    model = zoo.build("qwen3_moe", num_layers=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert load_model(tmp_path, device="cpu").dtype == torch.float32  # no dtype on the CPU: float32
    auto = load_model(tmp_path, device="cpu", dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in auto.parameters())
    assert load_model(tmp_path, device="cpu", dtype="float16").dtype == torch.float16
    # the rule itself: auto is the default on CUDA; fp8 storage computes in bf16
    cuda = torch.device("cuda", 0)
    assert rdist.resolve_dtype(None, torch.device("cpu"), torch.bfloat16) == torch.float32
    assert rdist.resolve_dtype("auto", torch.device("cpu"), torch.float8_e4m3fn) == torch.bfloat16
    if torch.cuda.is_available():
        assert rdist.resolve_dtype(None, cuda, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float8': use one of float32, bfloat16, float16, auto"):
        rdist.resolve_dtype("float8", torch.device("cpu"), torch.float32)


def test_device_resolution_and_its_errors(monkeypatch):
    assert rdist.resolve_device("cpu") == torch.device("cpu")
    assert rdist.backend_for(torch.device("cpu")) == "gloo"
    assert rdist.backend_for(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="device 'tpu': use auto, cpu, cuda or cuda:N"):
        rdist.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert rdist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available on this machine; use --device cpu"):
            rdist.resolve_device("cuda")
    # the GPU count rules, with the count a 2-GPU machine reports
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rdist.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert rdist.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"local rank 2 needs GPU 2, but this machine has 2 GPU\(s\); start at most 2"):
        rdist.resolve_device("auto", local_rank=2)
    with pytest.raises(ValueError, match="GPU 5 needs GPU 5"):
        rdist.resolve_device("cuda:5")


def _parser():
    from moe_compile.serving.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error")
def test_cli_device_cuda_without_cuda_is_a_one_line_argparse_error(tmp_path, capsys):
    from moe_compile.serving.cli import _engine

    zoo.build("qwen3_moe", num_layers=1).save_pretrained(tmp_path)
    args = _parser().parse_args(["serve", "--model", str(tmp_path), "--device", "cuda", "--no-compile"])
    with pytest.raises(SystemExit):
        _engine(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --device: device 'cuda': CUDA is not available on this machine; use --device "
                        "cpu (or auto)"), err  # fmt: skip


def test_cli_device_and_dtype_on_the_cpu(tmp_path):
    from moe_compile.serving.cli import _engine

    model = zoo.build("qwen3_moe", num_layers=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    for argv, dtype in (
        ([], torch.float32),
        (["--dtype", "auto"], torch.bfloat16),
        (["--device", "cpu"], torch.float32),
    ):
        engine = _engine(_parser().parse_args(["serve", "--model", str(tmp_path), "--no-compile", *argv]))
        assert engine.model.dtype == dtype and engine.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_serves_a_bf16_checkpoint_in_bf16_on_the_gpu(tmp_path):
    model = zoo.build("qwen3_moe", num_layers=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    x = zoo.make_inputs(model)
    with torch.no_grad():
        want = model.cuda()(x.cuda()).logits
        assert torch.equal(loaded(x.cuda()).logits, want)


def test_a_missing_shard_file_is_named(tmp_path):
    zoo.build("qwen3_moe", num_layers=2).save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(tmp_path.glob("model-*.safetensors"))
    files[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{files[1].name}: shard file missing .*copy the checkpoint again"):
        load_model(tmp_path, device="cpu")


def test_a_truncated_shard_file_is_named(tmp_path):
    zoo.build("qwen3_moe", num_layers=2).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: not a readable safetensors file .*truncated"):
        load_model(tmp_path, device="cpu")


def test_a_checkpoint_without_a_tensor_the_model_needs(tmp_path):
    from safetensors.torch import load_file, save_file

    zoo.build("qwen3_moe", num_layers=1).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for expert 2 of model.layers.0.mlp.experts.gate_up_proj"):
        load_model(tmp_path, device="cpu")


def test_from_pretrained_reference_agrees_with_load_model(tmp_path):
    """The loader reads what transformers' own loading reads, on a per-expert checkpoint with renamed keys."""
    zoo.build("mixtral", num_layers=2).save_pretrained(tmp_path)
    assert any("block_sparse_moe" in k or ".w1." in k for k in checkpoint_keys(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    got = load_model(tmp_path, device="cpu")
    for name, value in ref.state_dict().items():
        assert torch.equal(got.state_dict()[name], value), name


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_bf16_load_keeps_the_tensors_transformers_keeps_in_fp32(tmp_path, family):
    """In bf16, rope's inv_freq and DeepSeek-V3's router (gate weight and score-correction bias) stay fp32, as
    from_pretrained keeps them: each tensor takes the dtype transformers' own init gives it, not the compute's."""
    model = zoo.build(family, num_layers=3)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer))  # not its initial zeros: a skipped load would show
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    got = load_model(tmp_path, device="cpu", dtype="bfloat16")
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    have = {**dict(got.named_parameters()), **dict(got.named_buffers())}
    assert sorted(want) == sorted(have)
    kept = sorted(n for n, t in want.items() if t.dtype == torch.float32)
    assert any("inv_freq" in n for n in kept), kept
    if family == "deepseek_v3":
        assert any("e_score_correction_bias" in n for n in kept), kept
    for name, value in want.items():
        assert have[name].dtype == value.dtype and torch.equal(have[name], value), name
    x = zoo.make_inputs(model, seed=3)
    with torch.no_grad():
        assert torch.equal(got(x).logits, ref(x).logits)


def test_a_checkpoint_without_a_routing_bias_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    zoo.build("deepseek_v3", num_layers=2).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (bias,) = [k for k in tensors if k.endswith("e_score_correction_bias")][:1]
    del tensors[bias]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for the buffer .*e_score_correction_bias"):
        load_model(tmp_path, device="cpu")


def test_an_fp8_checkpoint_is_sent_to_the_fp8_loader(tmp_path):
    zoo.build("qwen3_moe", num_layers=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="an fp8 checkpoint .*load_fp8_model"):
        load_model(tmp_path, device="cpu")


def test_memory_accounting_of_a_whole_model(tmp_path):
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.memory import memory_accounting

    model = zoo.build("qwen3_moe", num_layers=2)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    engine = PrefillEngine(loaded, compile=False, prefix_cache_tokens=256, block_size=16)
    memory = memory_accounting(engine)
    experts = expert_parameters(loaded)
    assert memory["expert_bytes"] == sum(loaded.get_parameter(n).nbytes for n in experts)
    unique = {p.untyped_storage().data_ptr(): p.nbytes for n, p in loaded.named_parameters() if n not in experts}
    assert memory["dense_bytes"] == sum(unique.values()) + sum(b.nbytes for b in loaded.buffers())
    assert memory["ring_bytes"] == 0
    cfg = loaded.config  # keys and values of every layer for 256 tokens
    assert memory["prefix_cache_bytes"] == 256 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
