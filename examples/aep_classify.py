"""Prefill-only classification with asynchronous expert parallelism (AEP), on CPU with gloo.

    torchrun --nproc-per-node 2 examples/aep_classify.py [--family qwen3_moe] [--parallel aep|ep]

Every rank builds the same tiny random-weight MoE model (same seed) and takes its own
share of the requests: ranks are data-parallel replicas. Compiled with
``parallel="aep"``, a rank keeps 1/W of every MoE layer's experts and all-gathers a
layer's experts one layer ahead of use; no activation leaves the rank. A request's
scores are the log-probabilities of a few label tokens at its last position (one
prefill pass, no decoding).

Each rank checks its scores against the single-process eager model on its own
requests, computed before compiling (compiling releases the full expert weights, so
the eager model cannot run afterwards). Rank 0 prints the report and every rank's
predictions.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import moe_compile
from moe_compile.runtime import init_distributed
from moe_compile.testing import zoo
from moe_compile.verify import rel_err


def label_scores(model, input_ids: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the label tokens at the last position: ``[batch, labels]``."""
    logits = model(input_ids).logits[:, -1, :]  # [B, V]
    return torch.log_softmax(logits.float(), dim=-1)[:, label_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3_moe", choices=zoo.names())
    parser.add_argument("--parallel", default="aep", choices=("aep", "ep"))
    parser.add_argument("--requests-per-rank", type=int, default=4)
    args = parser.parse_args()

    world = init_distributed(timeout_s=120)
    model = zoo.build(args.family, seed=0)  # the same weights on every rank
    all_requests = zoo.make_inputs(model, batch=args.requests_per_rank * world.size, seq=12, seed=0)
    mine = all_requests.chunk(world.size)[world.rank]  # [requests_per_rank, 12]: this rank's requests
    labels = torch.tensor([3, 7, 11])  # e.g. "yes", "no", "maybe"

    with torch.no_grad():
        eager = label_scores(model, mine, labels)  # before compiling: the compile releases the experts
        fast = torch.compile(model, backend="moe_prefill", options={"parallel": args.parallel, "inductor": False})
        scores = label_scores(fast, mine, labels)
    err = rel_err(scores, eager)
    assert err < 1e-5, f"rank {world.rank}: compiled scores differ from eager (relative error {err:.1e})"

    predictions = [None] * world.size
    dist.all_gather_object(predictions, (scores.argmax(-1).tolist(), err))
    if world.rank == 0:
        print(moe_compile.last_report())
        for rank, (predicted, rank_err) in enumerate(predictions):
            print(f"rank {rank}: predicted labels {predicted} | relative difference to eager: {rank_err:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
