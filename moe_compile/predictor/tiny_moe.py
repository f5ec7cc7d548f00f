"""The small MoE language model shipped in ``moe_compile/assets/tiny_moe`` (trained by ``train_lm.py``).

A standard ``transformers`` Qwen3-MoE causal LM over the byte vocabulary of :mod:`.corpus`: 10 decoder
layers, the first a dense MLP (``mlp_only_layers=[0]``), the other 9 MoE (8 experts, top-2, softmax then
renormalised), trained on the Python standard library, so its routers carry real structure for
predictors to learn (random-init routers do not).
It loads with ``AutoModelForCausalLM.from_pretrained(TINY_MOE_DIR)`` and its byte tokenizer with
``AutoTokenizer.from_pretrained(TINY_MOE_DIR)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from . import corpus

TINY_MOE_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_moe"
SEQ_LEN = 128  # training context; the positions the model has seen


def tiny_moe_config(num_layers: int = 10, dense_first: int = 1) -> transformers.Qwen3MoeConfig:
    """The architecture of the shipped model (defaults: 4.17M parameters, 1.52M active per token).

    ``num_layers`` decoder layers, the first ``dense_first`` of them a dense MLP (``mlp_only_layers``, as
    DeepSeek-V3's ``first_k_dense_replace``), the rest MoE.
    """
    if not 0 <= dense_first < num_layers:
        raise ValueError(f"dense_first must be in [0, num_layers), got {dense_first} with num_layers={num_layers}")
    return transformers.Qwen3MoeConfig(
        vocab_size=corpus.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,  # dense MLP size (the ``dense_first`` layers): as wide as the active experts
        moe_intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(dense_first)),
        max_position_embeddings=SEQ_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=True,
        pad_token_id=corpus.PAD_ID,
        eos_token_id=corpus.EOS_ID,
        bos_token_id=None,
    )


def load_model(path: str | Path = TINY_MOE_DIR, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """The causal LM saved at ``path`` (default: the shipped tiny model) in eval mode, in ``dtype``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
