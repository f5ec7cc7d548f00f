"""Workers for tests/test_recognize_ep.py: models that already run expert-parallel, compiled per `parallel` mode.

Each case builds the full model with the same seed on every rank, computes the single-process
eager logits of this rank's own batch, makes the model expert-parallel (the reference EP
module, or Hugging Face's own ``AllToAllEP`` followed by ``moe_compile.prepare``), compiles it
and compares. The final graphs' structure comes from ``dist_workers.GraphFacts``.
"""

from __future__ import annotations

import os
import tempfile

import torch
from dist_workers import GraphFacts, rel_err


def _unweighted_sum(y_TKH: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """A near miss: the combined rows summed over k without the routing weights."""
    return y_TKH.sum(dim=1)


def _reference(rank: int, near_miss: bool):
    from moe_compile.reference import ExpertParallelLM

    torch.manual_seed(0)  # the same weights on every rank
    model = ExpertParallelLM(layers=3).eval()
    gen = torch.Generator().manual_seed(100 + rank)
    batch = torch.randint(0, 64, (2, 5 + rank), generator=gen)  # this rank's own requests
    with torch.no_grad():
        expected = model(batch)
    model.to_expert_parallel()
    if near_miss:  # combine without the weighted sum: another function, not an EP MoE block
        for block in model.blocks:
            block.experts.weighted_sum = _unweighted_sum
        with torch.no_grad():
            expected = model(batch)  # the near miss computes another function: compare with itself
    return model, batch, expected, 3, lambda m, b: m(b)


def _hf(rank: int, family: str, predictor: str | None = None):
    import moe_compile
    from moe_compile.reference.hf_expert_parallel import apply_hf_expert_parallel
    from moe_compile.testing import zoo

    model = zoo.build(family, seed=0)
    batch = zoo.make_inputs(model, batch=2, seq=5 + rank, seed=100 + rank)
    if predictor is not None:  # experts 0 and 5 predicted in every MoE layer: right for some tokens only
        from predictor_helpers import constant_predictors

        layers = zoo.moe_layer_indices(family, model.config)
        constant_predictors(model, predictor, {layer: [0, 5] for layer in layers})
    with torch.no_grad():
        expected = model(batch).logits
        apply_hf_expert_parallel(model)
        hf_ep = model(batch).logits  # HF's own EP, eager
        moe_compile.prepare(model)  # collective: every rank calls it
    assert rel_err(hf_ep, expected) < 1e-5, rel_err(hf_ep, expected)
    layers = len(zoo.moe_layer_indices(family, model.config))
    return model, batch, expected, layers, lambda m, b: m(b).logits


def recognize_worker(rank: int, world_size: int, cases: tuple[tuple[str, str | None], ...]) -> dict:
    """For each (model, mode): logits error against eager, graph facts, report notes and skips."""
    import moe_compile
    from moe_compile.prepare import prepare_report
    from moe_compile.reference.expert_parallel import traceable

    facts = GraphFacts()
    out = {}
    for name, mode in cases:
        torch._dynamo.reset()
        facts.clear()
        options = {"parallel": mode, "inductor": False}
        if mode == "aep+predictor":  # AEP's predicted gather (passes/predicted_gather.py) on the recognised blocks
            options.update(parallel="aep", predictor=os.path.join(tempfile.mkdtemp(), "predictors.safetensors"))
        if name.startswith("reference"):
            model, batch, expected, layers, run = _reference(rank, near_miss=name == "reference_near_miss")
            prepared = []
        else:
            model, batch, expected, layers, run = _hf(rank, name, options.get("predictor"))
            prepared = prepare_report()
        with torch.no_grad(), traceable():
            compiled = torch.compile(model, backend=facts, options=options)
            with moe_compile.backend.collect_reports() as report:
                got = run(compiled, batch)
        out[(name, mode)] = {
            "error": rel_err(got, expected),
            "graphs": list(facts.graphs),
            "layers": layers,
            "blocks": [(b.path, b.num_experts, b.top_k, b.rewrites) for b in report.blocks],
            "notes": list(report.notes),
            "skipped": [(s.where, s.reason) for s in report.skipped],
            "prepared": prepared,
            "offload": [(s.bytes_ahead, s.calls) for store in report.offload for s in store.stats()],
        }
    return out


def recognize_pass_worker(rank: int, world_size: int) -> dict:
    """detect, canonicalize, recognize_expert_parallel (a PassHarness) on the reference EP model, then AEP.

    The recognised call takes global ids and this rank's shards: async_expert_parallel gathers them (the
    graph cannot run without it); the graph after recognize_expert_parallel is returned too.
    """
    from moe_compile.passes.async_expert_parallel import AsyncExpertParallel
    from moe_compile.passes.canonicalize_moe import CanonicalizeMoE
    from moe_compile.passes.detect_moe import DetectMoE
    from moe_compile.passes.recognize_expert_parallel import RecognizeExpertParallel
    from moe_compile.reference.expert_parallel import traceable
    from moe_compile.testing.pass_harness import PassHarness, op_counts

    model, batch, expected, layers, run = _reference(rank, near_miss=False)
    harness = PassHarness(DetectMoE(), CanonicalizeMoE(), RecognizeExpertParallel(), AsyncExpertParallel())
    with torch.no_grad(), traceable():
        got = run(torch.compile(model, backend=harness, options={"parallel": "aep", "inductor": False}), batch)
    ctx = harness.record.ctx
    return {
        "error": rel_err(got, expected),
        "layers": layers,
        "before": dict(op_counts(harness.graph("canonicalize_moe"))),
        "after": dict(op_counts(harness.graph("recognize_expert_parallel"))),
        "gathers": op_counts(harness.record.after)["_c10d_functional::all_gather_into_tensor_coalesced"],
        "presharded": sorted(ctx.presharded.values()),
        "blocks": [b.node in ctx.presharded for b in ctx.moe_blocks],
    }
