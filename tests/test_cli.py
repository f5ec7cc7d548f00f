"""The moe-compile command line."""

import json
import subprocess
import sys

import pytest

from moe_compile.cli import main
from moe_compile.testing import zoo


def test_inspect_checkpoint_directory(tmp_path, capsys):
    model = zoo.build("qwen2_moe")
    model.save_pretrained(tmp_path)
    assert main(["inspect", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 MoE block(s)" in out and "model.layers.1.mlp" in out and "yes (dense)" in out


def test_inspect_config_file_on_meta(tmp_path, capsys):
    config = zoo.build("deepseek_v3").config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert main(["inspect", "--config", str(path), "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert "2 MoE block(s)" in out and "sigmoid + bias correction -> group-limited top-k" in out
    assert "built on the meta device" in out


def test_inspect_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such config file or directory"):
        main(["inspect", "--config", str(tmp_path / "nope")])


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "moe_compile.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def _refused(argv, capsys, *expected):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("seq", ["129", "100000"])
def test_inspect_refuses_more_tokens_than_the_model_has_positions(seq, capsys):
    from moe_compile.predictor import TINY_MOE_DIR  # max_position_embeddings 128

    _refused(["inspect", "--config", str(TINY_MOE_DIR), "--seq", seq], capsys, "argument --seq",
             f"{seq} tokens", "at most 128")  # fmt: skip


@pytest.mark.parametrize("flag, value, expected", [
    ("--seq", "0", "must be an integer >= 1, got 0"),
    ("--layers", "0", "must be an integer >= 1, got 0"),
    ("--layers", "11", "the model has 10 decoder layers"),
])  # fmt: skip
def test_inspect_argument_ranges(flag, value, expected, capsys):
    from moe_compile.predictor import TINY_MOE_DIR

    _refused(["inspect", "--config", str(TINY_MOE_DIR), flag, value], capsys, f"argument {flag}", expected)
