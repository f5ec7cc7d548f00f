"""Pre-attention expert predictors: the shipped model, collection, training, files, evaluation, CLI.

Everything runs on the shipped tiny MoE (``moe_compile/assets/tiny_moe``) with a few thousand tokens
and one or two epochs, so the whole file takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

from moe_compile.predictor import (
    TINY_MOE_DIR,
    ExpertPredictor,
    PredictorFileError,
    TrainConfig,
    collect_routing,
    corpus,
    evaluate,
    format_table,
    load_bundle,
    load_model,
    load_predictors,
    load_predictors_for_routers,
    moe_layers,
    predict_topk,
    ranking_loss,
    read_metadata,
    save_bundle,
    text_chunks,
    topk_accuracy,
    train_predictors,
)
from moe_compile.predictor.cli import add_subcommands
from moe_compile.predictor.tiny_moe import tiny_moe_config
from moe_compile.testing import zoo

SEQ = 128
MOE_LAYERS = list(range(1, 10))  # the shipped model: 10 decoder layers, layer 0 dense, layers 1-9 MoE
FAST = TrainConfig(epochs=2, batch_size=128)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def train_chunks():
    return text_chunks(None, "train", SEQ, 48 * SEQ)  # [48, 128]


@pytest.fixture(scope="module")
def heldout_chunks():
    return text_chunks(None, "heldout", SEQ, 16 * SEQ)  # [16, 128]


@pytest.fixture(scope="module")
def bundle(model, train_chunks):
    return train_predictors(model, train_chunks, FAST, progress=False)


@pytest.fixture(scope="module")
def predictor_file(bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("predictor") / "tiny.safetensors"
    save_bundle(bundle, path)
    return path


# --- the shipped model and its corpus ---------------------------------------------------------------


def test_shipped_model_is_a_standard_trained_moe(model, heldout_chunks):
    assert isinstance(model, transformers.Qwen3MoeForCausalLM)
    assert model.config.num_hidden_layers == 10 and model.config.num_experts == 8
    assert [moe.index for moe in moe_layers(model)] == MOE_LAYERS  # layer 0 is a dense MLP
    summary = json.loads((TINY_MOE_DIR / "training.json").read_text())
    assert summary["heldout_loss_nats_per_byte"] < 2.0  # uniform over 259 ids would be 5.56
    ids = heldout_chunks[:4]
    logits = model(input_ids=ids).logits  # [4, 128, 259]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() < 2.5


def test_tiny_moe_config_dense_first_layers():
    """``train_lm --layers N --dense-first D``: the first D decoder layers are dense, the rest MoE."""
    model = transformers.Qwen3MoeForCausalLM(tiny_moe_config(num_layers=3, dense_first=1))
    assert [moe.index for moe in moe_layers(model)] == [1, 2]
    assert not hasattr(model.model.layers[0].mlp, "gate")
    with pytest.raises(ValueError, match="dense_first must be in"):
        tiny_moe_config(num_layers=2, dense_first=2)


def test_byte_tokenizer_matches_corpus_encoding():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINY_MOE_DIR))
    text = "def f(x):\n    return x ** 2  # é\n"
    assert tokenizer(text, add_special_tokens=False).input_ids == corpus.encode(text.encode()).tolist()
    assert corpus.decode(corpus.encode(text.encode())) == text.encode()


def test_corpus_split_is_by_file_and_disjoint():
    train, heldout = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert len(heldout) < len(train) / 4


def test_routing_is_learned(model, heldout_chunks):
    """Trained routers are peaked per token; a random-init one is near uniform (mass ~K/E, entropy ~log E).

    The load histogram cannot show this: random routers are skewed too, and the balancing loss
    flattens trained ones.
    """
    data = collect_routing(model, heldout_chunks, progress=False)
    for layer in data.layers:
        logits = torch.nn.functional.linear(data.router_input[layer], model.model.layers[layer].mlp.gate.weight)
        probs = logits.softmax(-1)  # [N, E]
        top_k_mass = probs.gather(1, data.topk[layer]).sum(-1).mean()
        entropy = -(probs * probs.log()).sum(-1).mean()
        assert top_k_mass > 0.6 and entropy < 0.7 * torch.log(torch.tensor(8.0)), f"layer {layer}"
        load = torch.bincount(data.topk[layer].flatten(), minlength=8)  # [E]
        assert (load > 0).all(), f"layer {layer} has an unused expert"


# --- collection ------------------------------------------------------------------------------------


def test_collect_records_pre_attention_residual_and_router_choices(model, heldout_chunks):
    ids = heldout_chunks[:2]  # [2, 128]
    data = collect_routing(model, ids, progress=False)
    assert data.layers == MOE_LAYERS and data.num_tokens == 256
    # the first MoE layer's pre-attention activation is the dense layer 0's output
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # [2, 128, H]: after layer 0
    torch.testing.assert_close(data.pre_attention[1], hidden.reshape(256, -1))
    for layer in data.layers:
        router = model.model.layers[layer].mlp.gate
        assert data.topk[layer].shape == (256, 2)
        torch.testing.assert_close(data.topk[layer], router(data.router_input[layer])[2])


# --- loss, predictor, training ---------------------------------------------------------------------


def test_ranking_loss_values_and_preference():
    chosen = torch.tensor([[2, 0]])  # [1, K]
    uniform = torch.zeros(1, 4)  # [1, E]
    # Plackett-Luce: log 4 + log 3; pairwise boundary: softplus(0) = log 2
    expected = torch.log(torch.tensor(4.0)) + torch.log(torch.tensor(3.0)) + torch.log(torch.tensor(2.0))
    torch.testing.assert_close(ranking_loss(uniform, chosen), expected)
    right_order = torch.tensor([[2.0, -1.0, 3.0, -1.0]])
    wrong_order = torch.tensor([[3.0, -1.0, 2.0, -1.0]])  # same set, order swapped
    wrong_set = torch.tensor([[2.0, 3.0, -1.0, -1.0]])
    assert ranking_loss(right_order, chosen) < ranking_loss(wrong_order, chosen) < ranking_loss(wrong_set, chosen)


def test_topk_accuracy_is_set_based():
    chosen = torch.tensor([[0, 1], [2, 3], [4, 5]])
    predicted = torch.tensor([[1, 0], [2, 5], [6, 7]])
    acc = topk_accuracy(predicted, chosen, num_experts=8)
    assert acc.exact == pytest.approx(1 / 3) and acc.recall == pytest.approx(1.5 / 3) and acc.tokens == 3


def test_trained_predictor_beats_frequency_baseline(model, bundle, heldout_chunks):
    table = evaluate(model, bundle, heldout_chunks, progress=False)
    for layer in MOE_LAYERS:
        ours, hot = table["pre-attention"][layer], table["frequency"][layer]
        assert ours.recall > hot.recall + 0.1, f"layer {layer}: {ours} vs frequency {hot}"
    assert table["cross-layer"][1] is None and table["cross-layer"][2] is not None


def test_predict_topk_is_a_pure_function_that_traces_to_aten(bundle):
    predictor = bundle.pre_attention[1]
    w = predictor.weights()
    hidden = torch.randn(5, 128)  # [T, H]
    expected = predictor.predict(hidden)  # [T, K]
    torch.testing.assert_close(predict_topk(hidden, w.w1, w.b1, w.w2, w.b2, w.top_k), expected)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda h, w1, b1, w2, b2: predict_topk(h, w1, b1, w2, b2, top_k=2))(
        hidden, w.w1, w.b1, w.w2, w.b2
    )
    targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert {"aten.rsqrt.default", "aten.gelu.default", "aten.topk.default"} <= targets
    torch.testing.assert_close(gm(hidden, w.w1, w.b1, w.w2, w.b2), expected)


def test_predictor_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        ExpertPredictor(16, num_experts=4, top_k=5)


# --- files -----------------------------------------------------------------------------------------


def test_save_load_round_trip(model, bundle, predictor_file, heldout_chunks):
    meta = read_metadata(predictor_file)
    assert meta["format"] == "moe_compile.expert_predictors" and meta["format_version"] == "1"
    assert meta["predictor"] | {"hidden_size": 128, "num_experts": 8, "top_k": 2, "width": 256} == meta["predictor"]
    assert meta["layers"] == {"pre_attention": MOE_LAYERS, "cross_layer": MOE_LAYERS[1:], "frequency": MOE_LAYERS}
    assert meta["model_identity"]["moe_layers"] == MOE_LAYERS and len(meta["model_fingerprint"]) == 64
    assert meta["training"]["epochs"] == FAST.epochs
    loaded = load_bundle(predictor_file, model)
    predictors = load_predictors(predictor_file, model)
    hidden = torch.randn(2, 3, 128)  # [B, S, H]
    for layer in MOE_LAYERS:
        torch.testing.assert_close(predictors.predict(layer, hidden), bundle.pre_attention.predict(layer, hidden))
        assert predictors.predict(layer, hidden).shape == (2, 3, 2)
    for layer in MOE_LAYERS[1:]:
        torch.testing.assert_close(loaded.cross_layer.predict(layer, hidden), bundle.cross_layer.predict(layer, hidden))
    assert all(torch.equal(loaded.frequency[layer], bundle.frequency[layer]) for layer in bundle.frequency)
    with pytest.raises(KeyError, match="no predictor for layer 0"):  # the dense layer
        predictors.predict(0, hidden)


def test_predictor_for_another_model_is_rejected(predictor_file):
    other = zoo.build("qwen3_moe")
    with pytest.raises(PredictorFileError, match="another model") as err:
        load_predictors(predictor_file, other)
    message = str(err.value)
    assert str(predictor_file) in message
    assert "hidden_size: file has 128, model has 32" in message and "moe_layers" in message


def test_same_architecture_other_weights_is_rejected(predictor_file):
    retrained = load_model()
    with torch.no_grad():
        retrained.model.layers[2].mlp.gate.weight.mul_(1.5)
    with pytest.raises(PredictorFileError, match=r"router weights differ in layer\(s\) 2"):
        load_predictors(predictor_file, retrained)


def test_same_checkpoint_in_bf16_is_accepted(predictor_file):
    assert load_predictors(predictor_file, load_model(dtype=torch.bfloat16)).layers == MOE_LAYERS


def test_load_for_router_weights_without_the_module(model, predictor_file):
    routers = {moe.index: moe.router.weight for moe in moe_layers(model)}  # what a graph pass holds
    assert load_predictors_for_routers(predictor_file, routers).layers == MOE_LAYERS
    with pytest.raises(PredictorFileError, match=r"graph's routers are in layers \[1, 2\]"):
        load_predictors_for_routers(predictor_file, {1: routers[1], 2: routers[2]})
    other = zoo.build("qwen3_moe", num_layers=10)
    with pytest.raises(PredictorFileError, match=r"router weights differ in layer\(s\) 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        load_predictors_for_routers(predictor_file, {i: other.model.layers[i].mlp.gate.weight for i in MOE_LAYERS})


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "foreign", "missing"])
def test_damaged_file_is_a_clear_error(model, predictor_file, tmp_path, damage):
    data = predictor_file.read_bytes()
    path = tmp_path / "damaged.safetensors"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        expected = "corrupted or truncated"
    elif damage == "flipped":
        damaged = bytearray(data)
        damaged[-100] ^= 0xFF  # inside the last tensor's data
        path.write_bytes(bytes(damaged))
        expected = "checksum: the file is corrupted"
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all")
        expected = "not a readable safetensors file"
    elif damage == "foreign":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, str(path))
        expected = "not a moe_compile predictor file"
    else:
        expected = "no such predictor file"
    with pytest.raises(PredictorFileError, match=expected) as err:
        load_predictors(path, model)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("craft", ["huge width", "width not the tensors'", "deep nesting", "bad layers"])
def test_crafted_metadata_is_refused_before_anything_is_allocated(model, predictor_file, tmp_path, craft):
    from safetensors.torch import save_file

    from moe_compile.file_format import checksum, read_file
    from moe_compile.predictor.checkpoint import PREDICTOR_FORMAT

    tensors, metadata = read_file(predictor_file, PREDICTOR_FORMAT)
    encoded = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in metadata.items()}
    sizes = dict(metadata["predictor"])
    if craft == "huge width":
        sizes["width"] = 10**9  # [1e9, 128] float32 per layer: 512 GB
        expected = "width 1000000000"
    elif craft == "width not the tensors'":
        sizes["width"] = sizes["width"] * 2
        expected = "do not match the tensors"
    elif craft == "deep nesting":
        sizes = None
        encoded["predictor"] = "[" * 100_000 + "]" * 100_000
        expected = "corrupted metadata"
    else:
        encoded["layers"] = json.dumps({"pre_attention": [[[1]]], "cross_layer": [], "frequency": []})
        expected = "metadata 'layers'"
    if sizes is not None:
        encoded["predictor"] = json.dumps(sizes, sort_keys=True)
    encoded["checksum"] = checksum(tensors)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=encoded)
    with pytest.raises(PredictorFileError, match=expected):
        load_predictors(path, model)
    routers = {moe.index: moe.router.weight for moe in moe_layers(model)}
    with pytest.raises(PredictorFileError, match=expected):
        load_predictors_for_routers(path, routers)


# --- command line ----------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_then_eval_prints_table(tmp_path, capsys):
    text = tmp_path / "sample.py"
    text.write_bytes(b"".join(path.read_bytes() for path in corpus.stdlib_files("train")[:3]))
    out = tmp_path / "p.safetensors"
    common = ["--texts", str(text), "--max-tokens", "4096", "--quiet"]
    assert _run(["train-predictor", "--out", str(out), "--epochs", "1", *common]) == 0
    assert "saved to" in capsys.readouterr().out and out.is_file()
    assert _run(["eval-predictor", "--predictor", str(out), "--max-tokens", "2048", "--quiet"]) == 0
    table = capsys.readouterr().out
    for heading in ("pre-attention", "cross-layer", "router", "frequency", "exact", "recall", "mean 2-9"):
        assert heading in table
    rows = [line.split()[0] for line in table.splitlines()[2:11]]
    assert rows == [str(layer) for layer in MOE_LAYERS]


def test_cli_eval_with_foreign_predictor_exits_with_message(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(SystemExit, match="not a readable safetensors file"):
        _run(["eval-predictor", "--predictor", str(bad), "--quiet"])


def test_cli_rejects_a_model_without_moe_layers(tmp_path):
    zoo.build_dense().save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="no MoE layer"):
        _run(["train-predictor", "--model", str(tmp_path), "--out", str(tmp_path / "p.safetensors"), "--quiet"])


def test_format_table_shows_na_for_first_layer_cross_layer(model, bundle, heldout_chunks):
    table = format_table(evaluate(model, bundle, heldout_chunks[:2], progress=False))
    first = table.splitlines()[2].split()
    assert first[0] == "1" and first[3:5] == ["n/a", "n/a"]
