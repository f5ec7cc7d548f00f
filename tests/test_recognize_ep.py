"""Models that already run expert-parallel with AllToAll: recognised, rewritten to AEP, or left as written.

2 gloo ranks (tests/dist_ep_workers.py). Every case compares the compiled logits of a
rank's batch with the single-process eager logits of the full model on that batch.
"""

import pytest
from dist_ep_workers import recognize_worker
from dist_workers import spawn

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # multi-process runs

CASES = (
    ("reference", "aep"),
    ("reference", "ep"),
    ("reference", None),
    ("reference_near_miss", "aep"),
    ("qwen3_moe", "aep"),
    ("qwen3_moe", None),
    ("mixtral", "aep"),
    ("qwen3_moe", "aep+predictor"),
)


@pytest.fixture(scope="module")
def results():
    return spawn(recognize_worker, 2, CASES)


def _each(results, case):
    for rank, per_case in enumerate(results):
        yield f"{case}, rank {rank}", per_case[case]


@pytest.mark.parametrize("model", ["reference", "qwen3_moe", "mixtral"])
def test_aep_rewrite_matches_eager_with_no_all_to_all_and_one_gather_per_layer(results, model):
    for where, r in _each(results, (model, "aep")):
        assert r["error"] < 1e-5, (where, r["error"])
        (graph,) = r["graphs"]  # one graph: the EP blocks traced whole
        assert graph["all_to_all"] == 0, (where, graph)
        assert graph["gathers"] == r["layers"], (where, graph)
        assert graph["moe_calls"] == ["moe_compile::moe"] * r["layers"], (where, graph)
        for layer in graph["layers"]:
            assert layer["weights_from"] == ["_c10d_functional::wait_tensor"] and layer["gathers"] == 1, (where, layer)
            assert all(shape[0] == 4 for shape in layer["gather_shapes"]), (where, layer)  # [E/W, ...] shards of 8
        assert len(r["blocks"]) == r["layers"], (where, r["blocks"])
        for _path, E, K, rewrites in r["blocks"]:
            assert (E, K) == (8, 2) and rewrites[0].startswith("recognised expert-parallel block"), (where, rewrites)
        if model != "reference":
            assert any("HF AllToAllEP" in what for _, what in r["prepared"]), (where, r["prepared"])


@pytest.mark.parametrize("case", [("reference", "ep"), ("reference", None), ("qwen3_moe", None)])
def test_ep_and_no_parallel_leave_the_ep_block_as_written(results, case):
    for where, r in _each(results, case):
        assert r["error"] < 1e-5, (where, r["error"])
        (graph,) = r["graphs"]
        assert graph["all_to_all"] == 4 * r["layers"], (where, graph)  # counts, rows, ids, combine
        assert graph["gathers"] == 0, (where, graph)
        assert "moe_compile::moe_ep" not in graph["moe_calls"], (where, graph)  # not sharded a second time
        recognised = [n for n in r["notes"] if "recognised an expert-parallel block" in n]
        assert len(recognised) == r["layers"] and f"parallel={case[1]!r}" in recognised[0], (where, r["notes"])


def test_near_miss_is_left_untouched_with_the_reason(results):
    for where, r in _each(results, ("reference_near_miss", "aep")):
        assert r["error"] < 1e-5, (where, r["error"])
        (graph,) = r["graphs"]
        assert graph["all_to_all"] == 4 * r["layers"] and graph["gathers"] == 0, (where, graph)
        # only the local experts were rewritten (canonical op on the 4 local experts), never sharded again
        assert [(E, K, rw) for _, E, K, rw in r["blocks"]] == [(4, 1, ["canonical moe op"])] * 3, (where, r["blocks"])
        reasons = [why for _, why in r["skipped"]]
        assert len(reasons) == r["layers"], (where, reasons)
        assert all("not recognised, left as written" in why and "routing weights" in why for why in reasons), reasons


def test_recognised_blocks_take_the_predicted_gather_too(results):
    # the recognised block's local shards feed AEP's predicted gather (passes/predicted_gather.py)
    for where, r in _each(results, ("qwen3_moe", "aep+predictor")):
        assert r["error"] < 1e-5, (where, r["error"])
        (graph,) = r["graphs"]
        assert graph["all_to_all"] == 0 and graph["gathers"] == 0, (where, graph)  # the gathers run inside the ops
        assert graph["moe_calls"] == ["moe_compile::moe_offload"] * r["layers"], (where, graph)
        # per layer one call, and the two predicted experts were gathered ahead of it
        assert len(r["offload"]) == r["layers"], (where, r["offload"])
        assert all(ahead > 0 and calls == 1 for ahead, calls in r["offload"]), (where, r["offload"])
