"""Triton kernels of the canonical MoE op; importing this package registers ``moe_compile::moe_triton``.

- :mod:`.align`: sort (token, expert) pairs by expert, pad each expert to ``BLOCK_M`` (device side).
- :mod:`.grouped_gemm`: up projection with the activation fused, down projection times the
  routing weight, deterministic top-k reduction.
- :mod:`.fused_moe`: the whole layer (:func:`fused_moe`) and the custom op.
- :mod:`.configs`: block sizes per device and shape, opt-in autotune.
- :mod:`.compile_gate`: every launch compiled for sm_80/sm_90 without a GPU, checked for spills,
  shared memory and wgmma (``python -m moe_compile.kernels.compile_gate``).

Set ``TRITON_INTERPRET=1`` before importing to run on CPU tensors.
"""

from .fused_moe import fused_moe, moe_triton

__all__ = ["fused_moe", "moe_triton"]
