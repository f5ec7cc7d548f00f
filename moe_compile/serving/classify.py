"""Label probabilities of text prompts (``/classify``) and pooled embeddings (``/v1/embeddings``).

A causal LM has no classification head: a class is a *label* string (``moe-compile serve
--classify-labels``, a JSON list; default ``[" yes", " no"]``) and its score is
``log p(label | prompt)``, the sum of the label's token log-probabilities, each read where
the model predicts it (a label of one token needs one read; a longer label one pass of
``prompt + label[:-1]``, sharing the prompt through the prefix cache). The class
probabilities are the softmax of those log-probabilities over the labels, which is
``p(label_i) / sum_j p(label_j)``; with two labels it is the rerank API's relevance.

An embedding is the mean of the final hidden states over all the prompt's tokens
(``output="pooled"``, ``read="all"``), divided by its L2 norm (OpenAI's, vLLM's and TEI's
embeddings are unit vectors).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch

from .engine import PrefillEngine
from .requests import Request, Score

ENV_LABELS = "MOE_COMPILE_CLASSIFY_LABELS"
DEFAULT_LABELS = (" yes", " no")


def labels_from_env(value: str | None, default: Sequence[str]) -> list[str]:
    """``--classify-labels`` (a JSON list of strings), else ``$MOE_COMPILE_CLASSIFY_LABELS``, else ``default``."""
    text = value if value is not None else os.environ.get(ENV_LABELS)
    if text is None:
        return list(default)
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"classify labels {text!r} must be a JSON list of two or more non-empty strings, "
                         "e.g. '[\" yes\", \" no\"]'")  # fmt: skip
    if len(set(labels)) != len(labels):
        raise ValueError(f"classify labels {text!r} repeat a label")
    return labels


class LabelSet:
    """Label strings and their token ids; builds the requests of prompts and reads their label log-probabilities."""

    def __init__(self, engine: PrefillEngine, labels: Sequence[str]) -> None:
        if engine.tokenizer is None:
            raise ValueError("label scores of text need a tokenizer: the engine has none")
        self.engine = engine
        self.names = list(labels)
        self.ids: list[list[int]] = []
        for text in self.names:
            ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"the label {text!r} gives no tokens")
            bad = [t for t in ids if not 0 <= t < min(engine.vocab_in, engine.vocab_out)]
            if bad:
                raise ValueError(f"the label {text!r} has token ids {bad} outside the model's vocabulary")
            self.ids.append(ids)
        self.single = all(len(ids) == 1 for ids in self.ids)
        self.tail = max(len(ids) for ids in self.ids) - 1  # tokens appended after a prompt

    def requests(self, tokens: Sequence[int], tag: str) -> list[Request]:
        """The engine requests that read every label after ``tokens`` (ids ``tag:j``)."""
        n = len(tokens)
        if self.single:
            return [Request(id=f"{tag}:0", tokens=tuple(tokens), labels=tuple(ids[0] for ids in self.ids))]
        return [Request(id=f"{tag}:{j}", tokens=tuple(tokens) + tuple(ids[:-1]),
                        read=tuple(range(n - 1, n - 1 + len(ids))), labels=tuple(dict.fromkeys(ids)))
                for j, ids in enumerate(self.ids)]  # fmt: skip

    @property
    def per_prompt(self) -> int:
        return 1 if self.single else len(self.ids)

    def logprobs(self, scores: Sequence[Score]) -> list[float] | str:
        """``log p(label | prompt)`` per label from one prompt's scores (:meth:`requests`), or the error."""
        for s in scores:
            if s.error is not None:
                return s.error
        if self.single:
            return scores[0].value[0].tolist()
        out = []
        for s, ids in zip(scores, self.ids, strict=True):
            order = list(dict.fromkeys(ids))
            out.append(sum(s.value[i, order.index(t)].item() for i, t in enumerate(ids)))
        return out


def softmax(logps: Sequence[float]) -> list[float]:
    top = max(logps)
    weights = [math.exp(x - top) for x in logps]
    total = sum(weights)
    return [w / total for w in weights]


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector / ||vector||`` (a zero vector stays zero)."""
    norm = vector.double().norm()
    return (vector.double() / norm).float() if norm > 0 else vector.float()
