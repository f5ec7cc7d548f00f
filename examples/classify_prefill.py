"""Prefill-only classification with moe_prefill, end to end, on a tiny random MoE model.

A "classifier" reads its answer from one prefill pass: the log-probabilities of a
few label tokens at the last position. No decoding. The model here is a tiny
Qwen3-MoE built from a config with random weights (no download), so the labels
are meaningless; the point is the pipeline and that the compiled model computes
what the eager model computes.

    python examples/classify_prefill.py [--family qwen3_moe] [--kernels torch|triton]
"""

from __future__ import annotations

import argparse

import torch

import moe_compile
from moe_compile.testing import zoo
from moe_compile.verify import rel_err


def label_scores(model, input_ids: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the label tokens at the last position: ``[batch, labels]``."""
    logits = model(input_ids).logits[:, -1, :]  # [B, V]
    return torch.log_softmax(logits.float(), dim=-1)[:, label_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3_moe", choices=zoo.names())
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"))
    args = parser.parse_args()

    model = zoo.build(args.family)
    requests = zoo.make_inputs(model, batch=4, seq=12, seed=0)  # 4 requests of 12 tokens
    labels = torch.tensor([3, 7, 11])  # e.g. "yes", "no", "maybe"

    print(moe_compile.explain(model, requests, options={"kernels": args.kernels}))
    fast = torch.compile(model, backend="moe_prefill", options={"kernels": args.kernels})
    with torch.no_grad():
        eager = label_scores(model, requests, labels)
        compiled = label_scores(fast, requests, labels)
    err = rel_err(compiled, eager)
    print("\nlabel log-probs (compiled):\n", compiled)
    print("predicted labels:", compiled.argmax(-1).tolist(), f"| relative difference to eager: {err:.1e}")
    assert err < 1e-5, "compiled scores differ from eager"


if __name__ == "__main__":
    main()
