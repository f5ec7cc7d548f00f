"""Tiny configs of a family: the zoo's where it has the family, else the default config shrunk
generically (:func:`tiny_config`), with :data:`TINY_EXPERTS` experts.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from .common import quiet as _quiet
from .families import _COUNT, _MOE_SWITCH, _NOT_COUNT, _TOP_K

#: experts in every tiny config (enough that an expert weight [E, ., .] is not mistaken for a small dense one)
TINY_EXPERTS = 8

_SIZES: dict[str, int] = {
    # widths
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "out_hidden_size": 32,
    "intermediate_size": 32, "ffn_dim": 32, "d_ff": 32, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "ffn_hidden_size": 32, "intermediate_size_mlp": 32, "moe_intermediate_size": 16, "moe_hidden_size": 32,
    "expert_ffn_hidden_size": 16, "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "share_expert_dim": 32, "expert_intermediate_size": 16,
    # depth
    "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2, "n_layer": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "depth": 1,
    # heads
    "num_attention_heads": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_heads": 2,
    "n_head": 2, "n_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16,
    "text_hidden_size": 32, "adapter_in_dim": 32,
    "mamba_n_heads": 2, "mamba_d_head": 32, "mamba_d_state": 8, "mamba_dt_rank": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # vocabulary and positions
    "vocab_size": 128,
}  # fmt: skip
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "encoder_layers", "decoder_layers",
                 "num_decoder_layers")  # fmt: skip
_TOKEN_IDS = re.compile(r"_token_id$|_token_ids$")


def _shrink(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict (one level, nested config dicts recursively) shrunk to tiny sizes."""
    out = dict(d)
    old_layers = next((d[k] for k in _LAYER_COUNTS if isinstance(d.get(k), int)), None)
    for key, value in d.items():
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = _shrink(value)
        elif key in _SIZES and value is None and "intermediate" in key:
            out[key] = _SIZES[key]  # e.g. gemma4's moe_intermediate_size, None while the MoE block is off
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, _SIZES[key]) if key not in ("head_dim",) else _SIZES[key]
        elif "expert" in key and _COUNT.search(key) and not _NOT_COUNT.search(key) and key in d:
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                out[key] = TINY_EXPERTS
        elif _TOP_K.match(key) and (value is None or isinstance(value, int)):
            out[key] = 2 if value is None else max(1, min(value, 2))
        elif _MOE_SWITCH.match(key) and value is False:
            out[key] = True
        elif _TOKEN_IDS.search(key) and isinstance(value, int) and value >= 128:
            out[key] = 3 + (hash(key) % 100)  # keep special tokens inside the tiny vocabulary
        elif key in ("first_k_dense_replace", "num_dense_layers") and isinstance(value, int):
            out[key] = min(value, 1)
        elif key in ("n_group", "num_expert_group") and isinstance(value, int):
            out[key] = min(value, 2)
        elif key in ("topk_group",) and isinstance(value, int):
            out[key] = 1
        elif re.search(r"sparse_step|moe_layer_freq|moe_layer_interval|interleave_moe_layer_step", key) and isinstance(
            value, int
        ):
            out[key] = 1  # every layer a MoE layer: the tiny model keeps only two
    if isinstance(out.get("qk_rope_head_dim"), int) and "head_dim" in out:
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: the rotary part (as transformers' DeepSeek configs)
    _scale_rope_sections(out)
    _remap_per_layer_dicts(out, d, old_layers)
    new_layers = next((out[k] for k in _LAYER_COUNTS if isinstance(out.get(k), int)), None)
    if isinstance(old_layers, int) and isinstance(new_layers, int) and new_layers < old_layers:
        picks = _layer_picks(d, old_layers, new_layers)
        for key, value in d.items():
            if isinstance(value, list) and len(value) == old_layers:
                out[key] = [value[i] for i in picks]
            elif key in ("moe_layers", "mlp_only_layers", "sparse_layers") and isinstance(value, list):
                out[key] = [picks.index(i) for i in value if i in picks]
        if isinstance(out.get("moe_layers"), list) and not out["moe_layers"]:
            out["moe_layers"] = list(range(new_layers))
    return out


def _scale_rope_sections(out: dict[str, Any]) -> None:
    """Multimodal rotary sections (``mrope_section``) sum to half the head size: scale them with it."""
    heads = out.get("num_attention_heads")
    head_new = (
        out.get("qk_rope_head_dim") or out.get("head_dim") or (out.get("hidden_size") // heads if heads else None)
    )
    for holder in (out, out.get("rope_parameters"), out.get("rope_scaling")):
        if not isinstance(holder, dict) or not isinstance(holder.get("mrope_section"), list):
            continue
        section = holder["mrope_section"]
        factor = holder.get("partial_rotary_factor") or out.get("partial_rotary_factor") or 1.0
        if head_new and sum(section) != int(head_new * factor) // 2:
            half = int(head_new * factor) // 2
            scaled = [max(1, round(x * half / sum(section))) for x in section]
            scaled[0] += half - sum(scaled)
            holder["mrope_section"] = scaled


def _remap_per_layer_dicts(out: dict[str, Any], old: dict[str, Any], old_layers: Any) -> None:
    """Dicts keyed by layer index (``per_layer_config``): keep the entries of the layers the tiny model keeps."""
    new_layers = next((out[k] for k in _LAYER_COUNTS if isinstance(out.get(k), int)), None)
    if not isinstance(old_layers, int) or not isinstance(new_layers, int) or new_layers >= old_layers:
        return
    picks = _layer_picks(old, old_layers, new_layers)
    for key, value in old.items():
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            kept = {}
            for new_index, old_index in enumerate(picks):
                for k, v in value.items():
                    if int(k) == old_index:
                        kept[type(k)(new_index) if not isinstance(k, str) else str(new_index)] = v
            if not kept:  # keep one entry of each kind on the tiny model's last layers
                entries = list(value.items())
                kept = {(type(k)(new_layers - 1 - i) if not isinstance(k, str) else str(new_layers - 1 - i)): v
                        for i, (k, v) in enumerate(entries[:1])}  # fmt: skip
            out[key] = kept


def _layer_picks(d: dict[str, Any], old: int, new: int) -> list[int]:
    """Which of the ``old`` layers the tiny model keeps: one of each kind (per-layer lists), then the first ones."""
    lists = [v for v in d.values() if isinstance(v, list) and len(v) == old]
    seen, picks = set(), []
    for i in range(old):
        kind = tuple(str(v[i]) for v in lists)
        if kind not in seen:
            seen.add(kind)
            picks.append(i)
    picks = sorted(picks[:new] + [i for i in range(old) if i not in picks][: max(0, new - len(picks))])
    return picks[:new]


def tiny_config(model_type: str) -> Any:
    """A tiny config of family ``model_type``: the zoo's when it has the family, else the default shrunk."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    entry = _zoo_entry(model_type)
    if entry is not None:
        import transformers

        return getattr(transformers, entry.config_cls_name)(**copy.deepcopy(entry.kwargs))
    cls = CONFIG_MAPPING[model_type]
    with _quiet():
        default = cls()
    data = _shrink(default.to_dict())
    data.pop("transformers_version", None)
    data.pop("model_type", None)
    for drop in ("architectures", "auto_map", "_name_or_path"):
        data.pop(drop, None)
    for value in data.values():  # transformers 5.17's DbrxFFNConfig refuses the bookkeeping to_dict() adds
        if isinstance(value, dict) and value.get("_name_or_path", "") == "" and not value.get("output_attentions"):
            value.pop("_name_or_path", None)
            value.pop("output_attentions", None)
    _merge(data, copy.deepcopy(TINY_OVERRIDES.get(model_type, {})))
    with _quiet():
        return cls(**data)


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = value


def _zoo_entry(model_type: str):
    import transformers

    from .. import zoo

    for name in zoo.names():
        entry = zoo.get(name)
        cls = getattr(transformers, entry.config_cls_name, None)
        if cls is not None and cls.model_type == model_type:
            return entry
    return None


#: config kwargs the generic shrink cannot guess (nested sizes that must agree, and so on)
_GLM4V_ROPE = {"rope_parameters": {"mrope_section": [2, 1, 1]}}  # head 16, partial rotary 0.5: sections sum to 4
_QWEN4_INDEXER = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 8,
    "indexer_compress_ratio": 2,
}
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # sliding-window layers double the kv heads: more query heads than that
    "mimo_v2_flash": {"num_attention_heads": 4, "num_key_value_heads": 1},
    # half the head is rotary (partial_rotary_factor 0.5): the rotary part must be the MLA rope dim
    "mistral4": {"head_dim": 16},
    "glm4v_moe_text": _GLM4V_ROPE,
    "glm4v_moe": {"text_config": _GLM4V_ROPE},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},  # None in the default config
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"]}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # lost when the nested config is rebuilt
    # the model builds a sliding-window mask whatever its layer types are: None in the default config
    "step3p5": {"sliding_window": 8},
    "step3p7": {"text_config": {"sliding_window": 8}},
    # Kolibri 1.1's layer lists are laid out for 50 layers: a sliding layer, then an indexer, both MoE
    "kolibri1_1": {
        "layer_types": ["sliding_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1],
        "mlp_only_layers": [],
        "sliding_window": 8,
        "head_dim": 16,
        "index_num_heads": 1,
    },
    "qwen4_exp_text": _QWEN4_INDEXER,  # the indexer sizes are None in the default config
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    # the default picks the last of 12 (24) layers: the tiny backbone has two
    "vitpose_backbone": {"out_indices": [2], "out_features": ["stage2"], "part_features": 8},
    "vitpose": {"backbone_config": {"out_indices": [2], "out_features": ["stage2"], "part_features": 8}},
}
