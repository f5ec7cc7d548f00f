"""Scoring requests and their results.

A request is one prompt scored by one prefill pass:

- ``tokens`` (token ids) or ``text`` (needs an engine with a tokenizer);
- ``read``: the positions whose outputs are wanted, negative ones counted from the end
  (default ``[-1]``, the last token), or ``"all"``;
- ``labels``: candidate label tokens (ids, or strings that the tokenizer maps to one token each);
- ``output``: what to return per request:

  ===========  ================================================  ==================
  ``output``   value                                             shape
  ===========  ================================================  ==================
  ``labels``   log-probabilities of the labels at each read      ``[n_read, n_labels]``
  ``logits``   the full logits at each read position             ``[n_read, vocab]``
  ``pooled``   mean of the final hidden states over the reads    ``[hidden]``
  ===========  ================================================  ==================

  The default is ``labels`` when labels are given, else ``logits``.

:meth:`Request.from_json` turns one decoded JSON object into a request and raises
:class:`MalformedRequest` when it cannot (wrong types, unknown keys, no id). Problems
that need the model to see (an empty prompt, one too long for the model, a label
outside the vocabulary) are not malformations: the engine answers those with a
:class:`Score` that carries an ``error``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

OUTPUTS = ("labels", "logits", "pooled")
#: the key of a score's value in its JSON record, per output
JSON_KEYS = {"labels": "logprobs", "logits": "logits", "pooled": "pooled"}
_KEYS = frozenset({"id", "tokens", "text", "read", "labels", "output"})


class MalformedRequest(ValueError):
    """A JSON object that does not describe a request; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to score (see the module docstring for the fields)."""

    id: str | int
    tokens: tuple[int, ...] | None = None
    text: str | None = None
    read: tuple[int, ...] | str = (-1,)
    labels: tuple[int | str, ...] | None = None
    output: str = ""  # "" -> "labels" when labels are given, else "logits"

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.text is None):
            raise MalformedRequest("give exactly one of 'tokens' and 'text'")
        if isinstance(self.read, str) and self.read != "all":
            raise MalformedRequest(f"'read' must be a list of positions or \"all\", not {self.read!r}")
        if isinstance(self.read, tuple) and not self.read:
            raise MalformedRequest("'read' is empty")
        output = self.output or ("labels" if self.labels is not None else "logits")
        if output not in OUTPUTS:
            raise MalformedRequest(f"'output' must be one of {', '.join(OUTPUTS)}, not {self.output!r}")
        if (output == "labels") != (self.labels is not None):
            raise MalformedRequest("'labels' go with output 'labels' and only with it")
        if self.labels is not None and not self.labels:
            raise MalformedRequest("'labels' is empty")
        object.__setattr__(self, "output", output)

    @classmethod
    def from_json(cls, obj: Any) -> Request:
        """A request from a decoded JSON object; :class:`MalformedRequest` if it is not one."""
        if not isinstance(obj, dict):
            raise MalformedRequest(f"expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - _KEYS)
        if unknown:
            raise MalformedRequest(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        if "id" not in obj:
            raise MalformedRequest("no 'id'")
        rid = obj["id"]
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise MalformedRequest(f"'id' must be a string or an integer, not {type(rid).__name__}")
        for key in ("id", "text", "labels"):
            _check_unicode(obj.get(key), key)
        tokens = obj.get("tokens")
        if tokens is not None:
            tokens = tuple(_int_list(tokens, "tokens"))
        text = obj.get("text")
        if text is not None and not isinstance(text, str):
            raise MalformedRequest("'text' must be a string")
        read = obj.get("read", [-1])
        read = read if isinstance(read, str) else tuple(_int_list(read, "read"))
        labels = obj.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(_is_int(x) or isinstance(x, str) for x in labels):
                raise MalformedRequest("'labels' must be a list of token ids or strings")
            labels = tuple(labels)
        output = obj.get("output", "")
        if not isinstance(output, str):
            raise MalformedRequest("'output' must be a string")
        return cls(id=rid, tokens=tokens, text=text, read=read, labels=labels, output=output)


@dataclasses.dataclass
class Score:
    """The answer to one request: ``value`` (see :data:`OUTPUTS`) or an ``error``."""

    id: str | int
    output: str = ""
    value: torch.Tensor | None = None  # float32, shape per the module docstring
    read: list[int] = dataclasses.field(default_factory=list)  # absolute positions read
    labels: list[int] | None = None  # label token ids, for output "labels"
    tokens: int = 0  # prompt length
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    rank: int = 0  # the data-parallel rank that scored it
    error: str | None = None
    out_of_memory: bool = False  # the error is its batch running out of device memory (HTTP: 503; engine.py)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the value as nested lists under :data:`JSON_KEYS` ``[output]``, or the error."""
        if self.error is not None:
            return {"id": self.id, "error": self.error}
        out: dict[str, Any] = {"id": self.id, JSON_KEYS[self.output]: self.value.tolist(), "read": self.read}
        if self.labels is not None:
            out["label_ids"] = self.labels
        out.update(tokens=self.tokens, cached_tokens=self.cached_tokens, rank=self.rank)
        return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(x) for x in value):
        raise MalformedRequest(f"'{key}' must be a list of integers")
    return value


def _check_unicode(value: Any, key: str) -> None:
    """:class:`MalformedRequest` if a string in ``value`` (a string or a list) holds a lone surrogate.

    JSON lets ``"\\ud800"`` through; no tokenizer or UTF-8 writer takes it.
    """
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise MalformedRequest(
                    f"'{key}' holds a lone surrogate ({text[e.start]!r} at character {e.start}): not valid Unicode"
                ) from None
