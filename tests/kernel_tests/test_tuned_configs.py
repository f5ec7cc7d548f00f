"""Measured config tables as JSON files per device: naming, validation, lookup order, writer round trip."""

import json

import pytest
import torch

from moe_compile.kernels import configs
from moe_compile.kernels.configs import KernelConfig, select_config

H100 = "NVIDIA H100 80GB HBM3"
QWEN3_30B = {"num_experts": 128, "up_width": 1536, "hidden_size": 2048, "top_k": 8}
SMALL, LARGE = KernelConfig(32, 64, 64, 4, 4, 2), KernelConfig(128, 64, 128, 8, 8, 5)


@pytest.fixture
def on_h100(monkeypatch, tmp_path):
    """Not interpreting, a device named like an H100, tuned files read from ``tmp_path``."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    monkeypatch.delenv("MOE_COMPILE_AUTOTUNE", raising=False)
    monkeypatch.setenv("MOE_COMPILE_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "TUNED_DIR", str(tmp_path / "package"))  # no shipped file interferes
    return tmp_path


def _select(num_tokens: int, dtype=torch.bfloat16) -> KernelConfig:
    return select_config(**QWEN3_30B, num_tokens=num_tokens, dtype=dtype, device=torch.device("cuda"))


def test_file_name_is_sanitised():
    assert configs.tuned_file_name(H100) == "nvidia_h100_80gb_hbm3.json"
    assert configs.tuned_file_name(" NVIDIA H200 (MIG 1g.18gb) ") == "nvidia_h200_mig_1g_18gb.json"
    with pytest.raises(ValueError, match="cannot name"):
        configs.tuned_file_name("  ")


def test_written_table_is_loaded_before_the_seeds(on_h100):
    seed_small, seed_other = _select(300), select_config(8, 28672, 4096, 300, 2, torch.bfloat16, torch.device("cuda"))
    assert seed_small != SMALL and seed_other != SMALL  # no file yet: the seed table (or the heuristic)
    table = {(128, 1536, 2048): [(512, SMALL), (4096, LARGE)]}
    path = on_h100 / configs.tuned_file_name(H100)
    doc = configs.write_tuned(str(path), H100, torch.bfloat16, table, triton="3.6.0")
    assert json.loads(path.read_text()) == doc and doc["triton"] == "3.6.0"
    assert (_select(300), _select(4096), _select(65536)) == (SMALL, LARGE, LARGE)  # last bucket covers the rest
    assert _select(300, torch.float16) == configs.heuristic(128, 300, 8, torch.float16)  # a bf16 file only
    other = select_config(8, 28672, 4096, 300, 2, torch.bfloat16, torch.device("cuda"))
    assert other == seed_other  # shape not in the file: as before


def test_env_folder_comes_before_the_package(on_h100, monkeypatch):
    package = on_h100 / "package"
    configs.write_tuned(
        str(package / configs.tuned_file_name(H100)), H100, torch.bfloat16, {(128, 1536, 2048): [(1, LARGE)]}
    )
    assert _select(300) == LARGE
    configs.write_tuned(
        str(on_h100 / configs.tuned_file_name(H100)), H100, torch.bfloat16, {(128, 1536, 2048): [(1, SMALL)]}
    )
    assert _select(300) == SMALL
    monkeypatch.delenv("MOE_COMPILE_TUNED_DIR")
    assert _select(300) == LARGE


def _doc(**changes):
    doc = {
        "format": 1,
        "device_name": H100,
        "dtype": "bfloat16",
        "tables": [{"E": 128, "N": 1536, "H": 2048, "buckets": [{"max_tokens": 512, "config": vars(SMALL).copy()}]}],
    }
    doc.update(changes)
    return doc


def _bucket(**config_changes):
    return [
        {"E": 128, "N": 1536, "H": 2048, "buckets": [{"max_tokens": 512, "config": {**vars(SMALL), **config_changes}}]}
    ]


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "expected a JSON object"),
        (_doc(format=2), "'format' must be 1"),
        (_doc(dtype="fp8"), "'dtype' must be"),
        (_doc(tables={}), "'tables' must be a list"),
        (_doc(tables=[{"E": 128, "N": 0, "H": 2048, "buckets": []}]), "positive integers"),
        (_doc(tables=[{"E": 128, "N": 1536, "H": 2048, "buckets": []}]), "non-empty list"),
        (_doc(tables=_bucket(block_m=48)), "powers of two"),
        (_doc(tables=_bucket(num_stages=0)), "positive integers"),
        (
            _doc(tables=[{**_bucket()[0], "buckets": [{"max_tokens": 512, "config": {"block_m": 64}}]}]),
            "exactly the fields",
        ),
        (
            _doc(tables=[{**_bucket()[0], "buckets": _bucket()[0]["buckets"] * 2}]),
            r"'max_tokens' must ascend \(512 after 512\)",
        ),
        (_doc(tables=_bucket() * 2), "appears twice"),
    ],
)
def test_malformed_document_names_the_problem(doc, message):
    with pytest.raises(ValueError, match=message) as err:
        configs.parse_tuned(doc, "x.json")
    assert "malformed tuned-config file x.json" in str(err.value) and "--autotune" in str(err.value)


def test_malformed_file_fails_loudly_at_selection(on_h100):
    path = on_h100 / configs.tuned_file_name(H100)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"malformed tuned-config file {path}: not JSON"):
        _select(300)
    path.write_text(json.dumps(_doc(tables=_bucket(group_m="8"))))
    with pytest.raises(ValueError, match="config values must be positive integers"):
        _select(300)


def test_autotuned_winners_become_a_table(on_h100, monkeypatch):
    monkeypatch.setattr(configs, "_AUTOTUNED", {})
    monkeypatch.setenv("MOE_COMPILE_AUTOTUNE", "1")
    fastest = {SMALL: lambda T: 1.0 if T <= 512 else 3.0, LARGE: lambda T: 2.0}
    monkeypatch.setattr(configs, "candidates", lambda dtype: list(fastest))
    for T in (300, 5000):
        select_config(**QWEN3_30B, num_tokens=T, dtype=torch.bfloat16, device=torch.device("cuda"),
                      bench=lambda c, T=T: fastest[c](T))  # fmt: skip
    table = configs.autotuned_table(H100, torch.bfloat16)
    assert table == {(128, 1536, 2048): [(512, SMALL), (8192, LARGE)]}
    assert configs.autotuned_table("NVIDIA A100", torch.bfloat16) == {}
    configs.write_tuned(str(on_h100 / configs.tuned_file_name(H100)), H100, torch.bfloat16, table)
    monkeypatch.delenv("MOE_COMPILE_AUTOTUNE")
    assert (_select(300), _select(5000)) == (SMALL, LARGE)


def test_no_file_for_cpu_or_unknown_devices(on_h100):
    assert configs.tuned_from_file("cpu", (128, 1536, 2048), 10, torch.bfloat16) is None
    assert configs.load_tuned("NVIDIA B200") is None
