"""Multi-process helpers for the parallel tests: spawn W ranks on 127.0.0.1 (gloo), collect their results.

:func:`spawn` starts ``W`` processes (forked from a ``forkserver`` that has imported torch,
transformers and moe_compile once per pytest process: a rank starts in milliseconds, not in the
four seconds of CPU those imports take) that join one gloo group on a free local port and each
run ``fn(rank, world_size, *args)``; it returns what each rank returned, or fails with every
rank's traceback.
The worker functions live here too, so that the spawned processes can import them.

Each parity worker builds the same zoo model with the same seed as every other
rank, computes the single-process eager logits for *its own* batch first (the
parallel compile releases the full expert weights), then compiles with
``parallel=...`` and compares. The structure of every compiled graph is read by a
test backend that runs the whole pipeline and keeps the final graphs (:class:`GraphFacts`,
a :class:`moe_compile.testing.pass_harness.PassHarness`).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import queue as queue_module
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp

from moe_compile.testing.pass_harness import PassHarness
from moe_compile.verify import rel_err

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")

#: imported once in the forkserver, so that every rank forked from it starts with them (only imports run there:
#: no threads, no process group; each rank gets the parent's environment as it is at spawn time, see _entry)
PRELOAD = (
    "torch",
    "torch.distributed",
    "transformers",
    "moe_compile",
    "moe_compile.backend",
    "moe_compile.serving",
    "moe_compile.testing.zoo",
    "dist_workers",
)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts: the first spawn of the process
    return ctx


class RanksHung(AssertionError):
    """Some ranks reported nothing within the spawn's timeout."""


def spawn(
    fn,
    world_size: int,
    *args: Any,
    timeout_s: float = 240,  # under pytest-timeout's 300 s, so that the ranks' own stacks come first
    procs: int | None = None,
    group_timeout_s: float | None = 120,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``procs`` (default ``world_size``) ranks; their results by rank.

    The ranks join a gloo group whose collectives time out after ``group_timeout_s``
    (``None``: the worker initialises the group itself). Ranks that do not all report within
    ``timeout_s`` fail the test (:class:`RanksHung`); the hung ranks print their Python stacks to
    stderr first, and the ranks that finished are listed with their errors.

    The rendezvous store is hosted here, as torchrun's agent hosts it: a TCPStore listening on a
    port the kernel picks (port 0) and held until the ranks are done; every rank is its client
    (``TORCHELASTIC_USE_AGENT_STORE``). A port found free and released for rank 0 to bind seconds
    later, after its imports, could be taken meanwhile by another group on the machine (two groups
    then share a store and their ranks' addresses) or by any bind(0).
    """
    ctx = _context()
    queue = ctx.Queue()
    procs = world_size if procs is None else procs
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    workers = [
        ctx.Process(
            target=_entry,
            args=(fn, r, world_size, store.port, group_timeout_s, queue, args, timeout_s, dict(os.environ)),
        )
        for r in range(procs)
    ]
    for w in workers:
        w.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < procs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                finished = "; ".join(f"rank {r}: {st}: {_brief(p)}" for r, (st, p) in sorted(results.items()))
                load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
                raise RanksHung(
                    f"ranks {sorted(set(range(procs)) - set(results))} did not finish in {timeout_s} s "
                    f"(finished: {finished or 'none'}; load average {load} on {os.cpu_count()} cores)"
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 5.0))
            except queue_module.Empty:  # check that nobody died without reporting
                dead = {r: w.exitcode for r, w in enumerate(workers) if w.exitcode is not None and r not in results}
                if dead:
                    raise AssertionError(f"ranks exited without a result (rank: exit code): {dead}") from None
                continue
            results[rank] = (status, payload)
    finally:
        join_by = time.monotonic() + 30  # 30 s for all ranks together: spawn stays under pytest-timeout's 300 s
        for w in workers:
            w.join(timeout=max(0.0, join_by - time.monotonic()))
            if w.is_alive():
                w.kill()
        del store  # the listening socket closes with it
    errors = [f"rank {r}:\n{p}" for r, (s, p) in sorted(results.items()) if s == "error"]
    assert not errors, "\n".join(errors)
    return [results[r][1] for r in range(procs)]


def _brief(payload: Any) -> str:
    """What a finished rank reported, short: a worker's per-case errors when it returns a dict of cases."""
    if isinstance(payload, dict):
        errors = {k: v for k, v in payload.items() if isinstance(v, dict) and v.get("error")}
        if errors:
            return "errors by case: " + "; ".join(
                f"{k}: {str(v['error'])[:400]} (at {''.join(v.get('where', []))})" for k, v in errors.items()
            )
    return str(payload)[-600:]


def _entry(
    fn,
    rank: int,
    world_size: int,
    port: int,
    group_timeout_s: float | None,
    queue,
    args: tuple,
    timeout_s: float,
    environ: dict[str, str],
) -> None:
    os.environ.clear()  # the forkserver kept the parent's environment of when it started: take the current one
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True")  # the store at MASTER_PORT is spawn()'s: join as a client
    # a rank still running after the parent gave up prints where it is (the parent kills it 30 s later); one that
    # crashes (a fatal signal: SIGSEGV, SIGABRT from malloc's checks) prints its threads' Python stacks
    faulthandler.dump_traceback_later(timeout_s + 5, exit=False)
    faulthandler.enable(all_threads=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # W ranks share two cores
    torch.set_num_threads(1)
    try:
        if group_timeout_s is not None:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=group_timeout_s))
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # the result reaches the parent whatever happens next
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# what a compiled graph looks like
# ---------------------------------------------------------------------------------------------


class GraphFacts(PassHarness):
    """The whole pipeline as a test backend (``backend=facts``) that records each final graph's structure."""

    @property
    def graphs(self) -> list[dict[str, Any]]:
        return [graph_facts(gm) for gm in self.final_graphs()]

    def clear(self) -> None:
        self.records.clear()


def graph_facts(gm: fx.GraphModule) -> dict[str, Any]:
    """Counts of collectives and MoE calls, and for each MoE call where its gather was issued."""
    from moe_compile.graph import op_name, without_control_deps

    gm = without_control_deps(gm)  # Inductor's graphs: the pinned schedule's wrappers are their ops
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    moe = [n for n in nodes if op_name(n).startswith("moe_compile::moe")]
    names = [op_name(n) for n in nodes]
    layers = []
    for call in moe:
        weights = [a for a in call.args[3:7] if isinstance(a, fx.Node)]
        layer: dict[str, Any] = {
            "weights_from": sorted({op_name(w) if w.op == "call_function" else w.op for w in weights})
        }
        waits = [w for w in weights if op_name(w) == "_c10d_functional::wait_tensor"]
        if waits:
            gathers = {w.args[0].args[0] for w in waits}  # wait(getitem(gather, j))
            (gather,) = gathers
            layer["gathers"] = len(gathers)
            layer["moe_between"] = sum(pos[gather] < pos[m] < pos[call] for m in moe)
            layer["waits_right_before"] = all(pos[call] - pos[w] <= len(waits) for w in waits)
            layer["gather_shapes"] = [list(g.meta["val"].shape) for g in gather.args[0]]
        layers.append(layer)
    # how many gathered layers are alive at once: issued and not yet used by their MoE call
    alive, peak = 0, 0
    for n in nodes:
        if op_name(n) == "_c10d_functional::all_gather_into_tensor_coalesced":
            alive += 1
            peak = max(peak, alive)
        elif n in moe and any(op_name(a) == "_c10d_functional::wait_tensor" for a in n.all_input_nodes):
            alive -= 1
    return {
        "moe_calls": [op_name(n) for n in moe],
        "gathers": names.count("_c10d_functional::all_gather_into_tensor_coalesced"),
        "all_to_all": sum("all_to_all" in n for n in names),
        "placeholder_weights": sum(a.op == "placeholder" for n in moe for a in n.args[3:7] if isinstance(a, fx.Node)),
        "peak_gathered_layers": peak,
        "layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------


def parity_worker(
    rank: int, world_size: int, modes: tuple[str, ...], families: tuple[str, ...], recompile: bool
) -> dict:
    """For each family and mode: compiled logits vs single-process eager on this rank's batches, and graphs.

    With ``recompile``, the first family is called a second time with another shape, which recompiles
    (dynamic shapes) after the full expert weights were released.
    """
    import moe_compile
    from moe_compile.testing import zoo

    facts = GraphFacts()
    out = {}
    for name in families:
        for mode in modes:
            torch._dynamo.reset()
            facts.clear()
            model = zoo.build(name, seed=0)  # the same weights on every rank
            # this rank's own requests: different tokens and lengths on each rank
            batches = [zoo.make_inputs(model, batch=2, seq=5 + rank, seed=100 + rank)]
            if recompile and name == families[0]:
                batches.append(zoo.make_inputs(model, batch=1, seq=9 + 2 * rank, seed=200 + rank))
            params = dict(model.named_parameters())
            with torch.no_grad():
                expected = [model(b).logits for b in batches]
                compiled = torch.compile(model, backend=facts, options={"parallel": mode, "inductor": False})
                with moe_compile.backend.collect_reports() as report:
                    got = [compiled(b).logits for b in batches]
            out[(name, mode)] = {
                "errors": [rel_err(g, e) for g, e in zip(got, expected, strict=True)],
                "graphs": list(facts.graphs),
                "blocks": len(report.blocks),
                "moe_layers": len(zoo.moe_layer_indices(name, model.config)),
                "calls": len(batches),
                "schedules": [b.schedule for b in report.blocks],
                "released": all(
                    params[w].untyped_storage().nbytes() == 0 for b in report.blocks for w in b.weights.values()
                ),
            }
    return out


def misuse_worker(rank: int, world_size: int) -> dict[str, str]:
    """Two misuses, each failing with a clear error on every rank before any collective is issued.

    ``bad_split``: a model whose experts do not divide over the ranks; ``world_change``: a model
    compiled on ``world_size`` ranks, then called in a group of 1.
    """
    from custom_moe import TinyLM

    from moe_compile.testing import zoo

    torch.manual_seed(0)
    errors = {}
    with torch.no_grad():
        model = TinyLM(experts=world_size + 1).eval()
        compiled = torch.compile(model, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
        errors["bad_split"] = _error_of(compiled, torch.randint(0, 64, (1, 4)))

        torch._dynamo.reset()
        model = zoo.build("qwen3_moe", num_layers=1)
        input_ids = zoo.make_inputs(model, seq=4, seed=rank)
        compiled = torch.compile(model, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
        compiled(input_ids)
        dist.destroy_process_group()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        errors["world_change"] = _error_of(compiled, input_ids)
    return errors


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def dead_peer_worker(rank: int, world_size: int, how: str) -> dict:
    """Rank 1 leaves ("exit") or stalls ("hang") before the first collective; rank 0 must fail, not hang.

    The stalled rank waits on the rendezvous store (not a collective) until rank 0 has failed.
    """
    from moe_compile.testing import zoo

    store = dist.distributed_c10d._get_default_store()
    model = zoo.build("qwen3_moe", num_layers=1)
    if rank == 1:
        if how == "hang":
            store.wait(["rank0_failed"], datetime.timedelta(seconds=120))  # spawn() hosts the store
        return {"left": True}  # the process ends, its connections close
    compiled = torch.compile(model, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
    start = time.monotonic()  # compiling is part of the first call
    with torch.no_grad():
        error = _error_of(compiled, zoo.make_inputs(model, seq=4))
    if how == "hang":
        store.set("rank0_failed", "1")
    return {"error": error, "seconds": time.monotonic() - start}


def never_joins_worker(rank: int, world_size: int, timeout_s: float) -> dict:
    """Only this rank of ``world_size`` starts: init_distributed must fail within the timeout."""
    from moe_compile.runtime import init_distributed

    start = time.monotonic()
    try:
        init_distributed("gloo", timeout_s=timeout_s)
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def hot_graph_facts(gm: fx.GraphModule) -> dict[str, Any]:
    """Per MoE call with resident experts: its gather (inputs, outputs, when issued) and how its layer is rebuilt."""
    from moe_compile.graph import op_name, without_control_deps

    gm = without_control_deps(gm)  # Inductor's graphs: the pinned schedule's wrappers are their ops

    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    moe = [n for n in nodes if op_name(n).startswith("moe_compile::moe")]
    names = [op_name(n) for n in nodes]
    layers = []
    for call in moe:
        weights = [a for a in call.args[3:7] if isinstance(a, fx.Node)]
        cats = [w for w in weights if op_name(w) == "aten::cat"]
        waits = [w for w in weights if op_name(w) == "_c10d_functional::wait_tensor"]
        waits += [c.args[0][1] for c in cats]  # cat([resident, wait])
        layer: dict[str, Any] = {
            "weights_from": sorted({op_name(w) if w.op == "call_function" else w.op for w in weights}),
            "ids_remapped": op_name(call.args[1]) == "aten::index",
            "resident_shapes": [list(c.args[0][0].meta["val"].shape) for c in cats],
        }
        if waits:
            (gather,) = {w.args[0].args[0] for w in waits}
            layer["gather_in_shapes"] = [list(g.meta["val"].shape) for g in gather.args[0]]
            layer["gather_out_shapes"] = [list(v.shape) for v in gather.meta["val"]]
            layer["moe_between"] = sum(pos[gather] < pos[m] < pos[call] for m in moe)
        layers.append(layer)
    return {
        "gathers": names.count("_c10d_functional::all_gather_into_tensor_coalesced"),
        "all_to_all": sum("all_to_all" in n for n in names),
        "placeholder_weights": sum(a.op == "placeholder" for n in moe for a in n.args[3:7] if isinstance(a, fx.Node)),
        "layers": layers,
    }


def hot_experts_worker(rank: int, world_size: int, families: tuple[str, ...], hot: int, tmp: str) -> dict:
    """AEP with ``hot`` resident experts per layer, from routing statistics each rank collects itself.

    Per family: logits vs single-process eager on this rank's batch, and the graph. Then, on the first
    family: every expert resident (``hot = E``), a ``hot`` whose non-resident experts do not divide over
    the ranks, and ranks given statistics that pick different experts (each must fail clearly).
    """
    import moe_compile
    from moe_compile.testing import zoo

    def stats_file(model, tag: str, edit=None) -> str:
        samples = [zoo.make_inputs(model, batch=2, seq=8, seed=s) for s in (11, 12)]  # the same on every rank
        stats = moe_compile.collect_routing_stats(model, samples)
        if edit is not None:
            edit(stats)
        path = f"{tmp}/{tag}-rank{rank}.safetensors"
        stats.save(path)
        return path

    def run(name: str, options: dict) -> dict:
        torch._dynamo.reset()
        harness.records.clear()
        model = zoo.build(name, seed=0)
        path = stats_file(model, f"{name}-{options.get('tag', 'hot')}", options.pop("edit", None))
        options.pop("tag", None)
        batch = zoo.make_inputs(model, batch=2, seq=5 + rank, seed=100 + rank)
        with torch.no_grad():
            expected = model(batch).logits
            compiled = torch.compile(
                model,
                backend=harness,
                options={"parallel": "aep", "inductor": False, "routing_stats": path, **options},
            )
            with moe_compile.backend.collect_reports() as report:
                try:
                    got = compiled(batch).logits
                except Exception as exc:
                    where = traceback.extract_tb(exc.__traceback__)[-4:]  # for RanksHung's message
                    return {"error": f"{type(exc).__name__}: {exc}", "where": traceback.format_list(where)}
        return {
            "error": None,
            "rel_err": rel_err(got, expected),
            "graphs": [hot_graph_facts(gm) for gm in harness.final_graphs()],
            "schedules": [b.schedule for b in report.blocks],
            "moe_layers": len(zoo.moe_layer_indices(name, model.config)),
        }

    harness = PassHarness()  # the whole pipeline; keeps every final graph of the current run
    out = {name: run(name, {"hot_experts": hot}) for name in families}
    first = families[0]
    out["all_resident"] = run(first, {"hot_experts": 8, "tag": "all"})
    out["bad_split"] = run(first, {"hot_experts": hot + 1, "tag": "split"})

    def disagree(stats) -> None:  # rank 0 prefers the low ids, the others the high ids
        for block, counts in stats.counts.items():
            stats.counts[block] = torch.arange(len(counts)).flip(0) if rank == 0 else torch.arange(len(counts))

    out["disagree"] = run(first, {"hot_experts": hot, "tag": "disagree", "edit": disagree})
    return out


def aep_inductor_code_worker(rank: int, world_size: int, cases: tuple[tuple[int, int], ...]) -> list[dict]:
    """Per ``(layers, prefetch_depth)``: AEP through Inductor on a TinyLM; its output code and error vs eager."""
    from custom_moe import TinyLM
    from torch._inductor.utils import run_and_get_code

    import moe_compile  # noqa: F401  (registers the backend)

    results = []
    for layers, depth in cases:
        torch._dynamo.reset()
        torch.manual_seed(0)  # the same weights on every rank
        model = TinyLM(layers=layers, experts=2 * world_size).eval()
        torch.manual_seed(100 + rank)  # each rank its own batch
        x = torch.randint(0, 64, (2, 5))
        options = {"parallel": "aep", "inductor": True, "prefetch_depth": depth}
        with torch.no_grad():
            expected = model(x)
            got, (code,) = run_and_get_code(torch.compile(model, backend="moe_prefill", options=options), x)
        results.append({"layers": layers, "depth": depth, "error": rel_err(got, expected), "code": code})
    return results
