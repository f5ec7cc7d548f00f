"""Routing statistics (collection, file, model check) and AEP hot experts in one process (a gloo group of 1).

tests/test_aep_dist.py runs hot experts on 2 and 4 ranks.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import rel_err
from dist_workers import hot_graph_facts

import moe_compile
from moe_compile import Options, RoutingStats, RoutingStatsError, collect_routing_stats
from moe_compile.runtime import shards
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _samples(model, n=2):
    return [zoo.make_inputs(model, batch=2, seq=7, seed=s) for s in range(n)]


@pytest.mark.parametrize("name, router", [("qwen3_moe", "gate"), ("gpt_oss", "router")])
def test_counts_are_the_routers_choices(name, router):
    model = zoo.build(name, seed=0)
    expected = {}

    def on_router(path):  # the router's own output (scores..., ids [T, K]), counted independently
        def hook(module, args, output):
            ids = output[-1].flatten()
            expected[path] = expected.get(path, 0) + torch.bincount(ids, minlength=8)

        return hook

    for i, layer in enumerate(model.model.layers):
        getattr(layer.mlp, router).register_forward_hook(on_router(f"model.layers.{i}.mlp"))
    samples = _samples(model)
    stats = collect_routing_stats(model, samples)
    assert stats.blocks == list(expected) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for block, counts in stats.counts.items():
        assert torch.equal(counts, expected[block]), block
        assert counts.sum() == 2 * 2 * 7 * 2  # calls * batch * seq * top-k
    assert stats.samples == {"calls": 2, "tokens": 2 * 2 * 7}
    info = stats.identity["blocks"]["model.layers.0.mlp"]
    assert info["num_experts"] == 8 and info["router"] == f"model.layers.0.mlp.{router}.weight"


def test_hot_sets_break_ties_by_the_lower_id():
    stats = RoutingStats({"b": torch.tensor([5, 9, 9, 1, 5])}, {"blocks": {}}, {})
    assert stats.hot("b", 2) == (1, 2)
    assert stats.hot("b", 3) == (0, 1, 2)  # 0 and 4 tie at 5: the lower id
    assert stats.hot("b", 9) == (0, 1, 2, 3, 4)
    assert stats.hot_share("b", 2) == pytest.approx(18 / 29)
    assert stats.checksum(2) != stats.checksum(3) and stats.checksum(2) == stats.checksum(2)


def test_save_load_round_trip_and_corruption(tmp_path):
    model = zoo.build("mixtral", seed=0)
    stats = collect_routing_stats(model, _samples(model))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = RoutingStats.load(path)
    assert loaded.identity == stats.identity and loaded.samples == stats.samples
    assert all(torch.equal(loaded.counts[b], stats.counts[b]) for b in stats.blocks)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(RoutingStatsError, match="does not match its checksum: the file is corrupted"):
        RoutingStats.load(path)
    with pytest.raises(RoutingStatsError, match="no such routing statistics file"):
        RoutingStats.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"parallel": "aep", "hot_experts": -1}, "option 'hot_experts' must be an int >= 0, got -1"),
        ({"parallel": "aep", "hot_experts": True}, "option 'hot_experts' must be an int >= 0, got True"),
        (
            {"parallel": "aep", "hot_experts": 2},
            r"hot_experts=2 needs routing_stats=PATH.*moe_compile.collect_routing_stats\(model, samples\).save",
        ),
        ({"parallel": "aep", "routing_stats": "s.safetensors"}, "'routing_stats' applies only with hot_experts > 0"),
        ({"parallel": "ep", "hot_experts": 2, "routing_stats": "s"}, "'hot_experts' applies only with parallel='aep'"),
        ({"hot_experts": 2, "routing_stats": "s"}, "'hot_experts' applies only with parallel='aep'"),
        ({"parallel": "aep", "hot_experts": 1, "routing_stats": 3}, "'routing_stats' must be None or a path"),
        (
            {"parallel": "aep", "hot_experts": 2, "routing_stats": "s", "predictor": "p.safetensors"},
            "'hot_experts' cannot be combined with a predictor under parallel='aep'",
        ),
    ],
)
def test_bad_hot_expert_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        Options.from_user(options)


def test_shards_without_the_resident_experts():
    full = torch.arange(8.0).reshape(8, 1, 1).expand(8, 2, 3).contiguous()  # expert e is all e
    resident = (1, 4, 6)
    assert shards.sharded_experts(8, resident) == [0, 2, 3, 5, 7]
    kept = shards.resident(full, resident)
    assert kept[:, 0, 0].tolist() == [1, 4, 6] and kept.is_contiguous()
    parts = [shards.shard(full, 5, r, resident) for r in range(5)]
    assert [p[:, 0, 0].tolist() for p in parts] == [[0], [2], [3], [5], [7]]
    assert shards.shard(full, 5, 0, resident) is parts[0]  # cached
    assert shards.shard(full, 1, 0)[:, 0, 0].tolist() == list(range(8))  # no resident: all of them
    shards.release(full)
    assert shards.resident(full, resident) is kept  # a recompile finds its copies
    with pytest.raises(RuntimeError, match=r"was released .* no copy for resident experts \[0, 1\]"):
        shards.resident(full, (0, 1))


def _compile(model, options, *batches):
    """(the largest relative error to eager over ``batches``, the final graphs, the report)."""
    harness = PassHarness()  # the whole pipeline; keeps the final graphs
    with torch.no_grad():
        expected = [model(b).logits for b in batches]
        options = {"parallel": "aep", "inductor": False, **options}
        compiled = torch.compile(model, backend=harness, options=options)
        with moe_compile.backend.collect_reports() as report:
            got = [compiled(b).logits for b in batches]
    graphs = [hot_graph_facts(gm) for gm in harness.final_graphs()]
    return max(rel_err(g, e) for g, e in zip(got, expected, strict=True)), graphs, report


@pytest.mark.parametrize("hot", [3, 8])
def test_hot_experts_on_one_rank_are_exact(one_rank, tmp_path, hot):
    model = zoo.build("gpt_oss", seed=0)  # weights and biases
    stats = collect_routing_stats(model, _samples(model))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    # a second shape recompiles after the release: the cached shards and resident copies are reused
    batches = zoo.make_inputs(model, seq=5, seed=1), zoo.make_inputs(model, batch=1, seq=9, seed=2)
    err, (graph, again), report = _compile(model, {"hot_experts": hot, "routing_stats": str(path)}, *batches)
    assert err < 1e-5 and again == graph and len(report.blocks) == 4
    for block, layer in zip(report.blocks, graph["layers"] * 2, strict=True):
        assert block.schedule["resident_experts"] == list(stats.hot(block.path, hot))
        assert block.schedule["gather_bytes"] * 8 == block.schedule["gather_bytes_without_resident"] * (8 - hot)
        if hot == 8:  # everything resident: the [E, ...] constants, no gather
            assert layer["weights_from"] == ["aten::view"] and not layer["ids_remapped"], layer
        else:
            assert layer["weights_from"] == ["aten::cat"] and layer["ids_remapped"], layer
            assert [s[0] for s in layer["gather_in_shapes"]] == [5] * 4, layer
    assert graph["gathers"] == (0 if hot == 8 else 2)


def test_the_ranks_agree_on_the_hot_sets_at_the_first_call_not_while_compiling(one_rank, tmp_path, monkeypatch):
    from moe_compile.runtime import dist as rdist

    checks = []

    def recorded(value, what):  # the real check, noting whether it runs under compilation's dispatch state
        python_dispatcher = torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher)
        checks.append((value, what, python_dispatcher, torch._guards.TracingContext.try_get() is not None))
        return real(value, what)

    real = rdist.check_same_on_all_ranks
    monkeypatch.setattr(rdist, "check_same_on_all_ranks", recorded)
    monkeypatch.setattr(rdist, "_AGREED", set())  # this process's earlier tests agreed on other files
    model = zoo.build("qwen3_moe", seed=0)
    stats = collect_routing_stats(model, _samples(model))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    batches = zoo.make_inputs(model, seq=5, seed=1), zoo.make_inputs(model, batch=1, seq=9, seed=2)  # 2 compiles
    err, graphs, _ = _compile(model, {"hot_experts": 2, "routing_stats": str(path)}, *batches)
    assert err < 1e-5 and len(graphs) == 2
    # once per process and file, outside any compile (no Python dispatcher, no tracing context)
    what = f"the hot_experts=2 sets chosen from routing_stats={str(path)!r}"
    assert checks == [(stats.checksum(2), what, False, False)]


def test_stats_of_another_model_are_a_clear_error(one_rank, tmp_path):
    other = zoo.build("qwen3_moe", seed=1)  # same architecture, other weights
    path = tmp_path / "other.safetensors"
    collect_routing_stats(other, _samples(other, 1)).save(path)
    model = zoo.build("qwen3_moe", seed=0)
    options = {"parallel": "aep", "inductor": False, "hot_experts": 2, "routing_stats": str(path)}
    compiled = torch.compile(model, backend="moe_prefill", options=options)
    message = (
        "routing statistics made for another model: the router weights of block model.layers.0.mlp "
        r"\(model.layers.0.mlp.gate.weight\) differ from the file's"
    )
    with pytest.raises(Exception, match=message), torch.no_grad():
        compiled(zoo.make_inputs(model))
    torch._dynamo.reset()
    mixtral = zoo.build("mixtral", seed=0)
    path = tmp_path / "mixtral.safetensors"
    collect_routing_stats(mixtral, _samples(mixtral, 1)).save(path)
    compiled = torch.compile(model, backend="moe_prefill", options={**options, "routing_stats": str(path)})
    with pytest.raises(Exception, match="the router weights of block model.layers.0.mlp"), torch.no_grad():
        compiled(zoo.make_inputs(model))


def test_routing_stats_command_writes_a_file_the_compile_reads(tmp_path, capsys):
    from moe_compile import cli
    from moe_compile.predictor import TINY_MOE_DIR

    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "stats.safetensors"
    argv = ["routing-stats", "--model", str(TINY_MOE_DIR), "--out", str(out), "--texts", str(text)]
    assert cli.main([*argv, "--max-tokens", "256", "--seq-len", "32", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    stats = RoutingStats.load(out)
    assert f"wrote {out}: {len(stats.blocks)} MoE block(s), 256 tokens" in printed
    assert stats.samples == {"calls": 2, "tokens": 256}
    assert all(int(c.sum()) == 256 * 2 for c in stats.counts.values())  # top-2
    with pytest.raises(SystemExit, match="cannot load the model"):
        cli.main(["routing-stats", "--model", str(tmp_path), "--out", str(out)])


@pytest.mark.slow  # an Inductor compile (C++ on CPU)
def test_hot_experts_through_inductor(one_rank, tmp_path):
    model = zoo.build("qwen3_moe", seed=0)
    path = tmp_path / "stats.safetensors"
    collect_routing_stats(model, _samples(model)).save(path)
    options = {"hot_experts": 2, "routing_stats": str(path), "inductor": True}
    err, (graph,), _ = _compile(model, options, zoo.make_inputs(model, seq=6))
    assert err < 1e-5 and graph["gathers"] == 2
    assert all(layer["weights_from"] == ["aten::cat"] and layer["ids_remapped"] for layer in graph["layers"])
