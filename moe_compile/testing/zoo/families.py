"""The zoo's family table: one :class:`ZooEntry` per tiny Hugging Face MoE family (config class, shrinking
kwargs, router kind, expert layout, shared experts, which layers are MoE), and the look-ups over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

MoeLayers = Callable[[PretrainedConfig], list[int]]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One tiny model family.

    - ``kwargs``: the tiny config, passed to ``transformers.<config_cls_name>``.
    - ``router``: how routing weights are computed, e.g. ``"softmax-topk-renorm"`` (softmax over all experts,
      top-k, renormalise), ``"topk-softmax"`` (top-k logits, then softmax over those k),
      ``"sigmoid-bias-group-topk"`` (DeepSeek-V3: sigmoid scores plus a correction bias pick a group-limited
      top-k), ``"softmax-group-topk"`` (DeepSeek-V2), ``"sparsemixer"`` (Phimoe).
    - ``layout``: expert weights; ``"std"`` is ``gate_up_proj[E, 2I, H]`` (gate rows first) and
      ``down_proj[E, H, I]``; ``"transposed"`` stores ``[E, H, 2I]`` / ``[E, I, H]``; GPT-OSS additionally
      interleaves gate/up columns and has per-expert biases.
    - ``moe_layers``: maps the (text) config to the indices of the MoE decoder layers; for encoder-decoder
      models the decoder's blocks are numbered after the encoder's.
    - ``interface``: the experts class is decorated with ``@use_experts_implementation`` (so its forward is
      ``grouped_mm`` / ``batched_mm`` / ``eager`` per ``config._experts_implementation``).
    - ``model_cls_name``: the ``transformers`` class to build (an ``Auto*`` class or a concrete model class).
    - ``num_layers_keys``: the config keys (dotted for nested configs) that ``build(num_layers=...)`` sets.
    - ``min_transformers``: the oldest transformers release known to have the family in this form.
    """

    name: str
    config_cls_name: str
    kwargs: dict[str, Any]
    router: str
    layout: str
    shared_experts: bool
    moe_layers: MoeLayers
    interface: bool = True
    model_cls_name: str = "AutoModelForCausalLM"
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    min_transformers: str | None = None

    def supported(self) -> bool:
        """Whether the installed transformers has this family in the described form."""
        return self.min_transformers is None or Version(transformers.__version__) >= Version(self.min_transformers)


def _every_layer(config: PretrainedConfig) -> list[int]:
    return list(range(config.num_hidden_layers))


def _after_first_k_dense(config: PretrainedConfig) -> list[int]:
    return list(range(config.first_k_dense_replace, config.num_hidden_layers))


def _after_num_dense_layers(config: PretrainedConfig) -> list[int]:
    return list(range(config.num_dense_layers, config.num_hidden_layers))


def _sparse_mlp_layer_types(config: PretrainedConfig) -> list[int]:
    return [i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]


def _qwen_sparse_step(config: PretrainedConfig) -> list[int]:
    return [
        i
        for i in range(config.num_hidden_layers)
        if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
    ]


def _ernie_interval(config: PretrainedConfig) -> list[int]:
    return [
        i
        for i in range(config.num_hidden_layers)
        if (i + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= i <= config.moe_layer_end_index
    ]


def _jamba_layers(config: PretrainedConfig) -> list[int]:
    return [i for i, n in enumerate(config.layers_num_experts) if n > 1]


def _llama4_layers(config: PretrainedConfig) -> list[int]:
    return list(config.moe_layers)


def _longcat_layers(config: PretrainedConfig) -> list[int]:
    """Every decoder layer (each holds two attention/MLP sub-blocks, so ``num_hidden_layers`` is doubled)."""
    return list(range(config.num_layers))


def _switch_layers(config: PretrainedConfig) -> list[int]:
    """Encoder blocks first, then decoder blocks (numbered after the encoder's)."""

    def sparse(num_layers: int, step: int) -> list[int]:
        return [i for i in range(num_layers) if step == 1 or i % step == 1]

    encoder = sparse(config.num_layers, config.encoder_sparse_step)
    decoder = sparse(config.num_decoder_layers, config.decoder_sparse_step)
    return encoder + [config.num_layers + i for i in decoder]


_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
    # Keep special tokens inside the tiny vocabulary (some defaults are > 100k).
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Multi-head latent attention (DeepSeek-V2/V3 style).
_MLA: dict[str, Any] = {
    "num_key_value_heads": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "head_dim": 8,  # the rotary part
    "v_head_dim": 16,
}
_SIGMOID_GROUP = "sigmoid-bias-group-topk"

_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        "mixtral",
        "MixtralConfig",
        {**_BASE, "num_local_experts": 8},
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "qwen2_moe",
        "Qwen2MoeConfig",
        {
            **_BASE,
            "num_experts": 8,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "norm_topk_prob": False,
        },
        router="softmax-topk",
        layout="std",
        shared_experts=True,
        moe_layers=_qwen_sparse_step,
    ),
    ZooEntry(
        "qwen3_moe",
        "Qwen3MoeConfig",
        {**_BASE, "num_experts": 8, "moe_intermediate_size": 16, "norm_topk_prob": True},
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_qwen_sparse_step,
    ),
    ZooEntry(
        "deepseek_v3",
        "DeepseekV3Config",
        {
            **_BASE,
            **_MLA,
            "num_hidden_layers": 3,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_after_first_k_dense,
    ),
    ZooEntry(
        "deepseek_v2",
        "DeepseekV2Config",
        {
            **_BASE,
            **_MLA,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "topk_method": "group_limited_greedy",
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 1.5,
        },
        router="softmax-group-topk",
        layout="std",
        shared_experts=True,
        moe_layers=_after_first_k_dense,
    ),
    ZooEntry(
        "olmoe",
        "OlmoeConfig",
        {**_BASE, "num_experts": 8, "norm_topk_prob": False},
        router="softmax-topk",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "phimoe",
        "PhimoeConfig",
        {**_BASE, "num_local_experts": 8},
        router="sparsemixer",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "gpt_oss",
        "GptOssConfig",
        {**_BASE, "num_local_experts": 8, "sliding_window": 4},
        router="topk-softmax",
        layout="transposed-bias-interleaved",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "granitemoe",
        "GraniteMoeConfig",
        {**_BASE, "num_local_experts": 8},
        router="topk-softmax",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "granitemoeshared",
        "GraniteMoeSharedConfig",
        {**_BASE, "num_local_experts": 8, "shared_intermediate_size": 32},
        router="topk-softmax",
        layout="std",
        shared_experts=True,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "jamba",
        "JambaConfig",
        {
            **_BASE,
            "num_experts": 8,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "attn_layer_period": 2,
            "attn_layer_offset": 0,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
        },
        router="softmax-topk",
        layout="std",
        shared_experts=False,
        moe_layers=_jamba_layers,
    ),
    ZooEntry(
        "qwen3_next",
        "Qwen3NextConfig",
        {
            **_BASE,
            "num_experts": 8,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "norm_topk_prob": True,
            "full_attention_interval": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
        },
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_qwen_sparse_step,
    ),
    ZooEntry(
        "glm4_moe",
        "Glm4MoeConfig",
        {
            **_BASE,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 1.5,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_after_first_k_dense,
    ),
    ZooEntry(
        "glm4_moe_lite",
        "Glm4MoeLiteConfig",
        {
            **_BASE,
            **_MLA,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 1.5,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_sparse_mlp_layer_types,
    ),
    ZooEntry(
        "ernie4_5_moe",
        "Ernie4_5_MoeConfig",
        {
            **_BASE,
            "moe_num_experts": 8,
            "moe_k": 2,
            "moe_intermediate_size": 16,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 0,
        },
        router="softmax-bias-topk-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_ernie_interval,
    ),
    ZooEntry(
        "hunyuan_v1_moe",
        "HunYuanMoEV1Config",
        {**_BASE, "num_experts": 8, "moe_topk": 2},
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "dots1",
        "Dots1Config",
        {
            **_BASE,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.0,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_after_first_k_dense,
    ),
    ZooEntry(
        "minimax",
        "MiniMaxConfig",
        {**_BASE, "num_local_experts": 8, "block_size": 4},
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "minimax_m2",
        "MiniMaxM2Config",
        {**_BASE, "num_local_experts": 8},
        router="sigmoid-bias-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "flex_olmo",
        "FlexOlmoConfig",
        {**_BASE, "num_experts": 8, "norm_topk_prob": False},
        router="softmax-topk",
        layout="std",
        shared_experts=False,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "exaone_moe",
        "ExaoneMoeConfig",
        {
            **_BASE,
            "num_experts": 8,
            "num_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_sparse_mlp_layer_types,
    ),
    ZooEntry(
        "deepseek_v32",
        "DeepseekV32Config",
        {
            **_BASE,
            **_MLA,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "index_topk": 4,
            "index_head_dim": 16,
            "index_n_heads": 2,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_sparse_mlp_layer_types,
    ),
    ZooEntry(
        "afmoe",
        "AfmoeConfig",
        {
            **_BASE,
            "num_experts": 8,
            "num_shared_experts": 1,
            "moe_intermediate_size": 16,
            "num_dense_layers": 1,
            "global_attn_every_n_layers": 2,
            "sliding_window": 4,
            "route_scale": 2.0,
        },
        router="sigmoid-bias-topk-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_after_num_dense_layers,
    ),
    ZooEntry(
        "cohere2_moe",
        "Cohere2MoeConfig",
        {**_BASE, "num_experts": 8, "num_shared_experts": 1, "expert_selection_fn": "sigmoid", "norm_topk_prob": True},
        router="topk-sigmoid-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_sparse_mlp_layer_types,
    ),
    ZooEntry(
        "lfm2_moe",
        "Lfm2MoeConfig",
        {
            **_BASE,
            "num_experts": 8,
            "moe_intermediate_size": 16,
            "num_dense_layers": 1,
            "layer_types": ["conv", "full_attention"],
        },
        router="sigmoid-bias-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_after_num_dense_layers,
    ),
    ZooEntry(
        "solar_open",
        "SolarOpenConfig",
        {
            **_BASE,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.0,
            "norm_topk_prob": True,
        },
        router=_SIGMOID_GROUP,
        layout="std",
        shared_experts=True,
        moe_layers=_every_layer,
    ),
    ZooEntry(
        "laguna",
        "LagunaConfig",
        {
            **_BASE,
            "num_experts": 8,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
            "moe_routed_scaling_factor": 2.0,
            "moe_router_logit_softcapping": 30.0,
        },
        router="softcap-sigmoid-bias-topk-renorm",
        layout="std",
        shared_experts=True,
        moe_layers=_sparse_mlp_layer_types,
    ),
    ZooEntry(
        "aria",
        "AriaTextConfig",
        {**_BASE, "moe_num_experts": 8, "moe_topk": 2, "moe_num_shared_experts": 1},
        router="topk-softmax",
        layout="transposed",
        shared_experts=True,
        moe_layers=_every_layer,
        min_transformers="5.23",
    ),
    ZooEntry(
        "qwen3_vl_moe",
        "Qwen3VLMoeConfig",
        {
            "text_config": {
                **_BASE,
                "num_experts": 8,
                "moe_intermediate_size": 16,
                "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": 32,
                "deepstack_visual_indexes": [0],
            },
        },
        router="softmax-topk-renorm",
        layout="std",
        shared_experts=False,
        moe_layers=_qwen_sparse_step,
        model_cls_name="Qwen3VLMoeForConditionalGeneration",
        num_layers_keys=("text_config.num_hidden_layers",),
    ),
    ZooEntry(
        "llama4",
        "Llama4TextConfig",
        {
            **_BASE,
            "num_local_experts": 8,
            "intermediate_size": 16,
            "intermediate_size_mlp": 32,
            "interleave_moe_layer_step": 2,
        },
        router="topk-sigmoid-dense-scores",
        layout="transposed-bmm-all-experts",
        shared_experts=True,
        moe_layers=_llama4_layers,
        interface=False,
    ),
    ZooEntry(
        "longcat_flash",
        "LongcatFlashConfig",
        {
            **{key: value for key, value in _BASE.items() if key != "num_hidden_layers"},
            **_MLA,
            "num_layers": 2,
            "ffn_hidden_size": 32,
            "n_routed_experts": 8,
            "zero_expert_num": 4,
            "moe_topk": 2,
            "expert_ffn_hidden_size": 16,
            "routed_scaling_factor": 2.0,
        },
        router="softmax-bias-topk",
        layout="std+identity-zero-experts",
        shared_experts=False,
        moe_layers=_longcat_layers,
        interface=False,
        num_layers_keys=("num_layers",),
    ),
    ZooEntry(
        "switch_transformers",
        "SwitchTransformersConfig",
        {
            "vocab_size": 128,
            "d_model": 32,
            "d_kv": 16,
            "d_ff": 32,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 2,
            "num_experts": 8,
            "num_sparse_encoder_layers": 1,
            "num_sparse_decoder_layers": 1,
            "expert_capacity": 64,
        },
        router="argmax-top1-capacity",
        layout="module-per-expert",
        shared_experts=False,
        moe_layers=_switch_layers,
        interface=False,
        model_cls_name="SwitchTransformersForConditionalGeneration",
        num_layers_keys=("num_layers", "num_decoder_layers"),
    ),
)
_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}

_DENSE = ZooEntry(
    "llama",
    "LlamaConfig",
    {key: value for key, value in _BASE.items() if key != "num_experts_per_tok"},
    router="none",
    layout="none",
    shared_experts=False,
    moe_layers=lambda config: [],
    interface=False,
)


def names() -> list[str]:
    """Names of the MoE entries the installed transformers can build."""
    return [entry.name for entry in _ENTRIES if entry.supported()]


def get(name: str) -> ZooEntry:
    """The entry called ``name`` (whether or not the installed transformers supports it)."""
    return _BY_NAME[name]


def moe_layer_indices(name: str, config: PretrainedConfig) -> list[int]:
    """Indices of the MoE decoder layers of a model of family ``name`` built from ``config``."""
    return get(name).moe_layers(config.get_text_config())
