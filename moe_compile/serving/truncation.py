"""Truncation of prompts that are too long: vLLM's, Cohere's and TEI's options, one rule.

A call says how to cut (:class:`Truncation`), parsed from the shape it speaks:

- vLLM: ``truncate_prompt_tokens`` (k: the prompt keeps k tokens; -1: the model's maximum)
  and ``truncation_side`` (``"right"`` keeps the first tokens, ``"left"`` the last; default the
  tokenizer's ``truncation_side``, ``"right"`` for most);
- Cohere (rerank): ``max_tokens_per_doc``; and ``max_tokens_per_query``: each document (query)
  keeps at most that many of its own tokens, whatever else the call says;
- TEI: ``truncate: true`` (the model's maximum) and ``truncation_direction`` (``"Right"`` /
  ``"Left"``, either case).

Where the prompt is a template filled with a query and a document (rerank, score), only the
**document** is cut, at a character boundary, so that the whole prompt fits: the template's
text, the query and the label or answer tail stay whole (:func:`fit_document`). If even an
empty document does not fit, the pair is an error (never a cut template). A plain text prompt
(classify, embeddings) is cut on its tokens (:func:`cut_tokens`).

Without truncation, a prompt longer than the model takes is an error of that item (where the
API's answer has a place for one) naming its length, the limit and the option that cuts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SIDES = ("right", "left")


class TruncationError(ValueError):
    """A prompt that cannot be cut to fit (the template and query alone are too long)."""


@dataclasses.dataclass(frozen=True)
class Truncation:
    """How a call's prompts are cut; ``max_tokens`` -1 is the model's maximum, None no cut of the prompt."""

    max_tokens: int | None = None
    side: str | None = None  # None: the tokenizer's truncation_side
    max_doc: int | None = None
    max_query: int | None = None

    @property
    def any(self) -> bool:
        return self.max_tokens is not None or self.max_doc is not None or self.max_query is not None

    def limit(self, model_max: int | None) -> int | None:
        """Prompt tokens at most, by this call's own option (None: not limited by it)."""
        if self.max_tokens is None:
            return None
        if self.max_tokens == -1:
            return model_max
        return self.max_tokens if model_max is None else min(self.max_tokens, model_max)

    def side_of(self, tokenizer: Any) -> str:
        if self.side is not None:
            return self.side
        side = getattr(tokenizer, "truncation_side", "right")
        return side if side in SIDES else "right"


def _int_option(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"'{key}' must be an integer >= 1, not {value!r}")
    return value


def parse_truncation(body: dict[str, Any]) -> Truncation:
    """The :class:`Truncation` of a body (any of the keys above); ValueError naming a bad value."""
    max_tokens = body.get("truncate_prompt_tokens")
    bad = not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or (max_tokens < 1 and max_tokens != -1)
    if max_tokens is not None and bad:
        raise ValueError(f"'truncate_prompt_tokens' must be -1 (the model's maximum) or >= 1, not {max_tokens!r}")
    truncate = body.get("truncate")
    if truncate is not None:
        if not isinstance(truncate, bool):
            raise ValueError(f"'truncate' must be true or false, not {truncate!r}")
        if truncate and max_tokens is None:
            max_tokens = -1
    side = body.get("truncation_side")
    if side is not None and side not in SIDES:
        raise ValueError(f"'truncation_side' must be 'right' (keep the first tokens) or 'left', not {side!r}")
    direction = body.get("truncation_direction")
    if direction is not None:
        if not isinstance(direction, str) or direction.lower() not in SIDES:
            raise ValueError(f"'truncation_direction' must be 'Right' or 'Left', not {direction!r}")
        side = side or direction.lower()
    return Truncation(
        max_tokens, side, _int_option(body, "max_tokens_per_doc"), _int_option(body, "max_tokens_per_query")
    )


def cut_tokens(ids: list[int], n: int, side: str) -> list[int]:
    """The first (``side`` right) or last (left) ``n`` of ``ids``."""
    if len(ids) <= n:
        return ids
    return ids[:n] if side == "right" else ids[len(ids) - n :]


def cut_text(text: str, fits: Callable[[str], bool], side: str) -> str | None:
    """The longest prefix (``side`` right) or suffix (left) of ``text`` for which ``fits`` holds; None if none does.

    A binary search over character positions: the answer is cut at a character boundary, so no
    character is split (a byte-level tokenizer would otherwise leave half a UTF-8 sequence).
    """

    def piece(c: int) -> str:
        return text[:c] if side == "right" else text[len(text) - c :]

    if fits(text):
        return text
    if not fits(""):
        return None
    lo, hi = 0, len(text)  # fits(piece(lo)) holds, fits(piece(hi)) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(piece(mid)):
            lo = mid
        else:
            hi = mid
    return piece(lo)


def fit_document(
    encode: Callable[[str, str], list[int]],
    count: Callable[[str], int],
    query: str,
    document: str,
    limit: int,
    truncation: Truncation,
    side: str,
) -> tuple[str, str, list[int]]:
    """``(query, document, prompt tokens)`` after the call's cuts, the prompt at most ``limit`` tokens.

    ``encode(query, document)``: the filled template's tokens; ``count(text)``: a text's own token
    count (for ``max_tokens_per_doc`` / ``_per_query``). The query and document are first cut to
    their own limits, then the document is cut (only when the call asked for truncation) until
    the prompt fits; :class:`TruncationError` if it cannot.
    """
    if truncation.max_query is not None:
        query = cut_text(query, lambda q: count(q) <= truncation.max_query, "right")
    if truncation.max_doc is not None:
        document = cut_text(document, lambda d: count(d) <= truncation.max_doc, side)
    tokens = encode(query, document)
    if len(tokens) <= limit:
        return query, document, tokens
    if truncation.max_tokens is None:
        raise TruncationError(
            f"too long: {len(tokens)} tokens, the model takes at most {limit} here; pass "
            "truncate_prompt_tokens (-1: the model's maximum), max_tokens_per_doc or truncate: true to cut the document"
        )
    cut = cut_text(document, lambda d: len(encode(query, d)) <= limit, side)
    if cut is None:
        empty = len(encode(query, ""))
        raise TruncationError(
            f"cannot truncate: the template and the query take {empty} tokens without the document, more than "
            f"the {limit} allowed; the template is never cut (shorten the query, or pass max_tokens_per_query)"
        )
    return query, cut, encode(query, cut)
