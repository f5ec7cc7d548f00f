"""The LM head applied only where it is read.

A scoring request needs the logits of a few positions, often of a few label tokens.
:class:`LogitHead` takes the final hidden states of just the read rows (``[n_read, H]``,
gathered by the engine) and computes:

- :meth:`LogitHead.logits`: the full logits ``[n_read, V]``;
- :meth:`LogitHead.label_logits`: the logits of label tokens ``[n_read, L]``, from the
  label rows of the head weight only (``W[labels]``, ``[L, H]``);
- :meth:`LogitHead.log_normaliser`: ``logsumexp`` over the vocabulary ``[n_read]``, which a
  log-probability needs: it touches every vocabulary entry but only for the read rows
  (``[n_read, V]`` in chunks of :data:`CHUNK_ROWS` rows), never ``[tokens, V]``.

Models that transform the head's output are reproduced: Granite divides by
``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma-style models cap with
``final_logit_softcapping``. :meth:`LogitHead.check` compares with the model's own
logits on a probe prompt, so a transform this module does not know is an error at
engine start, not a silently wrong score.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .. import verify

#: read rows per chunk of full logits in :meth:`LogitHead.log_normaliser`
CHUNK_ROWS = 256


class LogitHead:
    """``logits = transform(hidden @ W.T + b)`` for the rows that are read; results in float32."""

    def __init__(self, model: PreTrainedModel) -> None:
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"the model's output embeddings are a {type(head).__name__}, not an nn.Linear head")
        config = model.config.get_text_config()
        self.weight = head.weight  # [V, H]
        self.bias = head.bias  # [V] or None
        self.scale = 1.0 / getattr(config, "logits_scaling", 1.0) * (getattr(config, "logit_scale", None) or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]`` -> logits ``[n, V]`` (float32)."""
        return self._transform(torch.nn.functional.linear(hidden, self.weight, self.bias))  # [n, V]

    def label_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]``, ``labels [L]`` -> the labels' logits ``[n, L]`` (float32)."""
        bias = None if self.bias is None else self.bias[labels]  # [L]
        return self._transform(torch.nn.functional.linear(hidden, self.weight[labels], bias))  # [n, L]

    def log_normaliser(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]`` -> ``logsumexp`` of the logits over the vocabulary ``[n]`` (float32)."""
        parts = [torch.logsumexp(self.logits(chunk), dim=-1) for chunk in hidden.split(CHUNK_ROWS)]  # [chunk]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)  # [n]

    @torch.no_grad()
    def check(self, model: PreTrainedModel, hidden: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` unless the head reproduces ``model(input_ids).logits`` from ``hidden [1, T, H]``."""
        expected = model(input_ids=input_ids).logits[0].float()  # [T, V]
        got = self.logits(hidden[0])  # [T, V]
        err = verify.rel_err(got, expected)
        # one matmul (the head) in fp32 from the model's own hidden states: fp32's bound, and for a low-precision
        # head half the table's 2e-2 (the table's bound is for whole models; a lone matmul rounds once)
        tolerance = verify.tolerance(torch.float32) if self.weight.dtype == torch.float32 else 1e-2
        if not err <= tolerance:
            raise ValueError(
                f"the serving head does not reproduce {type(model).__name__}'s logits (relative error {err:.1e}): "
                "the model transforms its logits in a way moe_compile.serving does not know"
            )
