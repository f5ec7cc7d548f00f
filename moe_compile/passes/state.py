"""What passes hand each other: :class:`PassContext` and the records in its fields.

The records (:class:`MoEMatch`, :class:`CanonicalCall`, :class:`DetectedMoE`, :class:`MoEBlock`)
sit here, below both :mod:`.base` (``GraphPass``, ``check_order``) and the passes that make and
read them, so no pass imports another pass for a type. :data:`STATE_FIELDS` names the fields passes
provide; a pass declares which it ``requires``, ``uses`` and ``provides`` (:mod:`.base`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx

from ..options import Options
from ..report import BlockReport, Report
from ..spec import ExpertSpec

if TYPE_CHECKING:
    from ..runtime.expert_store import ExpertStore

__all__ = ["STATE_FIELDS", "CanonicalCall", "DetectedMoE", "MoEBlock", "MoEMatch", "PassContext"]


@dataclasses.dataclass
class MoEMatch:
    """One detected MoE block: the nodes the canonical op takes, and what it is."""

    path: str
    hidden: fx.Node  # x, any shape [..., H] with T*H elements
    topk_ids: fx.Node  # [T, K] integer
    topk_weights: fx.Node  # [T, K] float
    w_up: fx.Node
    w_down: fx.Node
    up_mm: fx.Node
    down_mm: fx.Node
    out: fx.Node  # the node whose value the block produces (T*H elements)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    candidates: list[ExpertSpec]  # spec guesses, most likely first; verification picks
    router: str
    shared_experts: bool
    source: str  # "grouped" (sort + grouped matmul) or "batched" (weights gathered per pair)
    #: ``topk_weights`` is a dense ``[T, E]`` score, zero outside ``topk_ids``, that scales the experts'
    #: input (Llama 4); the rewrite gathers it at the ids (:func:`_input_scaled`)
    dense_scores: bool = False


@dataclasses.dataclass
class CanonicalCall:
    """A ``moe_compile::moe`` call already in the graph (a module made by ``moe_compile.prepare``)."""

    node: fx.Node
    path: str
    router: str
    shared_experts: bool


class MoEBlock(NamedTuple):
    """One canonical MoE call of the graph and its report line."""

    node: fx.Node  # the call: moe_compile.moe, or what a later pass retargeted it to
    report: BlockReport


@dataclasses.dataclass
class DetectedMoE:
    """What :mod:`.detect_moe` found: blocks to rewrite, and canonical calls already in the graph."""

    matches: list[MoEMatch] = dataclasses.field(default_factory=list)
    canonical: list[CanonicalCall] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read besides the graph, and where results go."""

    options: Options
    report: Report
    graph_name: str = "graph_0"
    #: real values of the graph's placeholders (tensors, ints), in placeholder order, when known
    real_inputs: list[Any] | None = None
    #: placeholder position -> parameter FQN (``model.layers.0.mlp.experts.gate_up_proj``)
    param_names: dict[int, str] = dataclasses.field(default_factory=dict)
    #: set when autograd is on: the backend then runs no pass
    training: bool = False
    dumper: Any = None  # moe_compile.debug.GraphDumper in debug mode
    #: the graph is Inductor's post-grad graph (Inductor schedules it next): async_expert_parallel pins its order
    inductor: bool = False

    # --- what passes hand to each other; the comment names the pass that provides each field ---
    #: detect_moe: the MoE blocks found by data flow, and the canonical calls already in the graph
    detected: DetectedMoE | None = None
    #: canonicalize_moe: every canonical call and its report, in the order found (recognize_expert_parallel
    #: replaces the expert-parallel ones)
    moe_blocks: list[MoEBlock] | None = None
    #: recognize_expert_parallel: calls whose expert arguments already are this rank's shards -> their world size
    presharded: dict[fx.Node, int] = dataclasses.field(default_factory=dict)
    #: released_weights: placeholder index -> full expert tensor an earlier parallel compile released
    released_inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: offload_experts, predicted_gather: the graph's expert stores (the compiled callable keeps them alive)
    stores: list[ExpertStore] = dataclasses.field(default_factory=list)
    #: async_expert_parallel, expert_parallel, predicted_gather: wraps the compiled callable (world-size check)
    wrap_compiled: Callable[[Callable], Callable] | None = None

    def placeholder_index(self, node: fx.Node) -> int | None:
        if node.op != "placeholder":
            return None
        for i, n in enumerate(node.graph.find_nodes(op="placeholder")):
            if n is node:
                return i
        return None

    def real_value(self, node: fx.Node) -> Any:
        i = self.placeholder_index(node)
        if i is None or self.real_inputs is None or i >= len(self.real_inputs):
            return None
        return self.real_inputs[i]

    def param_name(self, node: fx.Node) -> str:
        i = self.placeholder_index(node)
        return self.param_names.get(i, node.name) if i is not None else node.name


#: the :class:`PassContext` fields that passes provide
STATE_FIELDS = ("detected", "moe_blocks", "presharded", "released_inputs", "stores", "wrap_compiled")
