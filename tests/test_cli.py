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
