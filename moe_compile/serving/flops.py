"""True-FLOPs cost of a prefill request, from a model's parameter counts and config.

The cost of running ``new`` tokens of a prompt whose first ``cached`` tokens come from
the prefix cache is

    new * 2 * (dense_params + expert_params)                        matmuls with the weights
  + attn_layers * pair_flops * (new * cached + new * (new + 1) / 2)  scores and weighted values
  + reads * 2 * hidden * vocab                                       the LM head on the read rows

- ``dense_params``: per-token weights outside the experts and the embeddings (attention
  projections, dense MLPs, shared experts, routers, norms);
- ``expert_params``: the *active* expert weights, ``top_k / E`` of each stacked expert
  tensor ``[E, ., .]`` under a module named ``experts`` (what one token multiplies with);
- ``pair_flops``: per (query, key) pair in one attention layer, ``2 * heads * d_qk``
  for the scores plus ``2 * heads * d_v`` for the weighted values. New token ``i``
  (``cached <= i < cached + new``) attends to ``i + 1`` keys: the cached prefix and the new
  tokens up to itself. Sliding windows are ignored (an upper bound).

:meth:`FlopsModel.from_config` instantiates the model on the meta device (no memory)
and counts its parameters, so it works for any causal LM that transformers builds whose
experts are stacked ``[E, ., .]`` tensors (the layout the backend detects).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig

#: config keys that hold the number of experts each token is routed to, by family
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


@dataclasses.dataclass(frozen=True)
class FlopsModel:
    """FLOPs of prefill work for one model (see the module docstring for the formula)."""

    dense_params: int
    expert_params: int
    attn_layers: int
    pair_flops: int
    head_flops: int

    @property
    def token_flops(self) -> int:
        """FLOPs of the weight matmuls for one token (2 per multiply-add)."""
        return 2 * (self.dense_params + self.expert_params)

    def cost(self, new: int, cached: int = 0, reads: int = 0) -> float:
        """FLOPs to run ``new`` tokens after ``cached`` cached ones and apply the head to ``reads`` rows."""
        pairs = new * cached + new * (new + 1) // 2
        return float(new * self.token_flops + self.attn_layers * self.pair_flops * pairs + reads * self.head_flops)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> FlopsModel:
        """Count the parameters of ``config``'s causal LM, built on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> FlopsModel:
        """Count a causal LM's decoder-layer parameters; a 3D ``*experts.*`` parameter is a stacked expert tensor."""
        config = model.config.get_text_config()
        layers = model.get_decoder().layers
        top_k = next((getattr(config, key) for key in TOP_K_KEYS if getattr(config, key, None)), None)
        dense = expert = attn_layers = 0
        for layer in layers:
            attn_layers += any(name.endswith("attn") and "linear" not in name for name, _ in layer.named_children())
            for name, param in layer.named_parameters():
                if param.dim() == 3 and "experts." in name:
                    if top_k is None:
                        raise ValueError(
                            f"{name} looks like stacked expert weights but the config names no top-k "
                            f"(looked for {', '.join(TOP_K_KEYS)})"
                        )
                    expert += param.numel() // param.shape[0] * top_k
                else:
                    dense += param.numel()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        d_qk = (config.qk_nope_head_dim + config.qk_rope_head_dim) if hasattr(config, "qk_nope_head_dim") else head_dim
        d_v = getattr(config, "v_head_dim", None) or head_dim
        return cls(
            dense_params=dense,
            expert_params=expert,
            attn_layers=attn_layers,
            pair_flops=2 * heads * (d_qk + d_v),
            head_flops=2 * config.hidden_size * config.vocab_size,
        )
