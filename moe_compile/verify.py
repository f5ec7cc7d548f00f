"""The one tolerance table of moe_compile, and the relative error every comparison uses.

"Equal" in moe_compile means: the relative error (Frobenius norm of the difference over the norm of the
expected value, in float64) is at most the expected dtype's tolerance in :data:`TOLERANCE`. The backend's
verification of a rewrite (``passes/canonicalize_moe``), ``prepare``'s probes, the Hugging Face expert-parallel
replacement, the coverage sweep, the serving head's check, the tests and the benchmarks all read it here.

A caller that needs a looser bound scales :func:`tolerance` and says why beside it (``canonicalize_moe``:
a whole block against the op, with another summation order); one that needs a tighter bound says so too.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCE", "close", "rel_err", "tolerance"]

#: relative error under which a result counts as equal to its reference, by the reference's dtype
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}


def tolerance(*dtypes: torch.dtype) -> float:
    """The loosest tolerance of ``dtypes`` (a result is as precise as its least precise part); fp32's for others."""
    return max((TOLERANCE.get(d, TOLERANCE[torch.float32]) for d in dtypes), default=TOLERANCE[torch.float32])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero; ``inf`` when only ``want`` is)."""
    want64 = want.detach().double()
    diff = (got.detach().double() - want64).norm()
    return (diff / want64.norm().clamp_min(1e-300)).item() if diff else 0.0


def close(got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> bool:
    """``rel_err(got, want)`` within ``tol`` (default: the tolerance of ``want``'s dtype)."""
    return rel_err(got, want) <= (tolerance(want.dtype) if tol is None else tol)


def large_input_scale(weights: list[torch.Tensor], H: int) -> float:
    """Probes at this scale reach the bounds (clamps) a candidate lacks: prepare's forms and the backend's
    verification (``canonicalize_moe``) both use it.

    A factor for unit-variance hidden states that makes ``x @ w.T`` about 30 in size, for any ``[E, ., H]``
    or ``[E, H, .]`` reading of ``weights`` (the smallest typical row norm along a size-``H`` dimension)."""
    norms = []
    for w in weights:
        for dim in (1, 2):
            if w.shape[dim] == H:
                norms.append(w.float().norm(dim=dim).mean().item())
    norm = min((n for n in norms if n > 0), default=1.0)
    return 30.0 / norm
