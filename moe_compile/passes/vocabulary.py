"""The graph vocabulary the passes share: which ATen ops count as matmuls, views, row gathers, collectives.

Every set holds op names as :func:`moe_compile.graph.op_name` writes them (``aten::mm``). A pass that
needs a new family of ops adds it here, so that every pass walks the graph with the same words.
"""

from __future__ import annotations

#: grouped matmuls over experts: ``x [S, in]`` by ``w [E, in, out]`` with per-expert offsets
GROUPED_MATMULS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}
#: every matmul an expert weight may reach
MATMULS = {"aten::mm", "aten::bmm", "aten::matmul", "aten::addmm", "aten::baddbmm"} | GROUPED_MATMULS
#: the matmuls whose FLOPs the AEP schedule counts in a compute window: ``2 * out.numel() * contracted``
#: (``aten::matmul`` never reaches an ATen graph; the transformers fallback is a loop of the others)
FLOP_MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm"}
#: ops that only re-shape, re-type or re-order values (walked through to find a block's inputs)
VIEWS = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::unsqueeze", "aten::squeeze",
    "aten::expand", "aten::clone", "aten::alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::contiguous", "aten::_to_copy", "aten::to", "prims::convert_element_type",
}  # fmt: skip
#: row gathers: ``index(x, [rows])`` and friends keep x's values, reordered or repeated;
#: ``masked_fill`` zeroes expert-parallel sentinel rows (ids >= E, never true for a local model);
#: ``where`` only as a masked fill, ``where(mask, 0.0, x)``: Inductor's post-grad graph spells masked_fill so
GATHERS = {
    "aten::index", "aten::index_select", "aten::repeat_interleave", "aten::gather", "aten::masked_fill", "aten::where",
}  # fmt: skip
#: elementwise activations -> the :class:`~moe_compile.spec.ExpertSpec` activation they suggest
ACTIVATION_OPS = {"aten::silu": "silu", "aten::gelu": "gelu", "aten::relu": "relu", "aten::tanh": "gelu_tanh"}
#: functional collectives (``torch.ops._c10d_functional``)
ALL_TO_ALL = "_c10d_functional::all_to_all_single"
WAIT = "_c10d_functional::wait_tensor"
