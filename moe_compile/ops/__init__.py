"""Every custom op of moe_compile: its name, schema and fake, one module per op family.

Importing this package (``import moe_compile`` does) registers all of them:

=============================== ==================== ===================================================
op                              module               what it computes / where its implementation lives
=============================== ==================== ===================================================
``moe_compile::moe``            :mod:`.canonical`    the canonical MoE op (:mod:`moe_compile.moe_math`)
``moe_compile::moe_triton``     :mod:`.canonical`        the same on the Triton kernels
                                                     (:func:`moe_compile.kernels.fused_moe.fused_moe`)
``moe_compile::moe_ep``         :mod:`.ep`           AllToAll expert parallelism (:mod:`moe_compile.runtime.ep`)
``moe_compile::offload_prefetch`` :mod:`.expert_store` start a prefetch into an expert store's ring
``moe_compile::moe_offload``    :mod:`.expert_store` the canonical op on a store's experts
                                                     (:mod:`moe_compile.runtime.expert_store`)
``moe_compile::predict_experts`` :mod:`.predict`     an expert predictor (:mod:`moe_compile.predictor.net`)
``moe_compile::moe_fp8``        :mod:`.fp8`          the canonical op on block-fp8 experts (W8A8,
                                                     :mod:`moe_compile.quant.fp8`); ``moe_fp8_triton`` the
                                                     same on Triton; ``fp8_linear`` a dense block-fp8 layer
=============================== ==================== ===================================================

The graph passes read and write the MoE calls by argument name through
:class:`moe_compile.passes.moe_call.MoECall`. The names below are re-exported for
``from moe_compile.ops import moe_torch`` and friends; the maths (``activate``, ``check_inputs``,
``moe_torch``, ``moe_reference``) live in :mod:`moe_compile.moe_math`, which the kernels import instead
of this package. ``moe_compile.ops.moe`` is the op object (its module is :mod:`.canonical`).
"""

from __future__ import annotations

from ..moe_math import activate, check_inputs, moe_reference, moe_torch
from . import ep, expert_store, fp8, predict  # noqa: F401  (registers the ops)
from .canonical import moe, moe_fake, moe_triton

__all__ = ["activate", "check_inputs", "moe", "moe_fake", "moe_reference", "moe_torch", "moe_triton"]
