"""The bodies of the scoring APIs other servers speak (vLLM, SGLang, Cohere/Jina, OpenAI, TEI).

Each ``parse_*`` takes a decoded JSON object and returns what the call asks for, or raises
:class:`~moe_compile.serving.bodies.BadCall` naming what is wrong (HTTP 400). The answers are
built in :mod:`~moe_compile.serving.routes`. docs/serving.md has the table of endpoints,
bodies and whose shape each is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .bodies import BadCall, check_keys, text_value
from .truncation import Truncation, parse_truncation

_VLLM_TRUNCATION = frozenset({"truncate_prompt_tokens", "truncation_side"})
#: keys of a rerank body: those that change the answer, then those accepted and ignored (clients send them)
_RERANK_KEYS = frozenset({"model", "query", "documents", "top_n", "return_documents", "max_tokens_per_doc",
                          "max_tokens_per_query"}) | _VLLM_TRUNCATION  # fmt: skip
_IGNORED = frozenset({"priority", "user"})
_TEI_RERANK_KEYS = frozenset({"query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction"})
_SCORE_KEYS = frozenset({"model", "text_1", "text_2", "queries", "documents"}) | _VLLM_TRUNCATION | _IGNORED
_SGLANG_SCORE_KEYS = frozenset({"model", "query", "items", "label_token_ids", "apply_softmax", "item_first"})
_CLASSIFY_KEYS = frozenset({"model", "input"}) | _VLLM_TRUNCATION | _IGNORED
_TEI_EMBED_KEYS = frozenset({"inputs", "normalize", "truncate", "truncation_direction", "dimensions"})
_EMBEDDING_KEYS = frozenset({"model", "input", "encoding_format", "dimensions"}) | _VLLM_TRUNCATION | _IGNORED
ENCODINGS = ("float", "base64")


def _truncation(body: dict[str, Any]) -> Truncation:
    try:
        return parse_truncation(body)
    except ValueError as e:
        raise BadCall(str(e)) from None


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadCall(f"'{key}' must be true or false, not {value!r}")
    return value


def _texts(value: Any, key: str, most: int) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    if isinstance(value, str):
        return [text_value(value, f"'{key}'")]
    if not isinstance(value, list) or not value:
        raise BadCall(f"'{key}' must be a string or a non-empty list of strings")
    if len(value) > most:
        raise BadCall(f"{len(value)} texts in '{key}'; at most {most} per call")
    return [text_value(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


@dataclasses.dataclass
class Rerank:
    """A rerank call (Cohere/Jina/vLLM shape, or TEI's with ``tei``)."""

    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True
    truncation: Truncation = dataclasses.field(default_factory=Truncation)
    tei: bool = False
    raw_scores: bool = False


def parse_rerank(body: dict[str, Any], max_documents: int) -> Rerank:
    """A rerank body: Cohere/Jina/vLLM (``documents``) or TEI (``texts``); :class:`BadCall` naming the problem."""
    if "texts" in body and "documents" not in body:
        check_keys(body, _TEI_RERANK_KEYS, ("query", "texts"))
        return Rerank(text_value(body["query"], "'query'"), _texts(body["texts"], "texts", max_documents),
                      None, _bool(body, "return_text", False), _truncation(body), tei=True,
                      raw_scores=_bool(body, "raw_scores", False))  # fmt: skip
    check_keys(body, _RERANK_KEYS | _IGNORED, ("query", "documents"))
    query = text_value(body["query"], "'query'")
    documents = body["documents"]
    if not isinstance(documents, list) or not documents:
        raise BadCall("'documents' must be a non-empty list of strings (or of {\"text\": ...} objects)")
    if len(documents) > max_documents:
        raise BadCall(f"{len(documents)} documents in one call; at most {max_documents}")
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict) and set(doc) == {"text"}:
            doc = doc["text"]
        texts.append(text_value(doc, f"documents[{i}]"))
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
        raise BadCall(f"'top_n' must be an integer >= 0 (0: all), not {top_n!r}")
    return Rerank(query, texts, top_n or None, _bool(body, "return_documents", True), _truncation(body))


def is_pair_score(body: dict[str, Any]) -> bool:
    """Whether a body is vLLM's score shape (``text_1``/``text_2`` or ``queries``/``documents``)."""
    return any(k in body for k in ("text_1", "text_2", "queries", "documents"))


def parse_score(body: dict[str, Any], max_pairs: int) -> tuple[list[tuple[str, str]], Truncation]:
    """The (query, document) pairs of a vLLM score body and its truncation; :class:`BadCall` naming the problem.

    ``text_1``/``text_2`` or, in vLLM's newer naming, ``queries``/``documents``: one query is
    paired with every document, else the lists pair up one to one.
    """
    check_keys(body, _SCORE_KEYS, ())
    names = ("queries", "documents") if "queries" in body or "documents" in body else ("text_1", "text_2")
    if any(k in body for k in ("text_1", "text_2")) and names[0] == "queries":
        raise BadCall("give 'text_1'/'text_2' or 'queries'/'documents', not both")
    missing = [k for k in names if k not in body]
    if missing:
        raise BadCall(f"missing key(s) {', '.join(map(repr, missing))}")
    first, second = (_texts(body[k], k, max_pairs) for k in names)
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise BadCall(f"'{names[0]}' has {len(first)} texts and '{names[1]}' {len(second)}: give one "
                      f"{names[0][:-1] if names[0] == 'queries' else names[0]}, or as many as {names[1]}")  # fmt: skip
    return list(zip(first, second, strict=True)), _truncation(body)


@dataclasses.dataclass
class LabelScore:
    """SGLang's label-token scoring call: each prompt's probabilities of ``label_token_ids`` next."""

    prompts: list[str | list[int]]  # texts, or token ids
    label_token_ids: list[int]
    apply_softmax: bool = False


def parse_sglang_score(body: dict[str, Any], max_items: int) -> LabelScore:
    """SGLang's ``/v1/score`` body ``{query, items, label_token_ids, apply_softmax?, item_first?}``.

    ``query`` and ``items`` are text (a string, and a string or list of strings) or token ids (a
    list of ints, and a list of lists of ints); the prompt is ``query + item`` (``item + query``
    with ``item_first``), as SGLang builds it.
    """
    check_keys(body, _SGLANG_SCORE_KEYS, ("query", "items", "label_token_ids"))
    query, items = body["query"], body["items"]
    labels = body["label_token_ids"]
    if not _token_ids(labels):
        raise BadCall("'label_token_ids' must be a non-empty list of token ids (integers)")
    item_first = _bool(body, "item_first", False)
    if isinstance(query, str):
        text_value(query, "'query'")
        items = _texts(items, "items", max_items)
    elif _token_ids(query):
        if not isinstance(items, list) or not items or not all(_token_ids(i) for i in items):
            raise BadCall("with token ids as 'query', 'items' must be a non-empty list of token-id lists")
        if len(items) > max_items:
            raise BadCall(f"{len(items)} items in one call; at most {max_items}")
    else:
        raise BadCall("'query' must be a non-empty string or a non-empty list of token ids")
    prompts = [(item + query) if item_first else (query + item) for item in items]
    return LabelScore(prompts, labels, _bool(body, "apply_softmax", False))


def parse_classify(body: dict[str, Any], max_inputs: int) -> tuple[list[str], Truncation]:
    """vLLM's ``/classify`` body ``{model?, input: str | [str], truncate_prompt_tokens?}``."""
    check_keys(body, _CLASSIFY_KEYS, ("input",))
    return _texts(body["input"], "input", max_inputs), _truncation(body)


@dataclasses.dataclass
class Embeddings:
    """An OpenAI ``/v1/embeddings`` call: texts or token-id lists."""

    inputs: list[str | list[int]]
    encoding_format: str = "float"
    truncation: Truncation = dataclasses.field(default_factory=Truncation)
    normalize: bool = True


def parse_embeddings(body: dict[str, Any], max_inputs: int, hidden: int) -> Embeddings:
    """OpenAI's body ``{model, input: str | [str] | [int] | [[int]], encoding_format?, dimensions?}``."""
    check_keys(body, _EMBEDDING_KEYS, ("input",))
    value = body["input"]
    if _token_ids(value):
        inputs: list[str | list[int]] = [value]
    elif isinstance(value, list) and value and all(_token_ids(v) for v in value):
        inputs = list(value)
        if len(inputs) > max_inputs:
            raise BadCall(f"{len(inputs)} inputs in one call; at most {max_inputs}")
    else:
        try:
            inputs = list(_texts(value, "input", max_inputs))
        except BadCall:
            raise BadCall("'input' must be a string, a list of strings, a list of token ids or a list of "
                          "token-id lists, none empty") from None  # fmt: skip
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise BadCall(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != hidden:
        raise BadCall(f"'dimensions' {dimensions!r}: this model's embeddings have {hidden} dimensions and are not "
                      "shortened; leave 'dimensions' out")  # fmt: skip
    return Embeddings(inputs, encoding, _truncation(body))


def parse_tei_embed(body: dict[str, Any], max_inputs: int, hidden: int) -> Embeddings:
    """TEI's ``/embed`` body ``{inputs: str | [str], normalize?, truncate?, truncation_direction?}``."""
    check_keys(body, _TEI_EMBED_KEYS, ("inputs",))
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != hidden:
        raise BadCall(f"'dimensions' {dimensions!r}: this model's embeddings have {hidden} dimensions and are not "
                      "shortened; leave 'dimensions' out")  # fmt: skip
    return Embeddings(list(_texts(body["inputs"], "inputs", max_inputs)), "float", _truncation(body),
                      _bool(body, "normalize", True))  # fmt: skip
