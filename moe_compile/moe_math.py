"""The canonical MoE op's maths: what ``moe_compile::moe`` computes, in torch, depending only on :mod:`.spec`.

Shape legend: ``T`` tokens, ``K`` experts per token, ``E`` experts, ``H`` hidden
size, ``I`` intermediate size, ``N`` up-projection width (``2I`` gated, else ``I``),
``S = T*K`` (token, expert) pairs.

Semantics (what every implementation must compute)::

    out[t] = sum_k  topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t])
    expert_e(x) = down_e(act(up_e(x)))

or, with ``spec.scale_input`` (Llama 4, whose router scales the experts' input)::

    out[t] = sum_k  expert_{topk_ids[t, k]}(topk_weights[t, k] * hidden[t])

The router is *not* part of the op: it stays as ordinary graph nodes, so every
router kind (softmax/sigmoid, renormalised or not, group-limited, biased, scaled)
is preserved exactly. Expert weights are passed as they are stored (see
:mod:`moe_compile.spec` for the layouts), so no weight is copied or transposed.

- :func:`activate`: the (gated) activation of a spec.
- :func:`check_inputs`: the shape checks every implementation and the op's fake share.
- :func:`moe_torch`: the default implementation of the op. Pairs are sorted by
  expert and each expert's rows run as one matmul (``grouped_mm`` when the
  device, dtype and alignment allow, see :func:`use_grouped_mm`; else a loop
  with one host sync).
- :func:`moe_reference`: an obviously correct per-pair loop, for tests only.

This module sits at the bottom of the package with :mod:`.spec`: the op's registration
(:mod:`moe_compile.ops.canonical`), the Triton kernels (:mod:`moe_compile.kernels`), the passes'
verification and ``prepare``'s replacement modules all import it; it imports none of them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .spec import ExpertSpec

__all__ = ["activate", "check_inputs", "moe_reference", "moe_torch", "use_grouped_mm"]


def activate(up_SN: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """Apply the (gated) activation: ``[S, N] -> [S, I]``."""
    if spec.gated:
        if spec.gate_layout == "interleaved":
            gate_SI, up_SI = up_SN[..., ::2], up_SN[..., 1::2]
        else:
            gate_SI, up_SI = up_SN.chunk(2, dim=-1)
    else:
        gate_SI, up_SI = up_SN, None
    if spec.activation == "swiglu_oai":
        assert up_SI is not None
        gate_SI = gate_SI.clamp(max=spec.limit)
        up_SI = up_SI.clamp(min=-spec.limit, max=spec.limit)
        return (up_SI + 1) * (gate_SI * torch.sigmoid(gate_SI * spec.alpha))
    if spec.activation == "swiglu_softcap":  # in fp32, cast back: as Inkling 2 computes it
        assert up_SI is not None
        g_SI, u_SI = gate_SI.float(), up_SI.float()
        capped_gate_SI = torch.tanh(g_SI / spec.gate_softcap) * spec.gate_softcap
        capped_up_SI = torch.tanh(u_SI / spec.up_softcap) * spec.up_softcap
        return (capped_gate_SI * torch.sigmoid(g_SI) * capped_up_SI).to(gate_SI.dtype)
    if spec.clamp != "none":  # GLM-5-Next / HY-V4 ("before"), Step-3.7 ("after")
        assert up_SI is not None
        up_SI = up_SI.clamp(min=-spec.limit, max=spec.limit)
        if spec.clamp == "before":
            gate_SI = gate_SI.clamp(max=spec.limit)
        act_SI = activate(gate_SI, dataclasses.replace(spec, gated=False, clamp="none"))
        if spec.clamp == "after":
            act_SI = act_SI.clamp(max=spec.limit)
        return act_SI * up_SI
    if spec.activation == "silu":
        act_SI = F.silu(gate_SI)
    elif spec.activation == "gelu":
        act_SI = F.gelu(gate_SI)
    elif spec.activation == "gelu_tanh":
        act_SI = F.gelu(gate_SI, approximate="tanh")
    elif spec.activation == "relu2":
        act_SI = torch.square(F.relu(gate_SI))
    else:
        act_SI = F.relu(gate_SI)
    return act_SI * up_SI if up_SI is not None else act_SI


def _expert_linear(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """One expert's projection: ``w`` is ``[out, in]`` (``[in, out]`` when transposed)."""
    return x @ w if transposed else x @ w.t()


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
#: this torch build has a CPU kernel for grouped_mm (a composite one: any dtype and alignment below)
_GROUPED_MM_ON_CPU = _grouped_mm is not None and torch._C._dispatch_has_computed_kernel_for_dispatch_key(
    "aten::_grouped_mm", "CPU"
)


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm wants 16-byte aligned data and leading strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride() if st != 1)


def use_grouped_mm(x: torch.Tensor, w_EDO: torch.Tensor) -> bool:
    """Whether ``_grouped_linear`` runs ``grouped_mm`` on these operands (else its per-expert loop).

    CUDA: bf16 on sm90 or newer. CPU: fp32 or bf16, when this torch build has the kernel. Both:
    equal dtypes, 16-byte aligned data and strides (grouped_mm raises otherwise).
    """
    if _grouped_mm is None or x.dtype != w_EDO.dtype or not (_aligned(x) and _aligned(w_EDO)):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _GROUPED_MM_ON_CPU


def _grouped_linear(
    x_SD: torch.Tensor, w: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Rows of ``x_SD`` are sorted by expert; ``counts_E[e]`` rows go to expert ``e``."""
    w_EDO = w if transposed else w.transpose(-2, -1)  # [E, in, out]
    if x_SD.shape[0] and use_grouped_mm(x_SD, w_EDO):
        return _grouped_mm(x_SD, w_EDO, offs=offs_E)
    out_SO = x_SD.new_empty(x_SD.shape[0], w_EDO.shape[-1])
    start = 0
    # NOTE: one host sync for the per-expert row counts.
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out_SO[start : start + n] = x_SD[start : start + n] @ w_EDO[e]
            start += n
    return out_SO


def moe_torch(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """Sort-by-expert implementation of the canonical op (see the module docstring)."""
    T, K = topk_ids_TK.shape
    E = w_up.shape[0]
    x_TH = hidden_TH.to(w_up.dtype)
    ids_S = topk_ids_TK.reshape(-1).long()
    order_S = torch.argsort(ids_S, stable=True)  # pairs sorted by expert
    sorted_ids_S = ids_S[order_S]
    # end of each expert's rows; searchsorted, unlike bincount on CUDA, never reads a value on the host
    ends_E = torch.searchsorted(sorted_ids_S, torch.arange(E, device=ids_S.device), right=True)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    offs_E = ends_E.to(torch.int32)

    weights_S1 = topk_weights_TK.reshape(-1)[order_S].unsqueeze(-1)
    # index_select, not advanced indexing: the same rows, 2-4x faster on CPU for [S, H] rows
    x_SH = x_TH.index_select(0, order_S // K)
    if spec.scale_input:
        x_SH = x_SH * weights_S1.to(x_SH.dtype)
    up_SN = _grouped_linear(x_SH, w_up, counts_E, offs_E, spec.transposed)
    if b_up_EN is not None:
        up_SN = up_SN + b_up_EN.index_select(0, sorted_ids_S)
    act_SI = activate(up_SN, spec)
    down_SH = _grouped_linear(act_SI, w_down, counts_E, offs_E, spec.transposed)
    if b_down_EH is not None:
        down_SH = down_SH + b_down_EH.index_select(0, sorted_ids_S)

    weighted_SH = down_SH if spec.scale_input else down_SH * weights_S1
    # back to token order: row s of the result is sorted row inverse[s] (a gather, cheaper than index_copy_)
    inverse_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(order_S.numel(), device=order_S.device))
    unsorted_SH = weighted_SH.index_select(0, inverse_S)
    return unsorted_SH.view(T, K, -1).sum(dim=1).to(hidden_TH.dtype)


def moe_reference(
    hidden_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """The obvious loop over tokens and their experts, in fp32 (tests only)."""
    T, K = topk_ids_TK.shape
    out_TH = torch.zeros(T, hidden_TH.shape[-1], dtype=torch.float32, device=hidden_TH.device)
    for t in range(T):
        for k in range(K):
            e = int(topk_ids_TK[t, k])
            x_1H = hidden_TH[t : t + 1].float()
            w = topk_weights_TK[t, k].float()
            if spec.scale_input:
                x_1H, w = w * x_1H, torch.ones_like(w)
            up_1N = _expert_linear(x_1H, w_up[e].float(), spec.transposed)
            if b_up_EN is not None:
                up_1N = up_1N + b_up_EN[e].float()
            y_1H = _expert_linear(activate(up_1N, spec), w_down[e].float(), spec.transposed)
            if b_down_EH is not None:
                y_1H = y_1H + b_down_EH[e].float()
            out_TH[t] += w * y_1H[0]
    return out_TH.to(hidden_TH.dtype)


def check_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    spec: ExpertSpec,
) -> None:
    """Shape checks shared by the fake and every real implementation."""
    torch._check(hidden.dim() == 2, lambda: f"moe: hidden must be [T, H], got {tuple(hidden.shape)}")
    torch._check(topk_ids.dim() == 2, lambda: f"moe: topk_ids must be [T, K], got {tuple(topk_ids.shape)}")
    torch._check(topk_weights.shape == topk_ids.shape, lambda: "moe: topk_weights and topk_ids differ in shape")
    torch._check(w_up.dim() == 3 and w_down.dim() == 3, lambda: "moe: expert weights must be [E, out, in]")
    H = hidden.shape[1]
    up_in = w_up.shape[1] if spec.transposed else w_up.shape[2]
    down_out = w_down.shape[2] if spec.transposed else w_down.shape[1]
    torch._check(up_in == H and down_out == H, lambda: f"moe: expert weights do not match hidden size {H}")
    N = w_up.shape[2] if spec.transposed else w_up.shape[1]
    down_in = w_down.shape[1] if spec.transposed else w_down.shape[2]
    torch._check(
        down_in * (2 if spec.gated else 1) == N,
        lambda: f"moe: w_up {tuple(w_up.shape)} and w_down {tuple(w_down.shape)} are not an up/down pair for {spec}",
    )
