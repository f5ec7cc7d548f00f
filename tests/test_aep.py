"""The parallel passes in one process (a gloo group of 1): options, schedule by depth, memory budget, release.

With one rank the gathers and AllToAlls are real collectives over a group of one,
so the graphs are exactly those of W ranks with W = 1; tests/test_aep_dist.py
runs 2 and 4 ranks.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import rel_err
from custom_moe import TinyLM
from dist_workers import GraphFacts

import moe_compile
from moe_compile import Options
from moe_compile.testing import zoo

LAYER_BYTES = 4 * (32 * 32 + 32 * 16) * 4  # TinyLM: E=4, w_up [4, 32, 32], w_down [4, 32, 16], fp32


@pytest.fixture
def facts():
    """A test backend running the whole pipeline; ``facts.graphs``: the structure of every final graph."""
    return GraphFacts()


def _run(model, inputs, options, backend="moe_prefill"):
    """Eager outputs first (the compile releases the experts), then the compiled ones, and the report."""
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        compiled = torch.compile(model, backend=backend, options={"inductor": False, **options})
        with moe_compile.backend.collect_reports() as report:
            got = [compiled(x) for x in inputs]
    for g, e in zip(got, expected, strict=True):
        g, e = getattr(g, "logits", g), getattr(e, "logits", e)
        assert rel_err(g, e) < 1e-5
    return report


@pytest.mark.parametrize(
    "options, message",
    [
        ({"parallel": "tp"}, "option 'parallel' must be one of None, 'aep', 'ep', got 'tp'"),
        ({"parallel": "aep", "prefetch_depth": -1}, "option 'prefetch_depth' must be an int >= 0 or 'auto', got -1"),
        (
            {"parallel": "aep", "prefetch_depth": True},
            "option 'prefetch_depth' must be an int >= 0 or 'auto', got True",
        ),
        ({"parallel": "aep", "memory_budget": 0}, "option 'memory_budget' must be a number of bytes > 0 or None"),
        ({"parallel": "aep", "memory_budget": 1.5e9}, "option 'memory_budget' must be a number of bytes > 0 or None"),
        ({"prefetch_depth": 2}, "option 'prefetch_depth' applies only with parallel='aep'"),
        ({"parallel": "ep", "memory_budget": 10}, "option 'memory_budget' applies only with parallel='aep'"),
    ],
)
def test_bad_parallel_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        Options.from_user(options)


def test_good_parallel_options():
    opts = Options.from_user({"parallel": "aep", "prefetch_depth": 3, "memory_budget": 2**30})
    assert (opts.parallel, opts.prefetch_depth, opts.memory_budget) == ("aep", 3, 2**30)
    assert Options.from_user(None).parallel is None and Options.from_user(None).prefetch_depth == "auto"


def test_parallel_without_torch_distributed_is_a_clear_error():
    model = TinyLM().eval()
    compiled = torch.compile(model, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
    with pytest.raises(Exception, match="parallel='aep' needs torch.distributed initialised"), torch.no_grad():
        compiled(torch.randint(0, 64, (1, 4)))


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_gathers_are_issued_depth_layers_ahead(one_rank, facts, depth):
    torch.manual_seed(0)
    model = TinyLM(layers=4).eval()
    report = _run(model, [torch.randint(0, 64, (2, 5))], {"parallel": "aep", "prefetch_depth": depth}, facts)
    (graph,) = facts.graphs
    assert graph["gathers"] == 4 and graph["all_to_all"] == 0 and graph["placeholder_weights"] == 0
    effective = min(depth, 3)  # never more than the layers after the first
    assert graph["peak_gathered_layers"] == effective + 1
    for i, layer in enumerate(graph["layers"]):
        assert layer["weights_from"] == ["_c10d_functional::wait_tensor"] and layer["waits_right_before"]
        assert layer["moe_between"] == min(i, effective), (i, layer)
    issued = [b.schedule["issued_after"] for b in report.blocks]
    assert issued == ["graph start"] * (effective + 1) + [
        f"moe_default{'_' + str(j) if j else ''}" for j in range(3 - effective)
    ]
    assert all(b.schedule["prefetch_depth"] == effective for b in report.blocks)
    assert all(b.schedule["window_moe_layers"] == min(i, effective) for i, b in enumerate(report.blocks))
    assert f"aep: prefetch depth {effective} (requested)" in str(report)


def test_memory_budget_lowers_the_depth(one_rank, facts):
    torch.manual_seed(0)
    model = TinyLM(layers=4).eval()
    budget = LAYER_BYTES * 2 + LAYER_BYTES // 2  # room for two gathered layers, not three
    report = _run(
        model,
        [torch.randint(0, 64, (2, 5))],
        {"parallel": "aep", "prefetch_depth": 3, "memory_budget": budget},
        facts,
    )
    assert facts.graphs[0]["peak_gathered_layers"] == 2
    assert f"prefetch depth 1 (requested, lowered from 3 to fit memory_budget={budget} bytes)" in str(report)


def test_memory_budget_below_one_layer_is_a_clear_error(one_rank):
    model = TinyLM(layers=2).eval()
    compiled = torch.compile(
        model, backend="moe_prefill", options={"parallel": "aep", "memory_budget": 1000, "inductor": False}
    )
    message = f"memory_budget=1000 bytes cannot hold one gathered MoE layer: block blocks.0 needs {LAYER_BYTES} bytes"
    with pytest.raises(Exception, match=message), torch.no_grad():
        compiled(torch.randint(0, 64, (1, 4)))


@pytest.mark.parametrize("mode", ["aep", "ep"])
def test_full_experts_are_released_and_a_recompile_reuses_the_shards(one_rank, facts, mode):
    model = zoo.build("gpt_oss")  # weights and biases
    inputs = [zoo.make_inputs(model, seq=5, seed=1), zoo.make_inputs(model, batch=1, seq=9, seed=2)]
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    report = _run(model, inputs, {"parallel": mode}, facts)
    graphs = facts.graphs
    assert len(graphs) == 2 and len(report.blocks) == 4, report  # the second shape recompiled
    assert all(p.untyped_storage().nbytes() == 0 and p.shape[0] == 8 for p in experts.values())
    assert {w for b in report.blocks for w in b.weights.values()} == set(experts)
    assert "rewrites verified on this rank's own expert rows" in str(report)  # the shards kept at the release
    assert all(b.verified.startswith("probe rel err") for b in report.blocks)
    if mode == "ep":
        assert all(g["moe_calls"] == ["moe_compile::moe_ep"] * 2 and g["gathers"] == 0 for g in graphs)
    else:
        assert all(g["gathers"] == 2 and g["layers"][0]["gather_shapes"][2] == [8, 64] for g in graphs)


@pytest.mark.parametrize("kwargs", [{"post_norm": True}, None])
def test_near_misses_leave_the_graph_without_collectives(one_rank, facts, kwargs):
    """A block that is not canonical, and a dense model: nothing to shard, nothing gathered, same outputs."""
    torch.manual_seed(0)
    model = TinyLM(**kwargs).eval() if kwargs is not None else zoo.build_dense()
    x = torch.randint(0, 64, (2, 5))
    report = _run(model, [x], {"parallel": "aep"}, facts)
    (graph,) = facts.graphs
    assert report.blocks == [] and graph["gathers"] == 0 and graph["moe_calls"] == []
    assert not any("parallel=aep" in n for n in report.notes)


def test_moe_ep_op_registration(one_rank):
    from moe_compile.runtime import ep  # noqa: F401

    torch.manual_seed(0)
    T, K, E, H, inter = 5, 2, 4, 8, 6
    args = (
        torch.randn(T, H),
        torch.rand(T, E).argsort(-1)[:, :K],
        torch.rand(T, K),
        torch.randn(E, 2 * inter, H),
        torch.randn(E, H, inter),
        None,
        None,
        moe_compile.ExpertSpec().encode(),
        dist.group.WORLD.group_name,
        1,
        "torch",
    )
    torch.library.opcheck(torch.ops.moe_compile.moe_ep.default, args)
    expected = moe_compile.ops.moe_reference(*args[:5], None, None, moe_compile.ExpertSpec())
    assert rel_err(torch.ops.moe_compile.moe_ep(*args), expected) < 1e-5
    # Llama 4's form: the weight scales the input (on the sender), the output is not weighted
    scaled = moe_compile.ExpertSpec(scale_input=True)
    expected = moe_compile.ops.moe_reference(*args[:5], None, None, scaled)
    got = torch.ops.moe_compile.moe_ep(*args[:7], scaled.encode(), *args[8:])
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got, torch.ops.moe_compile.moe_ep(*args)) > 0.05  # another function than the plain spec


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["aep", "ep"])
def test_inductor_keeps_the_schedule(one_rank, mode):
    """Through Inductor: the same results, and (AEP) the gathers still issued a layer ahead of their waits."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = TinyLM(layers=3).eval()
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="moe_prefill", options={"parallel": mode, "inductor": True})
        got, (code,) = run_and_get_code(compiled, x)
    assert rel_err(got, expected) < 1e-5
    events = {
        "G": "= torch.ops._c10d_functional.all_gather_into_tensor_coalesced.default(",
        "W": "torch.ops._c10d_functional.wait_tensor.default(",
        "M": f"= torch.ops.moe_compile.{'moe' if mode == 'aep' else 'moe_ep'}.default(",
    }
    order = "".join(e for line in code.splitlines() for e, text in events.items() if text in line)
    assert order == ("GGWWMGWWMWWM" if mode == "aep" else "MMM"), code
