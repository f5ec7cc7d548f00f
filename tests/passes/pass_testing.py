"""Helpers for the pass tests: compile with a harness and compare with eager, a gloo group of one."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from moe_compile.testing.pass_harness import PassHarness
from moe_compile.verify import rel_err


def run(harness: PassHarness, model: torch.nn.Module, *inputs: torch.Tensor, options=None, tol: float = 1e-5):
    """Eager outputs first (parallel passes release the experts), then the compiled ones: equal within ``tol``."""
    options = {"inductor": False, **(options or {})}
    with torch.no_grad():
        expected = [_logits(model(x)) for x in inputs]
        compiled = torch.compile(model, backend=harness, options=options)
        got = [_logits(compiled(x)) for x in inputs]
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) < tol, rel_err(g, e)
    return harness


def _logits(out):
    return getattr(out, "logits", out)


@contextlib.contextmanager
def one_rank():
    """torch.distributed with one gloo rank: the parallel passes' collectives over a group of one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
