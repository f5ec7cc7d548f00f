"""The MoE families of the installed transformers: a model type is one when its default config (or a
config nested in it) carries an expert count (:func:`expert_count_keys`, :func:`moe_families`).
"""

from __future__ import annotations

import re
from typing import Any

from .common import quiet as _quiet
from .common import short as _short

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
