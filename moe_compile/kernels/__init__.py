"""Triton kernels of the canonical MoE op.

Importing this package registers no op: ``moe_compile::moe_triton`` is registered with the other ops in
:mod:`moe_compile.ops.canonical` (``import moe_compile`` does it, without importing Triton), and that
op calls :func:`.fused_moe.fused_moe` from here on its first call. The kernels import the op's maths
(:mod:`moe_compile.moe_math`), never :mod:`moe_compile.ops`.

- :mod:`.align`: sort (token, expert) pairs by expert, pad each expert to ``BLOCK_M`` (device side).
- :mod:`.grouped_gemm`: up projection with the activation fused, down projection times the
  routing weight, deterministic top-k reduction.
- :mod:`.fused_moe`: the whole layer (:func:`fused_moe`).
- :mod:`.configs`: block sizes per device and shape, opt-in autotune.
- :mod:`.compile_gate`: every launch compiled for sm_80/sm_90 without a GPU, checked for spills,
  shared memory and wgmma (``python -m moe_compile.kernels.compile_gate``).

Set ``TRITON_INTERPRET=1`` before importing to run on CPU tensors. The torch references of the
kernels' stages (``up_reference``, ``down_reference``, ``align_reference``) are test code, in
``tests/kernel_tests/references.py``.
"""

from .fused_moe import fused_moe

__all__ = ["fused_moe"]
