"""AEP and EP on 2 and 4 gloo ranks: logits equal single-process eager per rank; graph structure; failures.

Each test spawns one group of processes (tests/dist_workers.py) whose workers loop
over the families, so a family costs a compile, not a process start.
"""

import re

import pytest
from dist_workers import (
    FAMILIES,
    aep_inductor_code_worker,
    dead_peer_worker,
    hot_experts_worker,
    misuse_worker,
    never_joins_worker,
    parity_worker,
    spawn,
)

pytestmark = [pytest.mark.slow, pytest.mark.ranks]  # multi-process runs

GATHER = "_c10d_functional::all_gather_into_tensor_coalesced"


def _check_parity(results: list[dict], world_size: int, mode: str) -> None:
    for rank, per_family in enumerate(results):
        for name in FAMILIES:
            r = per_family[(name, mode)]
            where = f"{name}, {mode}, rank {rank} of {world_size}"
            assert max(r["errors"]) < 1e-5, (where, r["errors"])
            assert len(r["errors"]) == len(r["graphs"]) == r["calls"], where  # a second call recompiles
            assert r["blocks"] == r["calls"] * r["moe_layers"], (where, r)
            assert r["released"], f"{where}: full expert weights still hold memory"
            for graph in r["graphs"]:
                assert graph["all_to_all"] == 0 if mode == "aep" else graph["gathers"] == 0, (where, graph)
                assert graph["placeholder_weights"] == 0, (where, graph)  # no MoE call reads a full weight
                _check_graph(graph, r["moe_layers"], world_size, mode, where)


def _check_graph(graph: dict, layers: int, world_size: int, mode: str, where: str) -> None:
    if mode == "ep":
        assert graph["moe_calls"] == ["moe_compile::moe_ep"] * layers, (where, graph)
        assert all(layer["weights_from"] == ["aten::view"] for layer in graph["layers"]), (where, graph)  # shards
        return
    # AEP, default depth on CPU = 1: one gather per MoE layer, waited on right before the layer's call,
    # issued at least one MoE layer earlier (the first two at the graph start); two gathered layers at most
    assert graph["moe_calls"] == ["moe_compile::moe"] * layers, (where, graph)
    assert graph["gathers"] == layers, (where, graph)
    assert graph["peak_gathered_layers"] == min(2, layers), (where, graph)
    for i, layer in enumerate(graph["layers"]):
        assert layer["weights_from"] == ["_c10d_functional::wait_tensor"], (where, i, layer)
        assert layer["gathers"] == 1 and layer["waits_right_before"], (where, i, layer)
        assert layer["moe_between"] == min(i, 1), (where, i, layer)


@pytest.mark.parametrize("world_size", [2, 4])
def test_aep_and_ep_match_eager_on_every_rank(world_size):
    # on 2 ranks the first family is also recompiled for a second shape (after its weights were released)
    results = spawn(parity_worker, world_size, ("aep", "ep"), FAMILIES, world_size == 2)
    for mode in ("aep", "ep"):
        _check_parity(results, world_size, mode)
    # the AEP report: per block, where the gather is issued and waited on
    schedules = results[0][("qwen3_moe", "aep")]["schedules"]
    assert [s["issued_after"] for s in schedules[:2]] == ["graph start", "graph start"]
    assert all(s["window_moe_layers"] == min(i, 1) and s["window_flops"] > 0 for i, s in enumerate(schedules[:2]))
    # gathered shapes: the full [E, ...] tensors, from [E/W, ...] shards
    layer = results[0][("gpt_oss", "aep")]["graphs"][0]["layers"][0]
    assert len(layer["gather_shapes"]) == 4 and all(shape[0] == 8 // world_size for shape in layer["gather_shapes"])


def test_bad_split_and_world_size_change_fail_clearly_on_every_rank():
    for errors in spawn(misuse_worker, 2):
        assert (
            "ValueError: moe_prefill option parallel='aep': block blocks.0 has 3 experts, which do not divide "
            "evenly over world size 2" in errors["bad_split"]
        ), errors
        assert errors["world_change"].startswith(
            "WorldSizeMismatch: moe_compile parallel='aep': this graph was compiled for world size 2"
        ), errors
        assert "the current group has 1 ranks" in errors["world_change"], errors


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_makes_the_others_fail_within_the_timeout(how):
    group_timeout_s = 3
    rank0, rank1 = spawn(dead_peer_worker, 2, how, group_timeout_s=group_timeout_s, timeout_s=180)
    assert rank1 == {"left": True}
    error = rank0["error"]
    assert error.startswith("CollectiveError: moe_compile parallel='aep': a collective failed on rank 0 of 2"), error
    assert ("Timed out" if how == "hang" else "Connection") in error, error  # gloo's own words, kept
    assert rank0["seconds"] < group_timeout_s + 15, rank0  # compiling included


def test_a_rank_that_never_joins_makes_the_others_fail_within_the_timeout():
    (rank0,) = spawn(never_joins_worker, 2, 2.0, procs=1, group_timeout_s=None, timeout_s=120)
    assert rank0["error"] is not None and "could not start 2 ranks within 2 s" in rank0["error"], rank0
    assert rank0["seconds"] < 2.0 + 10, rank0


@pytest.mark.parametrize("world_size, hot", [(2, 2), (4, 4)])
def test_aep_with_hot_experts_matches_eager_and_gathers_only_the_rest(world_size, hot, tmp_path):
    E = 8  # every family of the zoo
    per_rank = (E - hot) // world_size
    results = spawn(hot_experts_worker, world_size, FAMILIES, hot, str(tmp_path), timeout_s=240)  # ~30-45 s
    for rank, out in enumerate(results):
        for name in FAMILIES:
            r, where = out[name], f"{name}, rank {rank} of {world_size}, hot_experts={hot}"
            assert r["error"] is None, (where, r["error"])
            assert r["rel_err"] < 1e-5, (where, r["rel_err"])
            (graph,) = r["graphs"]
            assert graph["all_to_all"] == 0 and graph["placeholder_weights"] == 0, (where, graph)
            assert graph["gathers"] == r["moe_layers"], (where, graph)  # one per layer
            for i, layer in enumerate(graph["layers"]):
                # the layer is cat([resident [R, ...], gathered [E-R, ...]]), its ids remapped to that order
                assert layer["weights_from"] == ["aten::cat"] and layer["ids_remapped"], (where, i, layer)
                assert all(shape[0] == hot for shape in layer["resident_shapes"]), (where, i, layer)
                assert all(shape[0] == per_rank for shape in layer["gather_in_shapes"]), (where, i, layer)
                assert all(shape[0] == E - hot for shape in layer["gather_out_shapes"]), (where, i, layer)
                assert len(layer["gather_in_shapes"]) == (4 if name == "gpt_oss" else 2), (where, layer)  # biases
                assert layer["moe_between"] == min(i, 1), (where, i, layer)  # waited a layer after its issue
            for s in r["schedules"]:
                assert len(s["resident_experts"]) == hot, (where, s)
                assert s["gather_bytes"] * E == s["gather_bytes_without_resident"] * (E - hot), (where, s)
        # every expert resident: no gather at all, the constants read directly, still exact
        r = out["all_resident"]
        assert r["error"] is None and r["rel_err"] < 1e-5, r
        assert r["graphs"][0]["gathers"] == 0, r["graphs"]
        assert all(layer["weights_from"] == ["aten::view"] for layer in r["graphs"][0]["layers"]), r["graphs"]
        assert all(s["gather_bytes"] == 0 for s in r["schedules"]), r["schedules"]
        valid = [v for v in range(E + 1) if (E - v) % world_size == 0]
        error = out["bad_split"]["error"]
        assert f"ValueError: moe_prefill option hot_experts={hot + 1}: block model.layers.0.mlp has E={E}" in error
        assert f"E - R = {E - hot - 1} not resident do not divide evenly over world size W={world_size}" in error
        assert f"use hot_experts in {valid}" in error, error
        assert "the ranks disagree on the hot_experts" in out["disagree"]["error"], out["disagree"]
        assert "give every rank the same file" in out["disagree"]["error"], out["disagree"]


def inductor_schedule(code: str) -> list[tuple[str, int]]:
    """The events of Inductor's output code in order: ``(kind, layer)``.

    ``G``: a layer's gather issued (its inputs are the ``moe_shard<i>_*`` constants); ``W``: a wait
    on one of its outputs; ``R``: a layer's router (``topk``, the i-th one of the code is layer i);
    ``M``: the layer's experts (the MoE call reading the gathered buffers).
    """
    events, layer_of, routers = [], {}, 0
    for line in code[code.index("def call(") :].splitlines():
        if m := re.search(r"(buf\d+) = torch\.ops\._c10d_functional\.all_gather_into_tensor_coalesced\.default\("
                          r"\[moe_shard(\d+)_", line):  # fmt: skip
            layer_of[m[1]] = int(m[2])
            events.append(("G", int(m[2])))
        elif (m := re.fullmatch(r"\s*(buf\d+) = (buf\d+)\[\d+\]", line)) and m[2] in layer_of:
            layer_of[m[1]] = layer_of[m[2]]
        elif m := re.search(r"_c10d_functional\.wait_tensor\.default\((buf\d+)\)", line):
            events.append(("W", layer_of[m[1]]))
        elif "= torch.ops.aten.topk.default(" in line:
            events.append(("R", routers))
            routers += 1
        elif "= torch.ops.moe_compile.moe.default(" in line:
            (layer,) = {layer_of[b] for b in re.findall(r"buf\d+", line) if b in layer_of}
            events.append(("M", layer))
    return events


def test_aep_under_inductor_keeps_the_schedule_in_its_output_code():
    """2 ranks, Inductor with its reordering passes on: in the generated code each layer's gather is
    issued ``depth`` MoE layers ahead (after layer i-depth-1's experts, before layer i-depth's) and
    waited after the layer's router, right before its experts; logits equal eager on every rank."""
    cases = ((3, 1), (4, 2))
    for rank, results in enumerate(spawn(aep_inductor_code_worker, 2, cases, timeout_s=280)):
        for r in results:
            where = f"rank {rank}, {r['layers']} layers, depth {r['depth']}"
            assert r["error"] < 1e-5, (where, r["error"])
            events = inductor_schedule(r["code"])
            at = {e: i for i, e in enumerate(events)}  # the last position of each event
            first = {e: i for i, e in reversed(list(enumerate(events)))}
            depth = r["depth"]
            assert sorted(set(events)) == sorted({(k, i) for k in "GWRM" for i in range(r["layers"])}), events
            for i in range(r["layers"]):
                if i - depth - 1 >= 0:
                    assert at[("M", i - depth - 1)] < first[("G", i)], (where, i, events)
                if i - depth >= 0 and depth > 0:
                    assert at[("G", i)] < at[("M", i - depth)], (where, i, events)
                assert at[("R", i)] < first[("W", i)], (where, i, events)
                assert events[at[("M", i)] - 2 : at[("M", i)]] == [("W", i), ("W", i)], (where, i, events)
