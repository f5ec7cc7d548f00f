"""Does AEP's expert gather hide behind compute? A planner for AEP, EP and TP on ``W`` GPUs.

``moe-compile plan --config CONFIG --gpus W --gpu h100 --link nvlink --tokens-per-gpu N --dtype bf16``
prints, per MoE layer, the compute time and the gather time, whether the gather
hides, the prefetch depth and memory it needs, and the predicted throughput of
tensor parallelism (TP), AllToAll expert parallelism (EP) and AEP. The compile
path asks :func:`auto_prefetch_depth` for ``prefetch_depth="auto"``.

The model (simple, stated; every constant below is an assumption, not a measurement)
--------------------------------------------------------------------------------------
Per decoder layer and token, from the model's structure (built on the meta device):
``P_d`` dense parameters (attention, router, shared experts, norms), ``P_e`` parameters
of one routed expert, ``E`` experts, top-``K``; ``S`` tokens of context per request.

- FLOPs per token: ``2 P_d + 2 K P_e + 2 S n_h (d_qk + d_v) / 2`` (matmuls, plus causal
  attention scores at an average context of ``S/2``); embedding and head ignored.
- Compute time of a layer on a GPU holding ``N`` tokens: ``N * FLOPs / (peak * MFU)``.
- AEP: each GPU gathers ``(1 - 1/W)`` of the layer's ``E P_e`` expert bytes over the
  link (ring all-gather at the link's bus bandwidth). Layer time
  ``max(compute, gather)``: the gather hides when a window of ``depth`` layers plus
  the layer's own attention covers it; ``depth`` is the smallest that does. No
  AllToAll, no imbalance (the serving layer balances the ranks' FLOPs).
- EP (data-parallel attention, experts sharded): per MoE layer, two AllToAlls of
  ``N K (1 - 1/W) H`` activations (dispatch in the compute dtype, combine in bf16),
  not overlapped; the experts' compute scaled by ``ep_imbalance`` (the busiest rank's
  share over the mean); a host sync of ``EP_SYNC_S`` for the split sizes.
- TP (every weight split ``W`` ways, the ``W N`` tokens shared): the same compute per
  GPU, plus two all-reduces of the batch's activations per layer, not overlapped.
- Throughput: ``W N`` tokens over the sum of the layer times.
- Memory per GPU: weights (AEP, EP: dense replicated, experts ``1/W``, plus AEP's
  ring of ``depth + 1`` gathered layers; TP: everything ``1/W``). Activations and
  the KV of the prefill are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

#: dense (no sparsity) peak TFLOP/s, from the vendors' data sheets (SXM parts)
PEAK_TFLOPS = {
    "h100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
}
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0}
GPU_NAMES = {"h100": "H100 SXM", "h200": "H200 SXM"}
#: bus bandwidth per GPU a ring collective reaches (bytes/s): NVLink 4 through NVSwitch
#: (NCCL all-gather on 8 GPUs, of 450 GB/s per direction), PCIe Gen5 x16 (of 64 GB/s)
LINK_BANDWIDTH = {"nvlink": 360e9, "pcie": 40e9}
#: model FLOPs utilisation of the compute (the paper measured 29.8-36.2% end to end for AEP)
DEFAULT_MFU = 0.4
#: the busiest EP rank's expert work over the mean (no expert load balancer)
DEFAULT_EP_IMBALANCE = 1.25
#: EP's per-layer host sync for the AllToAll split sizes (count exchange + device sync)
EP_SYNC_S = 50e-6
#: [fp8] block-fp8 weights carry one fp32 scale per 128x128 block (``weight_scale_inv``): bytes per weight on top
#: of its one byte (sizes that are not multiples of 128 round their blocks up: slightly more)
FP8_SCALE_BYTES = 4 / (128 * 128)
#: bytes per weight element, scales included; fp8 keeps embeddings and head in bf16
WEIGHT_BYTES = {"bf16": 2, "fp8": 1 + FP8_SCALE_BYTES, "fp32": 4}
ACTIVATION_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}  # EP dispatch; the combine is in bf16


@dataclasses.dataclass(frozen=True)
class Layer:
    """One decoder layer's sizes (parameter counts per layer, not per GPU)."""

    index: int
    dense_params: int  # attention, router, shared experts, norms: every token uses them
    experts: int  # 0 for a dense layer
    expert_params: int  # one routed expert (up + down, biases)
    top_k: int

    @property
    def moe(self) -> bool:
        return self.experts > 0


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    layers: tuple[Layer, ...]
    attention_flops_per_context_token: int  # 2 * heads * (d_qk + d_v): per token, per token of context
    embedding_params: int  # embedding and head
    kv_elements_per_token: int = 0  # keys and values of every layer for one token (the prefix cache's unit)


@dataclasses.dataclass(frozen=True)
class Setting:
    gpus: int
    gpu: str  # "h100" | "h200"
    link: str  # "nvlink" | "pcie"
    tokens_per_gpu: int
    dtype: str  # "bf16" | "fp8"
    seq_len: int = 2048
    mfu: float = DEFAULT_MFU
    ep_imbalance: float = DEFAULT_EP_IMBALANCE
    hot_experts: int = 0  # AEP: experts per layer resident on every GPU (``hot_experts``), not gathered
    prefix_cache_tokens: int = 65536  # the serving engine's prefix cache per GPU (its default)

    @property
    def flops_per_s(self) -> float:
        return PEAK_TFLOPS[self.gpu][self.dtype] * 1e12 * self.mfu


@dataclasses.dataclass
class LayerPlan:
    layer: Layer
    compute_s: float  # whole layer, N tokens on one GPU
    attention_s: float  # the part before the experts (dense params + attention scores)
    gather_s: float  # AEP: this layer's experts over the link
    depth: int | None  # smallest prefetch depth that hides the gather; None: it never hides
    ep_s: float
    tp_s: float

    @property
    def hides(self) -> bool:
        return self.depth is not None

    @property
    def aep_s(self) -> float:
        return max(self.compute_s, self.gather_s)


@dataclasses.dataclass
class Plan:
    model: ModelShape
    setting: Setting
    layers: list[LayerPlan]
    depth: int  # the prefetch depth AEP runs with (every layer's)
    memory_gb: dict[str, float]  # per GPU: "aep", "ep", "tp"

    def throughput(self, mode: str) -> float:
        """Predicted tokens/s of all GPUs together for ``mode`` in ("tp", "ep", "aep")."""
        seconds = sum(getattr(p, f"{mode}_s") for p in self.layers)
        return self.setting.gpus * self.setting.tokens_per_gpu / seconds


def plan(model: ModelShape, setting: Setting) -> Plan:
    s, W, N = setting, setting.gpus, setting.tokens_per_gpu
    H = model.hidden_size
    link = LINK_BANDWIDTH[s.link]
    wbytes = WEIGHT_BYTES[s.dtype]
    layers = []
    for layer in model.layers:
        attn_flops = N * (2 * layer.dense_params + model.attention_flops_per_context_token * s.seq_len // 2)
        expert_flops = N * 2 * layer.top_k * layer.expert_params
        attention_s, experts_s = attn_flops / s.flops_per_s, expert_flops / s.flops_per_s
        compute_s = attention_s + experts_s
        gathered = max(layer.experts - s.hot_experts, 0)  # the hot experts are resident, not gathered
        gather_s = (1 - 1 / W) * gathered * layer.expert_params * wbytes / link
        if layer.moe:
            a2a_bytes = N * layer.top_k * (1 - 1 / W) * H * (ACTIVATION_BYTES[s.dtype] + 2)  # dispatch + combine
            ep_s = attention_s + experts_s * s.ep_imbalance + a2a_bytes / link + EP_SYNC_S
        else:
            ep_s = compute_s
        allreduce_s = 2 * (1 - 1 / W) * W * N * H * 2 / link  # one ring all-reduce of the batch, bf16
        tp_s = compute_s + (2 * allreduce_s if W > 1 else 0.0)
        # the window at depth d: the layer's own attention, then d whole layers
        depth = hiding_depth(gather_s, lambda d, a=attention_s, c=compute_s: a + d * c) if layer.moe else 0
        layers.append(LayerPlan(layer, compute_s, attention_s, gather_s, depth, ep_s, tp_s))
    depth = max((p.depth for p in layers if p.depth is not None), default=0)
    if any(p.layer.moe and not p.hides for p in layers):
        depth = max(depth, 1)  # link-bound: more depth does not add bandwidth
    return Plan(model, s, layers, depth, _memory_gb(model, s, depth))


def hiding_depth(gather_s: float, window_s: Callable[[int], float], max_depth: int = 64) -> int | None:
    """The smallest depth ``d`` whose compute window ``window_s(d)`` covers the gather, or None.

    None when the gather takes longer than a layer's compute (``window_s(1) - window_s(0)``):
    one gather per layer over one link then sets the pace, whatever the depth. With
    layers of equal cost the answer is 0 or 1; a deeper prefetch only helps layers of
    unequal cost (and absorbs jitter).
    """
    if window_s(1) - window_s(0) < gather_s:
        return None
    return next(d for d in range(max_depth + 1) if gather_s <= window_s(d))


def memory_parts(model: ModelShape, s: Setting, depth: int) -> dict[str, float]:
    """Bytes per GPU of an AEP rank, by part: what ``moe_compile.serving.memory.memory_accounting``
    measures on a loaded rank (``dense_bytes``, ``expert_bytes``, ``ring_bytes``, ``prefix_cache_bytes``).

    The prefix cache at capacity: ``prefix_cache_tokens`` x the keys and values of every layer, in the
    activation dtype (bf16 for fp8 weights). Activations are not counted.
    """
    wbytes = WEIGHT_BYTES[s.dtype]
    R = s.hot_experts
    experts = sum(layer.experts * layer.expert_params for layer in model.layers) * wbytes
    resident = sum(min(R, layer.experts) * layer.expert_params for layer in model.layers) * wbytes
    gathered = [max(layer.experts - R, 0) * layer.expert_params * wbytes for layer in model.layers]
    cat = max((layer.experts * layer.expert_params * wbytes for layer in model.layers), default=0) if R else 0
    return {
        "dense_bytes": sum(layer.dense_params for layer in model.layers) * wbytes
        + model.embedding_params * (4 if s.dtype == "fp32" else 2),
        "expert_bytes": resident + (experts - resident) / s.gpus,
        "ring_bytes": sum(sorted(gathered, reverse=True)[: depth + 1]) + cat if s.gpus > 1 else 0,
        "prefix_cache_bytes": s.prefix_cache_tokens * model.kv_elements_per_token * (4 if s.dtype == "fp32" else 2),
    }


def _memory_gb(model: ModelShape, s: Setting, depth: int) -> dict[str, float]:
    wbytes = WEIGHT_BYTES[s.dtype]
    parts = memory_parts(model, s, depth)
    dense = sum(layer.dense_params for layer in model.layers) * wbytes + model.embedding_params * 2
    experts = sum(layer.experts * layer.expert_params for layer in model.layers) * wbytes
    R = s.hot_experts
    gathered = [max(layer.experts - R, 0) * layer.expert_params * wbytes for layer in model.layers]
    resident = sum(min(R, layer.experts) * layer.expert_params for layer in model.layers) * wbytes
    # hot experts: the resident copies on every GPU, and one [E, ...] layer for the concatenation
    cat = max((layer.experts * layer.expert_params * wbytes for layer in model.layers), default=0) if R else 0
    ring = sum(sorted(gathered, reverse=True)[: depth + 1]) + cat
    return {
        "aep": (dense + resident + (experts - resident) / s.gpus + ring) / 1e9,
        "ep": (dense + experts / s.gpus) / 1e9,
        "tp": (dense + experts) / s.gpus / 1e9,
        "prefix_cache": parts["prefix_cache_bytes"] / 1e9,  # per GPU, beside the weights (every mode keeps one)
    }


# ---------------------------------------------------------------------------------------------
# the model's structure, from a transformers config
# ---------------------------------------------------------------------------------------------


def model_shape(config: Any) -> ModelShape:
    """Parameter counts per decoder layer, found by structure on a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    top_k = _first(text, ("num_experts_per_tok", "moe_topk", "num_experts_per_token"), default=0)
    layers = []
    for i, block in enumerate(_decoder_layers(model)):
        experts, E = _experts_module(block)
        expert_params = sum(p.numel() for p in experts.parameters()) // E if experts is not None else 0
        total = sum(p.numel() for p in block.parameters())
        layers.append(Layer(i, total - E * expert_params, E, expert_params, top_k if E else 0))
    in_layers = sum(sum(p.numel() for p in block.parameters()) for block in _decoder_layers(model))
    heads = text.num_attention_heads
    d_qk = _first(text, ("qk_head_dim",), default=0) or (
        (getattr(text, "qk_nope_head_dim", 0) or 0) + (getattr(text, "qk_rope_head_dim", 0) or 0)
        or getattr(text, "head_dim", None)
        or text.hidden_size // heads
    )
    d_v = getattr(text, "v_head_dim", None) or d_qk
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        name=getattr(config, "_name_or_path", "") or config.model_type,
        hidden_size=text.hidden_size,
        layers=tuple(layers),
        attention_flops_per_context_token=2 * heads * (d_qk + d_v),
        embedding_params=sum(p.numel() for p in model.parameters()) - in_layers,
        kv_elements_per_token=len(layers) * kv_heads * (d_qk + d_v),
    )


def _first(config: Any, keys: tuple[str, ...], default: int) -> int:
    return next((getattr(config, k) for k in keys if getattr(config, k, None)), default)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _experts_module(block: torch.nn.Module) -> tuple[torch.nn.Module | None, int]:
    """The module holding the routed experts' ``[E, ., .]`` weights, and ``E`` (0 when dense)."""
    for module in block.modules():
        weights = [p for p in module.parameters(recurse=False) if p.dim() == 3 and p.shape[0] > 1]
        if weights:
            return module, weights[0].shape[0]
    return None, 0


# ---------------------------------------------------------------------------------------------
# prefetch_depth="auto" at compile time
# ---------------------------------------------------------------------------------------------


def auto_prefetch_depth(
    device: torch.device,
    world_size: int,
    gather_bytes: list[int],
    window_flops: Callable[[int, int], int],
    num_layers: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, str]:
    """The compile-time choice for ``prefetch_depth="auto"``, and why.

    On a GPU the planner knows (H100, H200; NVLink assumed), the smallest depth
    whose compute window (``window_flops(layer, depth)``, from the graph) covers
    every steady-state layer's gather; 1 when the gathers never hide (link-bound:
    more depth adds no bandwidth) or when the device is unknown (CPU).
    """
    gpu = _known_gpu(device)
    if gpu is None:
        return 1, f"auto: {device.type} is not a device the planner models; depth 1"
    key = {torch.float8_e4m3fn: "fp8", torch.float32: "fp32"}.get(dtype, "bf16")
    flops_per_s = PEAK_TFLOPS[gpu][key] * 1e12 * DEFAULT_MFU
    link = LINK_BANDWIDTH["nvlink"]
    # the first layer's gather, issued at the graph start, cannot hide: steady state is layers 1..L-1
    depths = [
        hiding_depth((1 - 1 / world_size) * gather_bytes[i] / link, lambda d, i=i: window_flops(i, d) / flops_per_s)
        for i in range(1, num_layers)
    ]
    if any(d is None for d in depths):
        return 1, f"auto: the gathers do not hide on {GPU_NAMES[gpu]} over NVLink (link-bound); depth 1"
    return max(depths, default=0), f"auto: smallest depth that hides every gather on {GPU_NAMES[gpu]} over NVLink"


def _known_gpu(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((key for key in PEAK_TFLOPS if key.upper() in name), None)


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------


def format_plan(p: Plan) -> str:
    s = p.setting
    lines = [
        f"model: {p.model.name}: {len(p.model.layers)} layers, "
        f"{sum(layer.moe for layer in p.model.layers)} MoE; hidden {p.model.hidden_size}",
        f"setting: {s.gpus} x {GPU_NAMES[s.gpu]} ({GPU_MEMORY_GB[s.gpu]:g} GB), {s.link} "
        f"({LINK_BANDWIDTH[s.link] / 1e9:g} GB/s bus bandwidth), {s.dtype}, {s.tokens_per_gpu} tokens per GPU, "
        f"context {s.seq_len}, MFU {s.mfu:g}, EP imbalance {s.ep_imbalance:g}",
        "",
        "per MoE layer (ms; consecutive identical layers merged):",
        _table(
            ["layers", "E", "compute", "gather", "hides", "depth", "EP layer", "TP layer"],
            [
                [
                    rng,
                    str(lp.layer.experts),
                    f"{lp.compute_s * 1e3:.2f}",
                    f"{lp.gather_s * 1e3:.2f}",
                    "yes" if lp.hides else "no (link-bound)",
                    str(lp.depth) if lp.hides else "-",
                    f"{lp.ep_s * 1e3:.2f}",
                    f"{lp.tp_s * 1e3:.2f}",
                ]
                for rng, lp in _merged(p.layers)
            ],
        ),
        "",
        f"AEP prefetch depth {p.depth}: ring of {p.depth + 1} gathered layer(s)",
        *_hot_line(p),
        (
            "memory per GPU (weights + AEP ring; activations not counted): "
            + ", ".join(f"{m.upper()} {p.memory_gb[m]:.1f} GB" for m in ("tp", "ep", "aep"))
        ),
        f"prefix cache of {s.prefix_cache_tokens:,} tokens (serving's --prefix-cache-tokens): "
        f"{p.memory_gb['prefix_cache']:.1f} GB per GPU more; AEP with it: "
        f"{p.memory_gb['aep'] + p.memory_gb['prefix_cache']:.1f} GB",
    ]
    capacity = GPU_MEMORY_GB[s.gpu]
    for mode in ("tp", "ep", "aep"):
        if p.memory_gb[mode] > capacity:
            lines.append(f"  warning: {mode.upper()} needs {p.memory_gb[mode]:.1f} GB, more than the {capacity:g} GB")
    tput = {m: p.throughput(m) for m in ("tp", "ep", "aep")}
    best = max(("tp", "ep"), key=tput.__getitem__)
    lines += [
        (
            "predicted throughput (tokens/s, all GPUs): "
            + ", ".join(f"{m.upper()} {tput[m]:,.0f}" for m in ("tp", "ep", "aep"))
        ),
        f"AEP / best baseline ({best.upper()}): {tput['aep'] / tput[best]:.2f}x",
    ]
    return "\n".join(lines)


def _hot_line(p: Plan) -> list[str]:
    R = p.setting.hot_experts
    moe = [lp for lp in p.layers if lp.layer.moe]
    if not R or not moe:
        return []
    lp = max(moe, key=lambda lp: lp.layer.experts * lp.layer.expert_params)
    E, W = lp.layer.experts, p.setting.gpus
    full = (1 - 1 / W) * E * lp.layer.expert_params * WEIGHT_BYTES[p.setting.dtype]
    line = (
        f"AEP hot experts: {min(R, E)} of {E} per layer resident on every GPU; the largest layer's gather "
        f"{full * max(E - R, 0) / E / 1e9:.3f} GB instead of {full / 1e9:.3f} GB per GPU (plus one on-device "
        "copy of the layer to concatenate resident and gathered experts)"
    )
    return [line]


def _merged(layers: list[LayerPlan]) -> list[tuple[str, LayerPlan]]:
    """MoE layers, consecutive ones with the same numbers merged into one row (``"0-93"``)."""
    rows: list[tuple[int, int, LayerPlan]] = []
    for lp in layers:
        if not lp.layer.moe:
            continue
        key = (lp.layer.experts, lp.layer.expert_params, lp.layer.dense_params)
        if rows and rows[-1][1] == lp.layer.index - 1:
            prev = rows[-1][2]
            if (prev.layer.experts, prev.layer.expert_params, prev.layer.dense_params) == key:
                rows[-1] = (rows[-1][0], lp.layer.index, prev)
                continue
        rows.append((lp.layer.index, lp.layer.index, lp))
    return [(f"{a}" if a == b else f"{a}-{b}", lp) for a, b, lp in rows]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
