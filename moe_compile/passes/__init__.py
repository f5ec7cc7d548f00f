"""The pass pipeline of the ``moe_prefill`` backend, in order.

Each pass is one module; its docstring says what it matches and what it emits.

1. :mod:`.detect_moe` — find MoE blocks by data flow (analysis only).
2. :mod:`.canonicalize_moe` — verify each block on probe inputs and replace it
   with one ``moe_compile::moe`` call.
3. :mod:`.lower_triton` — retarget canonical calls to the Triton kernels when
   asked (``kernels="triton"``, or ``"auto"`` on a GPU).

To add a pass: subclass :class:`~.base.GraphPass` in a new module, say in its
docstring what it matches and emits, and insert it in :func:`build_pipeline`.
"""

from __future__ import annotations

from ..options import Options
from .base import GraphPass, PassContext
from .canonicalize_moe import CanonicalizeMoE
from .detect_moe import DetectMoE, MoEMatch
from .lower_triton import LowerToTriton

__all__ = ["GraphPass", "PassContext", "MoEMatch", "build_pipeline"]


def build_pipeline(options: Options) -> list[GraphPass]:
    """The passes run on every inference ATen graph, in order."""
    return [DetectMoE(), CanonicalizeMoE(), LowerToTriton()]
