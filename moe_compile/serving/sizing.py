"""``--token-budget auto`` and ``--prefix-cache-tokens auto``: sized from free device memory, after the model loads.

On CUDA the figures come from ``torch.cuda.mem_get_info()`` the way vLLM's
``--gpu-memory-utilization`` does: this rank may fill ``utilization x total`` bytes of its GPU,
so what it may still allocate is ``free - (1 - utilization) x total`` (the weights are already
loaded and are in ``total - free``, with anything else on the GPU). From that come, in order:

- the AEP gather ring (:func:`~moe_compile.serving.memory.memory_accounting`'s ``ring_bytes``: not
  allocated before the first call) and the LM head's working chunk (``CHUNK_ROWS x vocab`` float32
  logits, :mod:`~moe_compile.serving.readout`);
- the token budget (if ``auto``): the largest multiple of :data:`TOKEN_ROUND` tokens whose
  activations fit in :data:`TOKEN_SHARE` of the rest (at most :data:`MAX_AUTO_TOKEN_BUDGET`);
  per token :data:`ACTIVATION_SAFETY` x (its keys and values in every layer, kept for the prefix
  cache, plus :data:`HIDDEN_COPIES` hidden-state vectors and the routed experts' intermediate
  activations of one layer), from the planner's model shape (:func:`moe_compile.planner.model_shape`);
- the prefix cache (if ``auto``): whatever is left, in whole blocks, at the per-token key/value bytes
  the memory accounting counts (:func:`~moe_compile.serving.memory.kv_bytes_per_token`).

Not counted: attention scores that grow with the square of a prompt's length (SDPA's
memory-efficient kernels keep them linear; eager attention does not) and full-vocabulary logits a
request asks for (``output: "logits"``, ``V`` floats per read position). When nothing is left, a
``ValueError`` says so with the figures and what to change. On the CPU ``auto`` keeps the defaults
(2048 tokens, 65536 prefix-cache tokens) and says so: free-memory sizing is for CUDA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: vLLM's default --gpu-memory-utilization: the fraction of a GPU's total memory this rank may fill
GPU_MEMORY_UTILIZATION = 0.9
#: the defaults ``auto`` keeps on the CPU (the flags' own defaults)
DEFAULT_TOKEN_BUDGET = 2048
DEFAULT_PREFIX_CACHE_TOKENS = 65536
#: share of the memory left after the weights that an automatic token budget's activations may take
TOKEN_SHARE = 0.25
#: an automatic token budget is a multiple of this, and at most MAX_AUTO_TOKEN_BUDGET
TOKEN_ROUND = 256
MAX_AUTO_TOKEN_BUDGET = 16384
#: hidden-state vectors alive per token in one layer (residual, norm, q/k/v, attention out, projections)
HIDDEN_COPIES = 8
#: factor over the counted activations (allocator rounding, temporaries the count leaves out)
ACTIVATION_SAFETY = 2.0


@dataclasses.dataclass(frozen=True)
class Costs:
    """Bytes per token (cache, activations) and per batch (fixed) of one engine."""

    kv_bytes_per_token: int  # the prefix cache's unit: keys and values of every layer
    activation_bytes_per_token: int  # one batch's activations per padded token, safety factor included
    fixed_bytes: int  # AEP gather ring + the head's logits chunk


@dataclasses.dataclass(frozen=True)
class Sizing:
    token_budget: int
    prefix_cache_tokens: int
    how: str  # one line: where the figures came from

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def engine_costs(engine: Any) -> Costs:
    """:class:`Costs` of ``engine`` (a loaded :class:`~moe_compile.serving.PrefillEngine`)."""
    from ..planner import model_shape
    from .memory import kv_bytes_per_token, memory_accounting
    from .readout import CHUNK_ROWS

    shape = model_shape(engine.model.config)
    element = next(engine.model.parameters()).element_size()
    if not next(engine.model.parameters()).is_floating_point():
        element = 2  # quantised storage computes in bfloat16
    moe = max((layer.top_k * layer.expert_params // shape.hidden_size for layer in shape.layers), default=0)
    per_token = (shape.kv_elements_per_token + HIDDEN_COPIES * shape.hidden_size + moe) * element
    ring = int(memory_accounting(engine)["ring_bytes"])
    return Costs(
        kv_bytes_per_token=kv_bytes_per_token(engine),
        activation_bytes_per_token=int(ACTIVATION_SAFETY * per_token),
        fixed_bytes=ring + CHUNK_ROWS * engine.vocab_out * 4,
    )


def plan_sizes(
    free: int,
    total: int,
    costs: Costs,
    token_budget: int | None,
    prefix_cache_tokens: int | None,
    block_size: int,
    utilization: float = GPU_MEMORY_UTILIZATION,
) -> Sizing:
    """The figures for ``free`` of ``total`` device bytes; None stands for ``auto`` (see the module docstring).

    ``ValueError`` when the memory left cannot hold one block of prefix cache or :data:`TOKEN_ROUND` tokens.
    """
    mib = 2**20
    usable = int(free - (1 - utilization) * total) - costs.fixed_bytes
    said = (f"{free / mib:.0f} MiB free of {total / mib:.0f} MiB, --gpu-memory-utilization {utilization:g}: "
            f"{max(usable, 0) / mib:.0f} MiB for batches and the prefix cache")  # fmt: skip
    if usable <= 0:
        raise ValueError(f"{said}: nothing is left after the weights; raise --gpu-memory-utilization, use more "
                         "ranks (--parallel aep), or give --token-budget and --prefix-cache-tokens")  # fmt: skip
    if token_budget is None:
        share = usable * (TOKEN_SHARE if prefix_cache_tokens is None else 1.0)
        if prefix_cache_tokens is not None:
            share -= prefix_cache_tokens * costs.kv_bytes_per_token
        fit = int(share // max(costs.activation_bytes_per_token, 1))
        token_budget = min(MAX_AUTO_TOKEN_BUDGET, fit // TOKEN_ROUND * TOKEN_ROUND)
        if token_budget < TOKEN_ROUND:
            raise ValueError(f"{said}: --token-budget auto: {fit} tokens fit ({costs.activation_bytes_per_token} "
                             f"bytes each), fewer than {TOKEN_ROUND}; lower --prefix-cache-tokens, raise "
                             "--gpu-memory-utilization or give --token-budget")  # fmt: skip
    if prefix_cache_tokens is None:
        left = usable - token_budget * costs.activation_bytes_per_token
        blocks = int(left // max(costs.kv_bytes_per_token * block_size, 1))
        if costs.kv_bytes_per_token == 0:
            blocks = 0  # the model cannot use a prefix cache (engine.prefix_cache_off)
        elif blocks < 1:
            raise ValueError(f"{said}: --prefix-cache-tokens auto: a batch of --token-budget {token_budget} "
                             f"takes ~{token_budget * costs.activation_bytes_per_token / mib:.0f} MiB and "
                             f"leaves no block of {block_size} tokens; lower --token-budget or give "
                             "--prefix-cache-tokens 0")  # fmt: skip
        prefix_cache_tokens = blocks * block_size
    return Sizing(token_budget, prefix_cache_tokens, f"{said}; activations ~{costs.activation_bytes_per_token} "
                  f"bytes/token, prefix cache {costs.kv_bytes_per_token} bytes/token")  # fmt: skip


def resolve(
    engine: Any,
    token_budget: int | str,
    prefix_cache_tokens: int | str,
    utilization: float = GPU_MEMORY_UTILIZATION,
    mem_info: tuple[int, int] | None = None,
) -> Sizing | None:
    """Resize ``engine`` for the flags' values (``"auto"`` or ints); the :class:`Sizing`, or None without ``auto``.

    ``mem_info``: ``(free, total)`` bytes (default ``torch.cuda.mem_get_info`` of the engine's device).
    """
    auto_budget, auto_cache = token_budget == "auto", prefix_cache_tokens == "auto"
    if not (auto_budget or auto_cache):
        return None
    if engine.device.type != "cuda" and mem_info is None:
        budget = DEFAULT_TOKEN_BUDGET if auto_budget else int(token_budget)
        cache = DEFAULT_PREFIX_CACHE_TOKENS if auto_cache else int(prefix_cache_tokens)
        sizing = Sizing(budget, cache, f"on {engine.device.type} 'auto' keeps the defaults (free-memory sizing "
                        "is for CUDA)")  # fmt: skip
    else:
        if mem_info is None:
            import torch

            mem_info = torch.cuda.mem_get_info(engine.device)
        block = engine.cache.block_size if engine.cache is not None else 16
        sizing = plan_sizes(*mem_info, engine_costs(engine), None if auto_budget else int(token_budget),
                            None if auto_cache else int(prefix_cache_tokens), block, utilization)  # fmt: skip
    engine.resize(sizing.token_budget, sizing.prefix_cache_tokens)
    engine.sizing = sizing.to_json()
    return sizing
