"""The pass pipeline of the ``moe_prefill`` backend, in order.

Each pass is one module; its docstring says what it matches and what it emits.

0. :mod:`.released_weights` — only with ``parallel`` or ``offload``: on a recompile,
   hide the expert weights the first compile released (analysis only).
1. :mod:`.detect_moe` — find MoE blocks by data flow (analysis only).
2. :mod:`.canonicalize_moe` — verify each block on probe inputs and replace it
   with one ``moe_compile::moe`` call.
2'. :mod:`.recognize_expert_parallel` — under torch.distributed: find blocks that
   already run expert-parallel (AllToAll); with ``"aep"`` rewrite each into one
   canonical call on global ids whose weights are this rank's shards.
2a. :mod:`.offload_experts` — only with ``offload``: experts to host memory,
   calls retargeted to ``moe_compile::moe_offload`` (everything on demand).
2b. :mod:`.predicted_gather` — only with ``parallel="aep"`` and ``predictor``
   (instead of step 4): shard the experts, calls retargeted to ``moe_offload``
   on a store whose fetches all-gather over the ranks.
2c. :mod:`.insert_predictors` — only with ``predictor``: each layer's predictor
   on its pre-attention activation, driving an ``offload_prefetch``.
3. :mod:`.lower_triton` — retarget canonical calls to the Triton kernels when
   asked (``kernels="triton"``, or ``"auto"`` on a GPU).
4. one of, with the ``parallel`` option:
   :mod:`.async_expert_parallel` (``"aep"``) — shard the experts, gather each
   layer's experts ahead of use;
   :mod:`.expert_parallel` (``"ep"``) — shard the experts, AllToAll the tokens;
   nothing here when step 2b ran.
5. :mod:`.causal_attention` — with ``causal_attention`` (the default): attention masks that
   are only the causal lower triangle of the sequence length become SDPA's ``is_causal``.

Passes hand results to each other in typed fields of :class:`~.base.PassContext`; each
pass declares the fields it ``requires``, ``uses`` and ``provides``, and
:func:`build_pipeline` checks the order (:func:`~.base.check_order`). Passes read and write
the MoE calls by argument name (:class:`~.moe_call.MoECall`) and walk the graph with the op
sets of :mod:`.vocabulary`.

To add a pass: subclass :class:`~.base.GraphPass` in a new module, say in its
docstring what it matches and emits, declare what it requires and provides, insert it
in :func:`build_pipeline`, and give it a test module in ``tests/passes/``
(:mod:`moe_compile.testing.pass_harness` runs chosen passes and keeps each graph).
"""

from __future__ import annotations

import torch

from ..options import Options
from .async_expert_parallel import AsyncExpertParallel
from .base import GraphPass, PipelineOrderError, check_order
from .canonicalize_moe import CanonicalizeMoE
from .causal_attention import CausalAttention
from .detect_moe import DetectMoE
from .expert_parallel import ExpertParallel
from .insert_predictors import InsertPredictors
from .lower_triton import LowerToTriton
from .offload_experts import OffloadExperts
from .predicted_gather import PredictedGather
from .recognize_expert_parallel import RecognizeExpertParallel
from .released_weights import HideReleasedWeights
from .state import MoEMatch, PassContext

__all__ = ["GraphPass", "MoEMatch", "PassContext", "PipelineOrderError", "build_pipeline", "check_order"]

_PARALLEL = {"aep": AsyncExpertParallel, "ep": ExpertParallel}


def build_pipeline(options: Options) -> list[GraphPass]:
    """The passes run on every inference ATen graph, in order."""
    passes: list[GraphPass] = [DetectMoE(), CanonicalizeMoE()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        passes.append(RecognizeExpertParallel())  # an EP model's AllToAlls need a process group
    predicted_gather = options.parallel == "aep" and options.predictor is not None
    if options.offload is not None:
        passes.append(OffloadExperts())
    if predicted_gather:
        passes.append(PredictedGather())
    if options.predictor is not None:
        passes.append(InsertPredictors())
    passes.append(LowerToTriton())
    if options.parallel is not None or options.offload is not None:
        passes = [HideReleasedWeights(), *passes]
    if options.parallel is not None and not predicted_gather:
        passes.append(_PARALLEL[options.parallel]())
    if options.causal_attention:
        passes.append(CausalAttention())
    check_order(passes)
    return passes
