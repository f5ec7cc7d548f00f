"""Spawned-rank worker for AEP with a predictor (``parallel="aep"``, ``predictor=PATH``).

Run through :func:`dist_workers.spawn`. Every rank builds the same zoo model (same seed), knows every
rank's one-token batch (seeds ``100 + q``) and so every rank's routing, and writes its own
hand-made predictor file (:mod:`predictor_helpers`): ``right`` predicts exactly the experts its
own token is routed to, ``wrong`` experts no rank's token is routed to (when there are enough),
``none`` is no predictor (plain AEP). It compiles, runs its one-token batch and then a longer batch
of its own (a recompile after the release), and returns the errors against single-process eager,
the store's byte counts per call and the op counts of each compiled graph. The store's ring buffers
are filled with NaN whenever a layer claims one, so exact logits also show that no row of an expert
that was not gathered is read.
"""

from __future__ import annotations

import collections
import os

import torch
from dist_workers import GraphFacts, rel_err

KINDS = ("right", "wrong", "none")
COUNTS = ("bytes_ahead", "bytes_ahead_used", "bytes_on_demand", "bytes_on_demand_used", "bytes_padding", "bytes_needed")


class OpCounts(GraphFacts):
    """The whole pipeline as a test backend; ``graphs``: each final graph's op counts (a ``Counter`` of op names)."""

    @property
    def graphs(self) -> list[collections.Counter]:
        from moe_compile.graph import op_name

        return [collections.Counter(op_name(n) for n in gm.graph.nodes) for gm in self.final_graphs()]


def predicted_gather_worker(
    rank: int, world_size: int, families: tuple[str, ...], tmpdir: str, kinds: tuple[str, ...] = KINDS
) -> dict:
    from predictor_helpers import constant_predictors, nan_filling, routed_experts

    import moe_compile
    from moe_compile.predictor import model_identity
    from moe_compile.runtime.expert_store import ExpertStore
    from moe_compile.testing import zoo

    counts = OpCounts()
    ExpertStore._claim = nan_filling(ExpertStore._claim)  # in this spawned process only
    out = {}
    for name in families:
        reference = zoo.build(name, seed=0)  # never compiled: eager logits and routing
        identity = model_identity(reference)
        E, K = identity["num_experts"], identity["top_k"]
        # one token per rank, not the padding id (its zero embedding gives all-zero logits: no relative error)
        tokens = [zoo.make_inputs(reference, batch=1, seq=1, seed=100 + q).clamp(min=1) for q in range(world_size)]
        longer = zoo.make_inputs(reference, batch=2, seq=5 + rank, seed=200 + rank)
        batches = [tokens[rank], longer]
        with torch.no_grad():
            expected = [reference(b).logits for b in batches]
        routed = [routed_experts(reference, t) for t in tokens]  # per rank: layer -> experts
        union = {layer: set().union(*(r[layer] for r in routed)) for layer in routed[rank]}
        nobody = {layer: sorted(set(range(E)) - u) for layer, u in union.items()}
        chosen = {
            "right": {layer: sorted(r) for layer, r in routed[rank].items()},
            # experts nobody routes to; when fewer than K are left, filled with ones this rank does not route to
            "wrong": {l: (rest + sorted(set(range(E)) - routed[rank][l]))[:K] for l, rest in nobody.items()},
        }
        for kind in kinds:
            torch._dynamo.reset()
            counts.clear()
            options = {"parallel": "aep", "inductor": False}
            if kind != "none":
                path = os.path.join(tmpdir, f"{name}_{kind}_rank{rank}.safetensors")
                constant_predictors(reference, path, chosen[kind])
                options["predictor"] = path
            model = zoo.build(name, seed=0)  # the compile releases its full expert weights
            compiled = torch.compile(model, backend=counts, options=options)
            errors, bytes_per_call, all_experts = [], [], []
            with torch.no_grad():
                for batch, want in zip(batches, expected, strict=True):
                    with moe_compile.backend.collect_reports() as report:
                        got = compiled(batch).logits
                    errors.append(rel_err(got, want))
                    stats = [s for store in report.offload for s in store.stats()]
                    bytes_per_call.append({f: sum(getattr(s, f) for s in stats) for f in COUNTS})
                    all_experts.append(sum(E * s.expert_bytes for s in stats))  # gathering every expert
            out[(name, kind)] = {
                "errors": errors,
                "bytes": bytes_per_call,
                "all_experts_bytes": all_experts,
                "ops": [dict(c) for c in counts.graphs],
                "moe_layers": len(routed[rank]),
                "globally_wrong": all(len(rest) >= K for rest in nobody.values()),
            }
    return out
