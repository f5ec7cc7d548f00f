"""A ranking-aware loss: get the router's top-k set and order right, not its scores.

Given predictor scores ``s [N, E]`` and the router's choices ``t [N, K]`` (best first), the loss per
token is the sum of two terms:

1. **Top-k Plackett-Luce (listwise).** The negative log-likelihood that drawing experts one at a time,
   each with probability ``softmax(s)`` over the experts not yet drawn, yields ``t_1, ..., t_K`` in
   that order::

       PL = sum_j [ logsumexp(s over experts not in {t_1..t_(j-1)}) - s[t_j] ]

   It pushes every chosen expert above all unchosen ones and ``t_1`` above ``t_2`` and so on; it
   never asks the scores to match the router's logits.
2. **Pairwise boundary (RankNet).** The mean over (chosen ``i``, unchosen ``j``) pairs of
   ``softplus(s_j - s_i)``: a logistic loss on exactly the comparisons that decide whether the
   predicted top-k *set* is right, weighted by ``pairwise_weight``.

Legend: ``N`` tokens, ``E`` experts, ``K`` experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plackett_luce_topk(scores: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the top-k Plackett-Luce negative log-likelihood (term 1)."""
    drawn = torch.zeros_like(scores, dtype=torch.bool)  # [N, E]
    nll = scores.new_zeros(scores.shape[0])  # [N]
    for j in range(topk.shape[1]):
        chosen = topk[:, j : j + 1]  # [N, 1]
        nll = nll + torch.logsumexp(scores.masked_fill(drawn, float("-inf")), dim=-1) - scores.gather(1, chosen)[:, 0]
        drawn = drawn.scatter(1, chosen, True)
    return nll.mean()


def pairwise_boundary(scores: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """Mean of ``softplus(s_unchosen - s_chosen)`` over all (chosen, unchosen) pairs (term 2)."""
    chosen_mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, topk, True)  # [N, E]
    chosen = scores.gather(1, topk)  # [N, K]
    margins = scores[:, None, :] - chosen[:, :, None]  # [N, K, E]: s_j - s_i
    pairs = ~chosen_mask[:, None, :]  # [N, 1, E]: j unchosen
    return (F.softplus(margins) * pairs).sum() / (pairs.sum() * topk.shape[1])


def ranking_loss(scores: torch.Tensor, topk: torch.Tensor, pairwise_weight: float = 1.0) -> torch.Tensor:
    """The predictor's training loss for ``scores`` ``[N, E]`` and router choices ``topk`` ``[N, K]``."""
    return plackett_luce_topk(scores, topk) + pairwise_weight * pairwise_boundary(scores, topk)
