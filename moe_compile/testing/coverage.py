"""Which mixture-of-experts families of the installed transformers the backend covers.

Enumerates the families from transformers' own registry (``CONFIG_MAPPING_NAMES``), not
from a fixed list: a model type is a MoE family when its default config (or a config nested
in it, e.g. ``text_config``) carries an expert count, i.e. an attribute named like
``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` / ``moe_num_experts``
(:func:`expert_count_keys`). For each family a tiny config is built (the zoo's, where
:mod:`moe_compile.testing.zoo` has the family; otherwise the default config shrunk
generically by :func:`tiny_config`), the model class the family registers is built with
random weights in fp32, and the backend is run against eager:

- ``moe_compile.explain`` on the inputs: the blocks found and the ones skipped (with reasons);
- ``torch.compile(backend="moe_prefill")`` (eager execution of the rewritten graph, no
  Inductor) against the eager model at two sequence lengths.

Each family gets one :class:`Row`; its ``status`` is one of

- ``exact``: every expert module of the tiny model was found as a block, rewritten, and the
  compiled outputs equal eager's (relative error below :data:`TOLERANCE`);
- ``skipped``: the backend saw the block(s) and left them (or some) alone, saying why;
- ``missed``: fewer blocks than the model has expert modules and no reason given;
- ``inexact``: compiled differs from eager (a wrong result: never acceptable);
- ``not-built``: the tiny model could not be built or run; the reason says why.

:data:`KNOWN_GAPS` lists the families that are not ``exact`` today, with their status and
the precise cause (documented in ``docs/coverage.md``); ``tests/test_coverage.py`` fails on
any other family that is not exact, on a known gap whose status or reason changed (fixed:
remove it from the list), and names a family that a new transformers release added.
``moe-compile coverage`` prints the table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import multiprocessing
import re
import time
import traceback
import warnings
from typing import Any

#: compiled vs eager, fp32 relative error (Frobenius) under which a family counts as exact
TOLERANCE = 1e-5
#: sequence lengths of the two compiled runs (the second compiles a dynamic-shape graph)
SEQ_LENS = (5, 11)
#: experts in every tiny config (enough that an expert weight [E, ., .] is not mistaken for a small dense one)
TINY_EXPERTS = 8
STATUSES = ("exact", "skipped", "missed", "inexact", "not-built")


# ----------------------------------------------------------------------------- families


_COUNT = re.compile(r"experts?$|^num_experts|^n_experts")
#: qualifiers of an attribute that names experts but is not their count
_NOT_COUNT = re.compile(
    r"per_tok|per_token|shared|group|capacity|period|offset|interval|size|dim|zero|top|_k$|implement"
)
_TOP_K = re.compile(
    r"^(num_experts_per_tok(en)?|moe_topk|moe_top_k|moe_k|top_k_experts|num_selected_experts|top_k|topk)$"
)
#: boolean switches that turn the MoE block on (off in some default configs: gemma4's, doge's)
_MOE_SWITCH = re.compile(r"^(enable_moe_block|is_moe|use_moe|moe_enabled)$")


def expert_count_keys(config: Any) -> list[str]:
    """Dotted names of the expert-count attributes of ``config`` and its nested configs."""
    from transformers import PretrainedConfig

    keys = []
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            keys += [f"{name}.{k}" for k in expert_count_keys(value)]
        elif (
            "expert" in name
            and _COUNT.search(name)
            and not _NOT_COUNT.search(name)
            and (value is None or (isinstance(value, int) and not isinstance(value, bool)))
        ):
            keys.append(name)
    return keys


def moe_families() -> dict[str, str]:
    """``model_type -> config class name`` of every MoE family the installed transformers registers.

    A config class whose default instance cannot be created is reported as a family too
    (``!error: ...`` instead of the class name) when its name says it is a MoE one, so that
    it shows as not-built with the reason rather than silently disappearing.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    families = {}
    for model_type, cls_name in CONFIG_MAPPING_NAMES.items():
        with _quiet():
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception as err:  # noqa: BLE001
                if "moe" in model_type.lower():
                    families[model_type] = f"!error: default config: {_short(err)}"
                continue
        if expert_count_keys(config):
            families[model_type] = cls_name
    return families


# ----------------------------------------------------------------------------- tiny configs

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

    from . import zoo

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
    "qwen4_exp_text": _QWEN4_INDEXER,  # the indexer sizes are None in the default config
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    # the default picks the last of 12 (24) layers: the tiny backbone has two
    "vitpose_backbone": {"out_indices": [2], "out_features": ["stage2"], "part_features": 8},
    "vitpose": {"backbone_config": {"out_indices": [2], "out_features": ["stage2"], "part_features": 8}},
}


# ----------------------------------------------------------------------------- one family


@dataclasses.dataclass
class Row:
    family: str
    status: str
    model: str = "-"  # the class built
    expert_modules: int = 0  # modules of the tiny model holding E experts (a block each)
    blocks: int = 0  # blocks found and rewritten
    rel_err: float | None = None  # max over the sequence lengths, compiled vs eager
    reason: str = ""
    seconds: float = 0.0
    prepared: str = ""  # what ``moe_compile.prepare`` replaced, e.g. "2 stacked" (empty: nothing)

    def cells(self) -> list[str]:
        err = "-" if self.rel_err is None else f"{self.rel_err:.1e}"
        blocks = f"{self.blocks}/{self.expert_modules}"
        return [self.family, self.status, blocks, err, self.model, self.prepared or "-", self.reason or "-"]


HEADER = ["family", "status", "blocks/expert modules", "rel err", "model", "prepare", "reason"]


def _model_class(model_type: str, config: Any):
    """The model class to build: the zoo's, else causal LM, seq2seq LM, base model, backbone."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    entry = _zoo_entry(model_type)
    if entry is not None:
        return getattr(transformers, entry.model_cls_name)
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                    "MODEL_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES"):  # fmt: skip
        name = getattr(auto, mapping, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        cls = getattr(transformers, name, None) if name else None
        # a composite config (llama4, qwen3_5_moe) registers its text model as the causal LM: that class takes
        # the text sub-config, not this one (a class of another family, as sarvam_moe's Glm4Moe, is fine)
        if cls is not None and getattr(cls, "config_class", None) not in _sub_config_types(config):
            return cls
    base = type(config).__name__.removesuffix("Config")
    for suffix in ("ForCausalLM", "Model"):
        if hasattr(transformers, base + suffix):
            return getattr(transformers, base + suffix)
    raise LookupError(f"no model class registered for {model_type!r} in the auto mappings")


def _sub_config_types(config: Any) -> set[type]:
    """The classes of the configs nested in ``config`` (``text_config``, ``vision_config``, ...)."""
    from transformers import PretrainedConfig

    return {type(v) for v in vars(config).values() if isinstance(v, PretrainedConfig)}


def _build_model(model_type: str):
    import torch

    from . import zoo

    entry = _zoo_entry(model_type)
    if entry is not None:
        return zoo.build(entry.name)
    config = tiny_config(model_type)
    cls = _model_class(model_type, config)
    torch.manual_seed(0)
    with zoo._uninitialized_memory_is_nan():
        if cls.__name__.startswith("Auto"):
            model = cls.from_config(config, dtype=torch.float32)
        else:
            model = cls._from_config(config, dtype=torch.float32)
    zoo._redraw_degenerate(model, 0)
    return model.eval()


def _expert_modules(model: Any) -> int:
    """Modules of ``model`` that hold its experts: a 3D parameter ``[E, ., .]`` or E child modules."""
    import torch

    counts, containers = set(), []
    E = TINY_EXPERTS
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == E:  # experts as rows (doge)
            counts.add(name.rpartition(".")[0] or name)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            children = list(module.children())
            mlps = [c for c in children if any(isinstance(m, torch.nn.Linear) for m in c.modules())]
            if len(mlps) == E:
                counts.add(name.rpartition(".")[0] or name)
                containers.append(name + ".")
            continue
        if any(name.startswith(c) for c in containers):
            continue  # one expert of a container already counted
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] == E and "embed" not in pname:
                counts.add(name)
            elif (any(part.startswith("expert") for part in name.split(".")) and "shared" not in name
                  and p.dim() == 2 and p.shape[0] % E == 0 and p.shape[0] > E):  # fmt: skip
                counts.add(name)  # experts flattened into [E * I, H] (dbrx)
    return len(counts)


def _inputs(model: Any, seq: int, seed: int) -> dict[str, Any]:
    import torch

    config = model.config
    text = config.get_text_config()
    gen = torch.Generator().manual_seed(seed)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.randint(3, getattr(text, "vocab_size", 128) or 128, (2, seq), generator=gen)
        kwargs = {"input_ids": ids, "use_cache": False}  # prefill: no cache (some hybrid caches cannot start empty)
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids[:, : max(1, seq // 2)]
        return kwargs
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        kwargs = {"pixel_values": torch.randn(2, channels, *size, generator=gen)}
        if "dataset_index" in inspect.signature(model.forward).parameters:  # vitpose: the expert is picked per image
            kwargs["dataset_index"] = torch.randint(0, TINY_EXPERTS, (2,), generator=gen)
        return kwargs
    raise ValueError(f"main input {name!r} (not text or images): no generic inputs")


def _output(out: Any):
    import torch

    for key in ("logits", "last_hidden_state", "feature_maps", "heatmaps"):
        value = getattr(out, key, None)
        if isinstance(value, (list, tuple)):
            value = value[-1]
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (list, tuple)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no tensor output in {type(out).__name__}")


def check_family(model_type: str) -> Row:
    """Build, prepare, explain, compile and compare one family; never raises (a failure is a not-built row).

    The model is run the way the README tells a user to: ``moe_compile.prepare(model)`` (which
    rewrites the expert loops it can prove equal, in place) and then ``torch.compile``. The
    reference is the eager model *as built*, before ``prepare``: the row checks both steps.
    """
    import torch

    import moe_compile  # noqa: F401  (registers the backend)

    start = time.perf_counter()
    row = Row(model_type, "not-built")
    try:
        with _quiet():
            model = _build_model(model_type)
        row.model = type(model).__name__
        row.expert_modules = _expert_modules(model)
        if row.expert_modules == 0:
            row.reason = f"the tiny model has no module with {TINY_EXPERTS} experts (MoE layers off in the tiny config)"
            return row
        kwargs = _inputs(model, 6, 0)
        if not _deterministic(model, kwargs):
            row.reason = "eager forward gives different outputs under one seed: compiled and eager cannot be compared"
            return row
        expected = {}
        with torch.no_grad(), _quiet():
            for seq in SEQ_LENS:
                torch.manual_seed(seq)  # a forward that samples (diffusion models) draws the same numbers
                expected[seq] = _output(model(**_inputs(model, seq, seq))).clone()
    except Exception as err:  # noqa: BLE001
        row.reason = f"build: {_short(err)}"
        row.seconds = time.perf_counter() - start
        return row
    try:
        from ..backend import collect_reports
        from ..prepare import prepare, prepare_report

        with _quiet():
            prepare(model)
        done = prepare_report(model)
        kinds = [what.partition(":")[0] for _, what in done if not what.startswith("left alone")]
        row.prepared = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        refused = [f"prepare left {name} alone: {what.removeprefix('left alone: ')}"
                   for name, what in done if what.startswith("left alone")]  # fmt: skip
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
        errs = []
        with torch.no_grad(), _quiet():
            for seq in SEQ_LENS:
                kw = _inputs(model, seq, seq)
                for value in kw.values():  # one dynamic-shape compile serves both lengths
                    if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
                        torch._dynamo.maybe_mark_dynamic(value, 1)
                # the first length's compile is what ``moe_compile.explain`` reports (explain = compile + collect)
                with collect_reports() as collected:
                    torch.manual_seed(seq)
                    got = _output(compiled(**kw))
                if seq == SEQ_LENS[0]:
                    report = collected
                want = expected[seq].double()
                errs.append(((got.double() - want).norm() / want.norm()).item())
        row.blocks = len(report.blocks)
        reasons = list(dict.fromkeys(s.reason for s in report.skipped))
        row.rel_err = max(errs)
        if not row.rel_err < TOLERANCE:
            row.status, row.reason = "inexact", f"compiled differs from eager (rel err {row.rel_err:.2g})"
        elif row.blocks >= row.expert_modules:  # every module holding the experts was rewritten
            row.status = "exact"
            row.reason = "; ".join(f"also left alone: {r}" for r in reasons)  # e.g. a dense group of shared experts
        elif reasons or refused:
            row.status, row.reason = "skipped", "; ".join(reasons + refused)
        else:
            row.status = "missed"
            row.reason = f"{row.expert_modules - row.blocks} expert module(s) not found, no reason given"
            if report.graphs > 1:
                row.reason += f" ({report.graphs} graphs: graph breaks)"
    except Exception as err:  # noqa: BLE001
        row.status, row.reason = "not-built", f"compile: {_short(err)}"
    finally:
        torch._dynamo.reset()
    row.seconds = time.perf_counter() - start
    return row


def _deterministic(model: Any, kwargs: dict[str, Any]) -> bool:
    """Two eager forwards under one seed agree (a diffusion model samples noise in its forward)."""
    import torch

    outs = []
    with torch.no_grad(), _quiet():
        for _ in range(2):
            torch.manual_seed(0)
            outs.append(_output(model(**kwargs)))
    return torch.equal(outs[0], outs[1])


def _short(err: BaseException, limit: int = 240) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())  # one line (validation errors span several)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet():
    """Silence transformers' config warnings and stray prints while building tiny models."""
    loggers = [logging.getLogger(n) for n in ("transformers", "torch._dynamo", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------- the sweep


def _worker_init() -> None:
    import os

    import torch

    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def _check_safely(model_type: str) -> Row:
    try:
        return check_family(model_type)
    except BaseException:  # noqa: BLE001  (a worker must always answer)
        return Row(model_type, "not-built", reason="crash: " + traceback.format_exc().splitlines()[-1][:150])


def run_coverage(
    families: list[str] | None = None, workers: int = 2, timeout: float = 300.0, progress=None
) -> list[Row]:
    """One :class:`Row` per MoE family (all of the installed transformers' by default), in name order.

    Families run in ``workers`` fresh processes (one torch thread each); a family that takes
    longer than ``timeout`` seconds is reported as not-built.
    """
    registry = moe_families()
    names = sorted(families if families is not None else registry)
    rows: dict[str, Row] = {}
    pending = []
    for name in names:
        cls = registry.get(name)
        if cls is None:
            rows[name] = Row(name, "not-built", reason="not a MoE family of the installed transformers")
        elif cls.startswith("!error"):
            rows[name] = Row(name, "not-built", reason=cls[1:])
        else:
            pending.append(name)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=max(1, workers), initializer=_worker_init, maxtasksperchild=8) as pool:
        futures = {name: pool.apply_async(_check_safely, (name,)) for name in pending}
        deadline_per = timeout
        for name, future in futures.items():
            try:
                rows[name] = future.get(timeout=deadline_per)
            except multiprocessing.TimeoutError:
                rows[name] = Row(name, "not-built", reason=f"timed out after {timeout:.0f} s")
            if progress is not None:
                progress(rows[name])
        pool.terminate()
    return [rows[n] for n in names]


def summary(rows: list[Row]) -> str:
    """The sentence README.md carries: how many families, how many of each status."""
    import transformers

    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] and s != "exact"]
    return (
        f"Coverage on transformers {transformers.__version__}: {counts['exact']} of the {len(rows)} MoE families "
        f"detected and exact" + (f" ({', '.join(parts)}; see docs/coverage.md)" if parts else "") + "."
    )


def format_table(rows: list[Row], markdown: bool = False) -> str:
    cells = [r.cells() for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in cells]
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])
    from ..report import _table

    return _table(HEADER, cells)


# ----------------------------------------------------------------------------- known gaps


@dataclasses.dataclass(frozen=True)
class Gap:
    status: str  # the row's status today
    reason: str  # a substring of the row's reason (what the backend or the build says)
    cause: str  # why, from the family's modeling code (docs/coverage.md)


#: families that are not detected-and-exact today, with the reason the row must give
KNOWN_GAPS: dict[str, Gap] = {
    # --- skipped: the expert-loop families `prepare` rewrites; what it must leave alone, with the reason ---
    "jetmoe": Gap(
        "skipped",
        "mixture of attention (`map`/`reduce`)",
        "the MLP MoE (`JetMoeMoE`: top-2 of the logits, a `split(expert_size)` loop, an output bias) is routed "
        "by `prepare` and found; the attention is a MoE too (`JetMoeMoA`: each expert's query projection in "
        "`map`, then attention, then its output projection in `reduce`), which the canonical op (an MLP per "
        "expert) cannot express; its `expert_size.tolist()` graph breaks make Dynamo run a whole frame eagerly "
        "(at fp32 layer 1, MLP included: 1 of the 2 MLP blocks found)",
    ),
    "vitpose_backbone": Gap(
        "skipped",
        "single nn.Linear layers, not MLPs",
        "no router: `VitPoseNaiveMoe` picks one expert per image from the `dataset_index` input (a mask "
        "`indices == i` over a dense loop of E single `nn.Linear`), and the expert output is concatenated (`cat`) "
        "after a shared `fc2`'s, not summed: outside the canonical op; `prepare` names it",
    ),
    "doge": Gap(
        "skipped",
        "experts stored as table rows",
        "retrieval experts: rows of two `nn.Embedding(E, H)` tables picked by product-key top-k, i.e. rank-1 "
        "experts `w * up_e * act(down_e . x)` (I = 1); the canonical op could compute them (non-gated, I = 1), "
        "but the detector starts from expert weights `[E, ., .]` reaching a matmul, and `prepare` has no "
        "rewrite for this module: the backend says so and leaves it",
    ),
    # --- skipped with a reason ---
    # --- not built: the generic tiny config or the family's inputs do not fit ---
    "diffusion_gemma_text": Gap(
        "not-built",
        "no model class registered",
        "a text sub-config with no model class of its own (covered by `diffusion_gemma`)",
    ),
    "dots3_note": Gap(
        "not-built",
        "validate_architecture",
        "the tiny config fails the family's validation (per-layer `indexed_attention` config must be "
        "homogeneous); needs a hand-written tiny config",
    ),
    "dots3_note_text": Gap("not-built", "validate_architecture", "as `dots3_note`"),
    "dots3_note_vision_encoder": Gap(
        "not-built",
        f"no module with {TINY_EXPERTS} experts",
        "vision MoE layers are named by index in `per_layer_config` (layers 25-39): "
        "the two-layer tiny config keeps none; and the encoder needs `grid_thw` inputs",
    ),
    "ernie4_5_vl_moe": Gap(
        "not-built",
        "expanded size of the tensor",
        "text and vision experts share one expert list (`moe_num_experts` per modality); the "
        "generic shrink breaks their split; needs a hand-written tiny config",
    ),
    "ernie4_5_vl_moe_text": Gap("not-built", "expanded size of the tensor", "as `ernie4_5_vl_moe`"),
    "llama4": Gap(
        "not-built",
        "image_outputs",
        "transformers' `Llama4ForConditionalGeneration.forward` reads `outputs.image_outputs` from its text "
        "model's output, which has none: a text-only forward fails in eager too (the text part `llama4_text` "
        "is exact)",
    ),
    "nemo_speechlm": Gap("not-built", "audio_hidden_size", "generic tiny config: nested audio sizes must agree"),
    "nemotron_h_omni": Gap("not-built", "no model class registered", "no model class in the auto mappings"),
    "qwen3_omni_moe": Gap(
        "not-built",
        "no model class registered",
        "no model class in the auto mappings (its MoE thinker, `qwen3_omni_moe_thinker`, is covered)",
    ),
    "qwen3_omni_moe_text": Gap("not-built", "no model class registered", "as `qwen3_omni_moe`"),
    "qwen3_omni_moe_talker_text": Gap("not-built", "no model class registered", "as `qwen3_omni_moe`"),
    "vitpose": Gap(
        "not-built",
        "no model class registered",
        "no model class in the auto mappings (its MoE backbone is `vitpose_backbone`)",
    ),
}


def check_rows(rows: list[Row]) -> list[str]:
    """What is wrong with a coverage table: a family neither exact nor a known gap, or a known gap that changed."""
    problems = []
    for row in rows:
        gap = KNOWN_GAPS.get(row.family)
        if row.status == "inexact":
            problems.append(f"{row.family}: INEXACT: {row.reason}")
        elif gap is None and row.status != "exact":
            problems.append(f"{row.family}: {row.status} and not a known gap: {row.reason or '(no reason given)'}")
        elif gap is not None and row.status == "exact":
            problems.append(f"{row.family}: now detected and exact: remove it from KNOWN_GAPS and docs/coverage.md")
        elif gap is not None and (row.status != gap.status or gap.reason not in row.reason):
            problems.append(f"{row.family}: expected {gap.status} ({gap.reason!r}), got {row.status}: {row.reason}")
        elif row.status == "not-built" and not row.reason:
            problems.append(f"{row.family}: not built, no reason given")
    return problems


def write_json(rows: list[Row], path: str) -> None:
    import json

    import transformers

    data = {"transformers": transformers.__version__, "rows": [dataclasses.asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def read_json(path: str) -> list[Row]:
    import json

    with open(path) as f:
        return [Row(**r) for r in json.load(f)["rows"]]


def _section(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name} -->)(.*?)(<!-- /{name} -->)", re.DOTALL)


def gaps_table() -> str:
    """The known gaps as a markdown table (docs/coverage.md carries it)."""
    lines = ["| family | status today | cause |", "|---|---|---|"]
    for family, gap in sorted(KNOWN_GAPS.items()):
        lines.append(f"| `{family}` | {'**missed**' if gap.status == 'missed' else gap.status} | {gap.cause} |")
    return "\n".join(lines)


def update_docs(rows: list[Row], readme: str = "README.md", doc: str = "docs/coverage.md") -> list[str]:
    """Write the summary sentence into ``readme``, the gaps and the table into ``doc`` (between marks)."""
    changed = []
    table = summary(rows) + "\n\n" + format_table(rows, markdown=True)
    for path, sections in ((readme, {"coverage": summary(rows)}), (doc, {"gaps": gaps_table(), "coverage": table})):
        with open(path) as f:
            old = f.read()
        new = old
        for name, text in sections.items():
            pattern = _section(name)
            if not pattern.search(new):
                raise ValueError(f"{path} has no <!-- {name} --> ... <!-- /{name} --> section to update")
            new = pattern.sub(lambda m, text=text: f"{m.group(1)}\n{text}\n{m.group(3)}", new)
        if new != old:
            with open(path, "w") as f:
                f.write(new)
            changed.append(path)
    return changed
