"""A saved block-fp8 checkpoint directory (Qwen3-FP8 layout: one fp8 tensor and ``weight_scale_inv`` per expert)
loads with its experts in fp8, is scored by ``moe-compile score``, and bad checkpoints are refused clearly."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving_helpers import eager_value, rel_err

import moe_compile
from moe_compile.quant.loading import load_fp8_model
from moe_compile.quant.prepare_fp8 import FP8StackedExperts, fp8_bytes
from moe_compile.serving import Request
from moe_compile.serving.cli import add_subcommands
from moe_compile.testing import zoo
from moe_compile.testing.fp8 import expert_param_bytes, quantize_model, save_fp8_checkpoint

OVERRIDES = {"hidden_size": 160, "moe_intermediate_size": 72}  # partial blocks in H and I


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    model = zoo.build("qwen3_moe", dtype=torch.bfloat16, overrides=OVERRIDES)
    path = tmp_path_factory.mktemp("qwen3_moe_fp8")
    save_fp8_checkpoint(model, path)
    return path, model


def test_loaded_checkpoint_keeps_experts_fp8_and_equals_the_quantized_model(fp8_dir):
    path, model = fp8_dir
    stored = load_file(str(path / "model.safetensors"))
    assert stored["model.layers.0.mlp.experts.3.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"].dtype == torch.float32
    loaded = load_fp8_model(path)
    experts = [m for m in loaded.modules() if isinstance(m, FP8StackedExperts)]
    assert len(experts) == len(zoo.moe_layer_indices("qwen3_moe", loaded.config))
    assert all(m.w_up.dtype == m.w_down.dtype == torch.float8_e4m3fn for m in experts)
    assert fp8_bytes(loaded)["weights"] * 2 == expert_param_bytes(model)  # half of bf16, measured
    reference, _ = quantize_model(model)
    moe_compile.prepare(reference)
    ids = zoo.make_inputs(model, seq=6)
    with torch.no_grad():
        assert torch.equal(zoo.logits(loaded, ids), zoo.logits(reference, ids))


def test_score_on_the_fp8_checkpoint(fp8_dir, tmp_path, capsys):
    path, _ = fp8_dir
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    rows = [{"id": f"r{i}", "tokens": list(range(3, 12 + i)), "labels": [5, 6]} for i in range(4)]
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["score", "--model", str(path), "--input", str(requests), "--output", str(output)]) == 0
    assert "scored 4 requests" in capsys.readouterr().out
    report = moe_compile.last_report()
    assert report.blocks and all(b.quantization.startswith("fp8") for b in report.blocks)
    loaded = load_fp8_model(path)
    for line in output.read_text().splitlines():
        record = json.loads(line)
        row = next(r for r in rows if r["id"] == record["id"])
        expected = eager_value(loaded, Request(id=0, tokens=tuple(row["tokens"]), labels=(5, 6)))
        assert rel_err(torch.tensor(record["logprobs"]), expected) < 1e-2


def _copy(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_block_size_is_refused(fp8_dir, tmp_path, capsys):
    path, _ = fp8_dir
    bad = _copy(
        path, tmp_path / "b64", edit_config=lambda c: c["quantization_config"].update(weight_block_size=[64, 64])
    )
    with pytest.raises(ValueError, match=r"weight_block_size \[64, 64\] is not supported.*\[128, 128\]"):
        load_fp8_model(bad)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "tokens": [3, 4]}) + "\n")
    with pytest.raises(SystemExit) as stop:
        run_cli(["score", "--model", str(bad), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")])
    assert stop.value.code == 2 and "weight_block_size [64, 64] is not supported" in capsys.readouterr().err


def test_missing_scale_is_refused(fp8_dir, tmp_path):
    path, _ = fp8_dir
    key = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
    bad = _copy(path, tmp_path / "noscale", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"{key} is missing \\(the block scales of an fp8 weight\\)"):
        load_fp8_model(bad)


def test_scale_of_wrong_shape_is_refused(fp8_dir, tmp_path):
    path, _ = fp8_dir
    key = "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv"

    def widen(tensors):
        tensors[key] = torch.ones(3, 1)  # down_proj [160, 72]: the grid is (2, 1)

    bad = _copy(path, tmp_path / "badshape", edit_tensors=widen)
    with pytest.raises(ValueError, match=r"down_proj.weight: scale shape \(3, 1\) does not match weight \(160, 72\)"):
        load_fp8_model(bad)


def test_ue8m0_and_bf16_scales_load_converted(fp8_dir, tmp_path):
    path, _ = fp8_dir

    def powers_of_two(tensors, dtype):
        for k in [k for k in tensors if k.endswith("weight_scale_inv")]:
            tensors[k] = torch.exp2(torch.round(torch.log2(tensors[k]))).to(dtype)

    e8m0 = _copy(path, tmp_path / "e8m0", edit_tensors=lambda t: powers_of_two(t, torch.float8_e8m0fnu))
    bf16 = _copy(path, tmp_path / "bf16", edit_tensors=lambda t: powers_of_two(t, torch.bfloat16))
    fp32 = _copy(path, tmp_path / "fp32", edit_tensors=lambda t: powers_of_two(t, torch.float32))
    models = [load_fp8_model(p) for p in (e8m0, bf16, fp32)]
    ids = torch.arange(3, 10).unsqueeze(0)
    with torch.no_grad():
        out = [zoo.logits(m, ids) for m in models]
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[2])


def test_stacked_layout_in_two_files_loads_as_the_per_expert_one(fp8_dir, tmp_path):
    path, model = fp8_dir
    stacked = tmp_path / "stacked"
    save_fp8_checkpoint(model, stacked, layout="stacked")  # experts.gate_up_proj [E, 2I, H] + its _scale_inv
    assert (stacked / "model.safetensors.index.json").is_file()
    a, b = load_fp8_model(path), load_fp8_model(stacked)
    ids = zoo.make_inputs(model, seq=6, seed=7)
    with torch.no_grad():
        assert torch.equal(zoo.logits(a, ids), zoo.logits(b, ids))


def test_a_rank_load_without_a_group_keeps_its_experts_only(fp8_dir):
    """``world_size``/``rank`` given (no process group): rank 1 of 2's rows, registered as the shards of
    full-shape tensors with no storage (the multi-rank tests check the bytes and the AEP compile)."""
    from moe_compile.loading.model import experts_zeroed_if_sharded, is_sharded
    from moe_compile.runtime import shards

    path, _ = fp8_dir
    whole, part = load_fp8_model(path), load_fp8_model(path, parallel="aep", world_size=2, rank=1)
    assert not is_sharded(whole) and is_sharded(part)
    experts = [(n, m) for n, m in part.named_modules() if isinstance(m, FP8StackedExperts)]
    assert experts
    for name, module in experts:
        full = whole.get_submodule(name)
        for attr in ("w_up", "w_down", "w_up_scale", "w_down_scale"):
            param, want = getattr(module, attr), getattr(full, attr)
            (shard,) = shards.registered(param)
            assert param.shape == want.shape and param.untyped_storage().nbytes() == 0
            assert shard.dtype == want.dtype and torch.equal(shard.view(torch.uint8), want[4:].view(torch.uint8))
    info = part.moe_compile_load
    assert (info.world_size, info.rank) == (2, 1) and info.expert_bytes * 2 == info.full_expert_bytes
    assert info.full_expert_bytes == sum(fp8_bytes(whole).values())
    ids = zoo.make_inputs(part, seq=4)
    with torch.no_grad(), experts_zeroed_if_sharded(part):  # the serving engine's probe runs on it
        assert torch.isfinite(zoo.logits(part, ids)).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parallel": "aep", "world_size": 3, "rank": 0},
         "E=8 experts do not divide evenly over 3 ranks; use a world size that divides 8"),
        ({"parallel": "ep", "world_size": 2, "rank": 0}, "parallel='ep': use None or 'aep'"),
        ({"world_size": 2, "rank": 0}, "world_size=2, rank=0 need parallel='aep'"),
        ({"parallel": "aep", "world_size": 2}, "give both, or neither"),
        ({"parallel": "aep", "world_size": 2, "rank": 2}, "0 <= rank < world_size"),
    ],
)  # fmt: skip
def test_bad_sharding_arguments_are_refused(fp8_dir, kwargs, message):
    path, _ = fp8_dir
    with pytest.raises(ValueError, match=re.escape(message)):
        load_fp8_model(path, **kwargs)
