"""Predictor nodes in the graph and the single-device offload they drive (``predictor=PATH``, ``offload="cpu"``).

On the shipped tiny MoE with a predictor trained here for two epochs on a few thousand tokens, and on
a zoo model with hand-made predictors (constant scores, so they are right or wrong by construction):
compiled logits equal eager's whatever the predictor says, the graph holds one predictor, one
prefetch and one offloaded call per layer, and the copy counts say where the bytes moved.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import rel_err
from predictor_helpers import constant_predictors, nan_filling, routed_experts

import moe_compile
from moe_compile.graph import op_name
from moe_compile.predictor import (
    TrainConfig,
    load_model,
    save_bundle,
    text_chunks,
    train_predictors,
)
from moe_compile.runtime import expert_store
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness

PREDICT, PREFETCH, OFFLOAD = "moe_compile::predict_experts", "moe_compile::offload_prefetch", "moe_compile::moe_offload"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine():
    """The shipped model, never compiled (offload releases a compiled model's expert tensors)."""
    return load_model()


@pytest.fixture
def tiny(pristine):
    return copy.deepcopy(pristine)


@pytest.fixture(scope="module")
def trained_file(pristine, tmp_path_factory):
    bundle = train_predictors(
        pristine, text_chunks(None, "train", 128, 32 * 128), TrainConfig(epochs=2), progress=False
    )
    path = tmp_path_factory.mktemp("predictor") / "tiny.safetensors"
    save_bundle(bundle, path)
    return path


@pytest.fixture(scope="module")
def heldout():
    return text_chunks(None, "heldout", 32, 2 * 32)  # [2, 32]


@pytest.fixture
def harness():
    """A test backend running the whole pipeline and keeping every graph (use with ``_compile_and_compare``)."""
    return PassHarness()


def _compile_and_compare(model, input_ids, options, backend="moe_prefill"):
    """Compiled logits vs eager's (fp32 rel err < 1e-5; eager first: offload releases the model's experts); the
    merged report."""
    with torch.no_grad():
        expected = model(input_ids).logits
    compiled = torch.compile(model, backend=backend, options={"inductor": False, **options})
    with torch.no_grad(), moe_compile.backend.collect_reports() as report:
        got = compiled(input_ids).logits
    assert rel_err(got, expected) < 1e-5
    return report


def _ops(gm) -> collections.Counter:
    return collections.Counter(op_name(n) for n in gm.graph.nodes)


def _totals(report) -> tuple[int, int, int, int]:
    """(bytes ahead, of those used, on demand, needed) over all layers."""
    stats = [s for store in report.offload for s in store.stats()]
    return tuple(
        sum(getattr(s, f) for s in stats)
        for f in ("bytes_ahead", "bytes_ahead_used", "bytes_on_demand", "bytes_needed")
    )


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"offload": "gpu"}, "option 'offload' must be one of None, 'cpu', got 'gpu'"),
        ({"predictor": 3}, "option 'predictor' must be None or a path to a predictor file, got 3"),
        ({"offload": "cpu", "parallel": "aep"}, "option 'offload' cannot be combined with parallel='aep'"),
        ({"predictor": "p.safetensors"}, "option 'predictor' does nothing without offload='cpu' or parallel='aep'"),
        ({"predictor": "p.safetensors", "parallel": "ep"}, r"add offload='cpu' \(experts in host memory"),
    ],
)
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        moe_compile.Options.from_user(options)


# --- the shipped model, trained predictor ----------------------------------------------------------


@pytest.mark.slow  # trains a predictor, then compiles (over 10 s)
def test_trained_predictor_drives_prefetch_exactly(tiny, trained_file, heldout, harness):
    report = _compile_and_compare(tiny, heldout, {"offload": "cpu", "predictor": str(trained_file)}, harness)
    (gm,) = harness.final_graphs()
    ops = _ops(gm)
    assert (ops[PREDICT], ops[PREFETCH], ops[OFFLOAD], ops["moe_compile::moe"]) == (9, 9, 9, 0), ops
    # one predictor per MoE layer (1-9; layer 0 is dense), on the residual entering the layer: the
    # output of the layer before it (its last residual add)
    inputs = [n.args[0].args[0] for n in gm.graph.nodes if op_name(n) == PREDICT]
    assert [op_name(n) for n in inputs] == ["aten::add"] * 9
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for call in (n for n in gm.graph.nodes if op_name(n) == OFFLOAD):
        token = call.args[3]
        assert op_name(token) == PREFETCH and order[token] < order[call]
    # the full expert weights are no longer read by the graph
    experts = [
        n for n in gm.graph.find_nodes(op="placeholder") if getattr(n.meta.get("val"), "ndim", 0) == 3
    ]  # [E, ., .]
    assert len(experts) == 18 and all(not p.users for p in experts)  # gate_up_proj, down_proj per layer
    assert [b.predictor.split(":")[0] for b in report.blocks] == [
        f"pre-attention of model.layers.{i}" for i in range(1, 10)
    ]
    assert "offload layer 8 (model.layers.9.mlp): ahead" in str(report)  # the store counts MoE layers from 0
    _, used, on_demand, needed = _totals(report)
    assert needed == used + on_demand > 0
    assert used > 0.5 * needed, report  # most bytes move ahead


def test_no_predictor_fetches_everything_on_demand(tiny, heldout, harness):
    report = _compile_and_compare(tiny, heldout, {"offload": "cpu"}, harness)
    ops = _ops(harness.final_graphs()[0])
    assert (ops[PREDICT], ops[PREFETCH], ops[OFFLOAD]) == (0, 0, 9), ops
    ahead, used, on_demand, needed = _totals(report)
    assert ahead == used == 0 and on_demand == needed > 0
    assert all(b.predictor == "-" for b in report.blocks)


def test_predictor_for_another_model_fails_at_compile_time(trained_file):
    other = zoo.build("qwen3_moe", num_layers=4)
    with pytest.raises(Exception, match=r"predictors made for another model: the file has MoE layers \[1, 2, .*9\]"):
        _compile_and_compare(other, zoo.make_inputs(other, seq=5), {"offload": "cpu", "predictor": str(trained_file)})


def test_always_wrong_predictor_on_the_shipped_model(tiny, heldout, tmp_path):
    ids = heldout[:1, :3]  # [1, 3]: at most 6 of 8 experts routed per layer
    wrong = {layer: sorted(set(range(8)) - routed)[:2] for layer, routed in routed_experts(tiny, ids).items()}
    path = tmp_path / "wrong.safetensors"
    constant_predictors(tiny, path, wrong)
    report = _compile_and_compare(tiny, ids, {"offload": "cpu", "predictor": str(path)})
    ahead, used, on_demand, needed = _totals(report)
    assert ahead > 0 and used == 0 and on_demand == needed > 0  # every prefetched byte wasted, all on demand


# --- a zoo model, hand-made predictors -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["right", "wrong", "none"])
def test_zoo_model_exact_with_right_wrong_or_no_predictor(kind, tmp_path, harness):
    model = zoo.build("qwen3_moe", num_layers=3)
    ids = zoo.make_inputs(model, batch=1, seq=1)  # one token: a constant predictor can be exactly right
    routed = routed_experts(model, ids)
    options = {"offload": "cpu"}
    if kind != "none":
        chosen = {layer: sorted(r) if kind == "right" else sorted(set(range(8)) - r)[:2] for layer, r in routed.items()}
        constant_predictors(model, tmp_path / "p.safetensors", chosen)
        options["predictor"] = str(tmp_path / "p.safetensors")
    report = _compile_and_compare(model, ids, options, harness)
    ops = _ops(harness.final_graphs()[0])
    assert ops[OFFLOAD] == 3 and ops[PREDICT] == ops[PREFETCH] == (0 if kind == "none" else 3), ops
    _, used, on_demand, needed = _totals(report)
    expected = {"right": (needed, 0), "wrong": (0, needed), "none": (0, needed)}[kind]
    assert (used, on_demand) == expected and needed > 0


def test_rows_of_experts_not_brought_in_are_never_read(tmp_path, monkeypatch):
    """Ring buffers filled with NaN when claimed: only the rows brought in may reach the output."""
    monkeypatch.setattr(expert_store.ExpertStore, "_claim", nan_filling(expert_store.ExpertStore._claim))
    model = zoo.build("qwen3_moe", num_layers=3)
    ids = zoo.make_inputs(model, batch=1, seq=2)
    wrong = {layer: sorted(set(range(8)) - r)[:2] for layer, r in routed_experts(model, ids).items()}
    constant_predictors(model, tmp_path / "p.safetensors", wrong)
    report = _compile_and_compare(model, ids, {"offload": "cpu", "predictor": str(tmp_path / "p.safetensors")})
    assert _totals(report)[2] > 0  # experts came on demand into NaN-filled buffers, and the logits are exact


def test_counts_accumulate_and_reset(tiny, heldout):
    compiled = torch.compile(tiny, backend="moe_prefill", options={"inductor": False, "offload": "cpu"})
    with torch.no_grad(), moe_compile.backend.collect_reports() as report:
        compiled(heldout)
        compiled(heldout)
    (store,) = report.offload
    assert store in expert_store.stores() and all(s.calls == 2 for s in store.stats())
    store.reset_stats()
    assert all(s.calls == 0 and s.bytes_needed == 0 for s in store.stats())


def test_store_lives_as_long_as_the_compiled_graph():
    import gc
    import weakref

    model = zoo.build("qwen3_moe", num_layers=2)
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False, "offload": "cpu"})
    with torch.no_grad():
        compiled(zoo.make_inputs(model, seq=3))
        (store,) = moe_compile.last_report().offload
        handle, alive = store.handle, weakref.ref(store)
        del store
        gc.collect()
        compiled(zoo.make_inputs(model, seq=3))  # the graph still owns its store: it runs
    assert alive() is not None and alive() in expert_store.stores()
    del compiled, model
    torch._dynamo.reset()
    gc.collect()
    assert alive() is None and len(moe_compile.last_report().offload) == 0  # the report held it weakly
    gone = f"expert store {handle} is gone: the compiled graph that owned it was freed"
    with pytest.raises(RuntimeError, match=gone):
        expert_store.get_store(handle)


def test_predict_experts_op_matches_predict_topk():
    from moe_compile.predictor import predict_topk

    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(4, 16), torch.randn(4)
    hidden = torch.randn(5, 8)  # [T, H]
    got = torch.ops.moe_compile.predict_experts(hidden, w1, b1, w2, b2, 2, 1e-6)  # [T, K]
    torch.testing.assert_close(got, predict_topk(hidden, w1, b1, w2, b2, 2, 1e-6))
    torch.library.opcheck(torch.ops.moe_compile.predict_experts.default, (hidden, w1, b1, w2, b2, 2, 1e-6))


# --- the model's expert tensors are released --------------------------------------------------------


def test_offload_releases_the_model_experts_and_stays_exact():
    model = zoo.build("qwen3_moe", num_layers=3)
    reference = copy.deepcopy(model)  # never compiled: eager on any input, before and after
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False, "offload": "cpu"})
    with torch.no_grad(), moe_compile.backend.collect_reports() as report:
        for seq in (5, 9):  # the second shape recompiles: the released tensors' host copies are found again
            ids = zoo.make_inputs(model, seq=seq)
            assert rel_err(compiled(ids).logits, reference(ids).logits) < 1e-5
    names = [name for b in report.blocks for name in b.weights.values()]
    experts = [model.get_parameter(name) for name in dict.fromkeys(names)]
    assert len(experts) == 6  # gate_up_proj, down_proj of 3 layers
    assert all(t.untyped_storage().nbytes() == 0 and t.numel() > 0 for t in experts)  # no storage, same shape
    assert all(p.untyped_storage().nbytes() > 0 for n, p in model.named_parameters() if n not in names)
    full = sum(t.numel() * t.element_size() for t in experts)
    assert report.released_bytes == full  # released at the first compile; the recompile finds nothing to release
    assert "released: " in str(report) and "released by an earlier offload compile" in str(report)
    with torch.no_grad(), pytest.raises(RuntimeError, match="storage of size 0|not allocated"):
        model(zoo.make_inputs(model, seq=4))  # the eager model raises, it computes nothing


def test_one_transfer_per_weight_role_and_fetch(tmp_path):
    model = zoo.build("qwen3_moe", num_layers=3)
    ids = zoo.make_inputs(model, batch=1, seq=2)
    wrong = {layer: sorted(set(range(8)) - r)[:2] for layer, r in routed_experts(model, ids).items()}
    constant_predictors(model, tmp_path / "p.safetensors", wrong)  # prefetch 2 wrong experts, the rest on demand
    report = _compile_and_compare(model, ids, {"offload": "cpu", "predictor": str(tmp_path / "p.safetensors")})
    (store,) = report.offload
    for stats in store.stats():
        # two fetches (ahead, on demand), each one copy per role (w_up, w_down), whatever the number of experts
        assert (stats.fetches, stats.transfers) == (2, 4), stats
        assert stats.bytes_ahead == 2 * stats.expert_bytes and stats.bytes_on_demand >= 2 * stats.expert_bytes
    assert "4 transfer(s) in 2 fetch(es)" in str(report)


def test_host_source_copies_each_role_once_per_fetch():
    host = expert_store.HostSource(torch.device("cpu"))
    w_up, w_down = torch.randn(6, 4, 3), torch.randn(6, 3, 2)
    host.add_layer(0, {"w_up": w_up, "w_down": w_down})
    buffer = {"w_up": torch.full_like(w_up, float("nan")), "w_down": torch.full_like(w_down, float("nan"))}
    fetch = host.fetch(0, buffer, [1, 4, 5], ahead=False)
    assert fetch.transfers == 2 and fetch.experts == [1, 4, 5]
    assert torch.equal(buffer["w_up"][[1, 4, 5]], w_up[[1, 4, 5]]) and buffer["w_up"][[0, 2, 3]].isnan().all()
    assert torch.equal(buffer["w_down"][[1, 4, 5]], w_down[[1, 4, 5]])
    assert host.fetch(0, buffer, list(range(6)), ahead=False).transfers == 2  # the whole layer: straight copies
    assert torch.equal(buffer["w_up"], w_up) and torch.equal(buffer["w_down"], w_down)
    assert host.fetch(0, buffer, [], ahead=False).transfers == 0
    assert host.host[0]["w_up"].untyped_storage().data_ptr() != w_up.untyped_storage().data_ptr()  # its own copy
