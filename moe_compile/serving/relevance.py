"""Relevance scores of (query, document) pairs read from a causal LM, for the rerank and score APIs.

A causal LM has no relevance head, so a relevance score is read from its next-token
distribution after a prompt built from a template (:class:`RelevanceTemplate`):

1. the prompt is ``template.format(query=..., document=...)``, default
   :data:`DEFAULT_TEMPLATE` (``"Query: {query}\\nDocument: {document}\\nRelevant:"``),
   tokenized as a causal-LM prompt (no end token appended; a BOS only where the
   tokenizer adds one; :meth:`PrefillEngine.prepare`);
2. the *positive* label (default ``" yes"``) and the optional *negative* label (default
   ``" no"``) are tokenized on their own (no special tokens) and appended after the
   prompt's tokens; ``log p(label | prompt)`` is the sum of the log-probabilities of the
   label's tokens, each read where the model predicts it (one prefill pass per label; a
   single-token label needs no extra token, and a pass per label shares the prompt
   through the prefix cache);
3. the relevance score is, with a negative label, the probability of the positive label
   among the two, ``p(pos) / (p(pos) + p(neg)) = sigmoid(log p(pos) - log p(neg))``, in
   ``[0, 1]``; without one (``negative=""``), ``p(pos) = exp(log p(pos))``.

The template and labels are set by ``moe-compile serve --rerank-template/--rerank-positive/
--rerank-negative`` or the environment variables ``MOE_COMPILE_RERANK_TEMPLATE``,
``MOE_COMPILE_RERANK_POSITIVE`` and ``MOE_COMPILE_RERANK_NEGATIVE`` (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from collections.abc import Sequence

from .engine import PrefillEngine
from .requests import Request, Score
from .truncation import Truncation, TruncationError, fit_document

DEFAULT_TEMPLATE = "Query: {query}\nDocument: {document}\nRelevant:"
DEFAULT_POSITIVE = " yes"
DEFAULT_NEGATIVE = " no"
ENV_TEMPLATE = "MOE_COMPILE_RERANK_TEMPLATE"
ENV_POSITIVE = "MOE_COMPILE_RERANK_POSITIVE"
ENV_NEGATIVE = "MOE_COMPILE_RERANK_NEGATIVE"


class PairError(ValueError):
    """A (query, document) pair that cannot be scored: the message names it and what is wrong."""


@dataclasses.dataclass(frozen=True)
class RelevanceTemplate:
    """The prompt template and label strings a relevance score is read with (see the module docstring)."""

    template: str = DEFAULT_TEMPLATE
    positive: str = DEFAULT_POSITIVE
    negative: str = DEFAULT_NEGATIVE  # "" -> the score is p(positive)

    def __post_init__(self) -> None:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as e:
            raise ValueError(f"rerank template {self.template!r} is not a format string: {e}") from None
        if sorted(set(fields)) != ["document", "query"] or len(fields) != 2:
            raise ValueError(
                f"rerank template {self.template!r} must hold {{query}} and {{document}} once each and no other "
                "field (write a literal brace as {{ or }})"
            )
        if not self.positive:
            raise ValueError("the positive rerank label is empty")

    @classmethod
    def from_env(cls, template: str | None = None, positive: str | None = None, negative: str | None = None):
        """Explicit values first, then the environment variables, then the defaults."""
        return cls(
            template if template is not None else os.environ.get(ENV_TEMPLATE, DEFAULT_TEMPLATE),
            positive if positive is not None else os.environ.get(ENV_POSITIVE, DEFAULT_POSITIVE),
            negative if negative is not None else os.environ.get(ENV_NEGATIVE, DEFAULT_NEGATIVE),
        )

    def prompt(self, query: str, document: str) -> str:
        return self.template.format(query=query, document=document)


class RelevanceScorer:
    """Turns (query, document) pairs into engine requests and their scores into relevance scores."""

    def __init__(self, engine: PrefillEngine, template: RelevanceTemplate | None = None) -> None:
        if engine.tokenizer is None:
            raise ValueError("relevance scores need text: the engine has no tokenizer")
        self.engine = engine
        self.template = template or RelevanceTemplate()
        self.labels = [self._label_tokens(self.template.positive, "positive")]
        if self.template.negative:
            self.labels.append(self._label_tokens(self.template.negative, "negative"))

    def _label_tokens(self, text: str, which: str) -> list[int]:
        ids = list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"the {which} rerank label {text!r} gives no tokens")
        bad = [t for t in ids if not 0 <= t < min(self.engine.vocab_in, self.engine.vocab_out)]
        if bad:
            raise ValueError(f"the {which} rerank label {text!r} has token ids {bad} outside the model's vocabulary")
        return ids

    def requests(self, pairs: Sequence[tuple[str, str]], truncation: Truncation | None = None) -> list[Request]:
        """The engine requests of ``pairs``: one per pair and label, ids ``(pair, label)``; :class:`PairError`.

        ``truncation``: how a pair too long for the model is cut (:mod:`~moe_compile.serving.truncation`:
        only the document, never the template or the label tail); without it such a pair is an error.
        """
        truncation = truncation or Truncation()
        tail = max(len(label) for label in self.labels) - 1  # label tokens after the prompt
        model_max = self.engine.max_tokens - tail if self.engine.max_tokens is not None else None
        limits = [m for m in (model_max, truncation.limit(model_max)) if m is not None]
        limit = min(limits) if limits else None  # prompt tokens (the filled template), the label tail not counted
        side = truncation.side_of(self.engine.tokenizer)
        out = []
        for p, (query, document) in enumerate(pairs):
            for which, value in (("query", query), ("document", document)):
                if not isinstance(value, str):
                    raise PairError(f"pair {p}: the {which} must be a string, not {type(value).__name__}")
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise PairError(f"pair {p}: the {which} holds a lone surrogate at character {e.start}") from None
            try:
                if limit is None and not truncation.any:
                    tokens = self.encode(query, document)
                else:
                    _, _, tokens = fit_document(self.encode, self._count, query, document,
                                                limit if limit is not None else 1 << 62, truncation, side)  # fmt: skip
            except TruncationError as e:
                raise PairError(f"pair {p}: {e}") from None
            except Exception as e:  # noqa: BLE001  (the tokenizer's own error)
                raise PairError(f"pair {p}: cannot tokenize the prompt: {type(e).__name__}: {e}") from None
            n = len(tokens)
            for j, label in enumerate(self.labels):
                k = len(label)
                read = tuple(range(n - 1, n - 1 + k))  # where each label token is predicted
                out.append(Request(id=f"{p}:{j}", tokens=tuple(tokens + label[:-1]), read=read,
                                   labels=tuple(dict.fromkeys(label))))  # fmt: skip
        return out

    def encode(self, query: str, document: str) -> list[int]:
        """The tokens of the template filled with ``query`` and ``document`` (a causal-LM prompt)."""
        return self.engine._encode_prompt(self.template.prompt(query, document))

    def _count(self, text: str) -> int:
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def relevance(self, scores: Sequence[Score], pairs: int) -> list[tuple[float, int, float]]:
        """``(relevance, prompt tokens, raw)`` per pair from the scores of :meth:`requests`; :class:`PairError`.

        ``raw`` is the score before the sigmoid: ``log p(pos) - log p(neg)`` (``log p(pos)`` without a
        negative label), what TEI's ``raw_scores`` returns.
        """
        per_label = len(self.labels)
        out = []
        for p in range(pairs):
            logps = []
            for j, label in enumerate(self.labels):
                score = scores[p * per_label + j]
                if score.error is not None:
                    raise PairError(f"pair {p}: {score.error}")
                order = list(dict.fromkeys(label))
                logps.append(sum(score.value[i, order.index(t)].item() for i, t in enumerate(label)))
            tokens = scores[p * per_label].tokens - (len(self.labels[0]) - 1)
            raw = logps[0] - logps[1] if len(logps) == 2 else logps[0]
            out.append((relevance_from_logprobs(logps), tokens, raw))
        return out


def relevance_from_logprobs(logps: Sequence[float]) -> float:
    """``exp(lp_pos)``, or ``sigmoid(lp_pos - lp_neg)`` with a negative label."""
    if len(logps) == 1:
        return math.exp(logps[0])
    d = logps[0] - logps[1]
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
