"""Shared helpers of the kernel tests: random routing and experts, error metric."""

import torch

from moe_compile.spec import ExpertSpec
from moe_compile.verify import TOLERANCE, rel_err  # noqa: F401  (re-exported to the kernel tests)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def route(T: int, E: int, K: int, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing on random logits: ``topk_ids [T, K]`` (distinct per token), ``topk_weights [T, K]``."""
    logits_TE = torch.randn(T, E, generator=gen)
    weights_TK, ids_TK = torch.topk(logits_TE.softmax(-1), K)
    return ids_TK.to(device), weights_TK.to(device)


def make_experts(
    E: int, H: int, I: int, spec: ExpertSpec, bias: bool, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Random ``w_up, w_down, b_up, b_down`` in ``spec``'s layout, scaled so activations stay O(1)."""
    N = 2 * I if spec.gated else I

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    w_up = rand(E, H, N, scale=H**-0.5) if spec.transposed else rand(E, N, H, scale=H**-0.5)
    w_down = rand(E, I, H, scale=I**-0.5) if spec.transposed else rand(E, H, I, scale=I**-0.5)
    if not bias:
        return w_up, w_down, None, None
    return w_up, w_down, rand(E, N, scale=0.5), rand(E, H, scale=0.5)
