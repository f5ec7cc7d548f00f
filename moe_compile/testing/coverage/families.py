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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    families = {}
    for model_type in CONFIG_MAPPING_NAMES:
        entry = family_entry(model_type)
        if entry is not None:
            families[model_type] = entry
    return families


def family_entry(model_type: str) -> str | None:
    """What :func:`moe_families` holds for one model type (its config class name, or ``!error: ...``), or
    None when the installed transformers has no such model type or it is not a MoE family.

    One family costs one default config; the whole registry costs hundreds (tens of seconds).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    cls_name = CONFIG_MAPPING_NAMES.get(model_type)
    if cls_name is None:
        return None
    with _quiet():
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception as err:  # noqa: BLE001
            return f"!error: default config: {_short(err)}" if "moe" in model_type.lower() else None
    return cls_name if expert_count_keys(config) else None
