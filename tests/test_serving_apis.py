"""The scoring APIs in other servers' shapes (SGLang, vLLM, OpenAI, TEI) and truncation, against eager forwards.

Request bodies are the ones of SGLang's and vLLM's documentation (with label ids and texts
fitted to the shipped tiny MoE, a byte-level model of 128 positions); /v1/embeddings is called
with the ``openai`` client, also in its default base64 encoding.
"""

import math

import pytest
import torch
from test_serving_cli import http, serving
from test_serving_rerank import eager_relevance, shipped  # noqa: F401  (a fixture)

from moe_compile.serving.relevance import DEFAULT_TEMPLATE

pytest.importorskip("fastapi")

VLLM_MODEL = "BAAI/bge-reranker-v2-m3"  # the model name in vLLM's score examples; served under it here


def make_app(shipped, name=VLLM_MODEL, **kwargs):  # noqa: F811
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    model, tokenizer = shipped
    engine = PrefillEngine(model, tokenizer=tokenizer, compile=False, block_size=8)
    return create_app(engine, warmup=False, model_name=name, **kwargs)


@torch.no_grad()
def eager_logprobs(shipped, prompt_ids):  # noqa: F811
    """log-softmax of the next token after ``prompt_ids`` (a plain forward), [V]."""
    model, _ = shipped
    return torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)


def ids(shipped, text):  # noqa: F811
    return shipped[1](text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def eager_pooled(shipped, prompt_ids):  # noqa: F811
    model, _ = shipped
    hidden = model(input_ids=torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0]
    v = hidden.double().mean(dim=0)
    return v / v.norm()


def test_sglang_label_token_scoring_text_and_token_ids(shipped):  # noqa: F811
    # SGLang's documented body: {"query", "items", "label_token_ids", "apply_softmax", "item_first"}
    query = "Is the following city the capital of France? "
    items = ["Paris", "London", "Berlin"]
    labels = [121, 110]  # "v", "k" in the byte vocabulary (SGLang's example ids are a 150k vocabulary's)
    with serving(make_app(shipped)) as url:
        for softmax in (True, False):
            body = {"query": query, "items": items, "label_token_ids": labels, "apply_softmax": softmax,
                    "item_first": False, "model": VLLM_MODEL}  # fmt: skip
            status, answer = http(f"{url}/v1/score", body)
            assert status == 200, answer
            assert answer["object"] == "scoring" and answer["model"] == VLLM_MODEL and len(answer["scores"]) == 3
            for item, got in zip(items, answer["scores"], strict=True):
                lp = eager_logprobs(shipped, ids(shipped, query + item))[labels]
                expected = torch.softmax(lp, 0) if softmax else lp.exp()
                assert torch.allclose(torch.tensor(got), expected, rtol=1e-5, atol=1e-7), (got, expected)
            if softmax:
                assert all(abs(sum(s) - 1) < 1e-6 for s in answer["scores"])
        # token ids, item first
        q, its = [72, 101, 108], [[108, 111], [33, 33, 33]]
        status, answer = http(f"{url}/v1/score", {"query": q, "items": its, "label_token_ids": labels,
                                                  "item_first": True})  # fmt: skip
        assert status == 200, answer
        for item, got in zip(its, answer["scores"], strict=True):
            expected = eager_logprobs(shipped, item + q)[labels].exp()
            assert torch.allclose(torch.tensor(got), expected, rtol=1e-5, atol=1e-8)
        status, answer = http(f"{url}/v1/score", {"query": "q", "items": ["a"], "label_token_ids": [4096]})
        assert status == 400 and "items[0]: unknown label token 4096" in answer["detail"]


def test_vllm_score_bodies_on_score_and_v1_score(shipped):  # noqa: F811
    # vLLM's documented bodies: text_1/text_2 (one query, several documents) and queries/documents
    text_1 = "What is the capital of France?"
    text_2 = ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]
    expected = [eager_relevance(shipped, text_1, d) for d in text_2]
    with serving(make_app(shipped)) as url:
        for path in ("/score", "/v1/score"):
            status, answer = http(f"{url}{path}", {"model": VLLM_MODEL, "text_1": text_1, "text_2": text_2})
            assert status == 200, answer
            assert answer["object"] == "list" and [d["index"] for d in answer["data"]] == [0, 1]
            assert all(abs(d["score"] - e) < 1e-5 for d, e in zip(answer["data"], expected, strict=True))
            status, answer = http(f"{url}{path}", {"model": VLLM_MODEL, "queries": [text_1, text_1],
                                                   "documents": text_2})  # fmt: skip
            assert status == 200, answer
            assert all(abs(d["score"] - e) < 1e-5 for d, e in zip(answer["data"], expected, strict=True))
        # the native body keeps working on /score
        status, answer = http(f"{url}/score", {"requests": [{"id": "n", "tokens": [72, 101], "labels": [5]}]})
        assert status == 200 and answer["scores"][0]["id"] == "n"
        status, answer = http(f"{url}/score", {"text_1": "a", "queries": ["b"], "documents": ["c"]})
        assert status == 400 and "not both" in answer["detail"]


def test_classify_in_vllms_shape(shipped):  # noqa: F811
    # vLLM's documented body: {"model", "input": [...]}
    texts = ["Loved the new cafe, coffee was great.", "This update broke everything. Frustrating."]
    for labels in ([" yes", " no"], ["a", "b", "c"]):  # multi-token labels (a pass per label), single-token ones
        with serving(make_app(shipped, classify_labels=labels)) as url:
            status, answer = http(f"{url}/classify", {"model": VLLM_MODEL, "input": texts})
            assert status == 200, answer
            assert answer["object"] == "list" and answer["id"].startswith("classify-")
            for d, text in zip(answer["data"], texts, strict=True):
                prompt = ids(shipped, text)
                logps = []
                for label in labels:
                    lab = ids(shipped, label)
                    full = torch.log_softmax(shipped[0](input_ids=torch.tensor([prompt + lab[:-1]])).logits[0].float(),
                                             dim=-1)  # fmt: skip
                    logps.append(sum(full[len(prompt) - 1 + j, t].item() for j, t in enumerate(lab)))
                probs = torch.softmax(torch.tensor(logps, dtype=torch.float64), 0)
                assert d["num_classes"] == len(labels) and len(d["probs"]) == len(labels)
                assert torch.allclose(torch.tensor(d["probs"], dtype=torch.float64), probs, rtol=1e-5, atol=1e-7)
                assert d["label"] == labels[int(probs.argmax())]
            status, answer = http(f"{url}/v1/classify", {"input": "x" * 300})
            assert status == 400 and "input[0]: too long: 300 tokens" in answer["detail"]
            status, answer = http(f"{url}/classify", {"input": "x" * 300 + "yz", "truncate_prompt_tokens": 50,
                                                      "truncation_side": "left"})  # fmt: skip
            assert status == 200, answer
            assert answer["usage"]["prompt_tokens"] == 50


def test_openai_client_embeddings_float_and_base64(shipped):  # noqa: F811
    openai = pytest.importorskip("openai")
    texts = ["def add(a, b): return a + b", "The capital of France is Paris."]
    expected = [eager_pooled(shipped, ids(shipped, t)) for t in texts]
    with serving(make_app(shipped, name="tiny-moe")) as url:
        client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1")
        for kwargs in ({}, {"encoding_format": "float"}):  # the client's default is base64
            answer = client.embeddings.create(model="tiny-moe", input=texts, **kwargs)
            assert [d.index for d in answer.data] == [0, 1] and answer.model == "tiny-moe"
            assert answer.usage.prompt_tokens == sum(len(ids(shipped, t)) for t in texts)
            for d, e in zip(answer.data, expected, strict=True):
                got = torch.tensor(d.embedding, dtype=torch.float64)
                assert len(d.embedding) == shipped[0].config.hidden_size
                assert ((got - e).norm() / e.norm()).item() < 1e-5
        single = client.embeddings.create(model="tiny-moe", input=[72, 101, 108, 108, 111])  # token ids
        e = eager_pooled(shipped, [72, 101, 108, 108, 111])
        assert ((torch.tensor(single.data[0].embedding, dtype=torch.float64) - e).norm() / e.norm()).item() < 1e-5
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="tiny-moe", input="x", dimensions=8)
        assert "'dimensions' 8: this model's embeddings have" in bad.value.body["detail"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="x")


# -- truncation ---------------------------------------------------------------------------------------------------

QUERY = "what is a list"


def longest_prefix(shipped, document, limit, side="right"):  # noqa: F811
    """By brute force: the longest prefix (suffix) of ``document`` whose filled template has <= limit tokens."""
    for c in range(len(document), -1, -1):
        piece = document[:c] if side == "right" else document[len(document) - c :]
        if len(ids(shipped, DEFAULT_TEMPLATE.format(query=QUERY, document=piece))) <= limit:
            return piece
    return None


def test_truncation_cuts_the_document_never_the_template_or_label(shipped):  # noqa: F811
    document = "A list is an ordered, mutable sequence. " * 8  # 320 bytes: longer than the model's 128
    limit = 128 - (len(ids(shipped, " yes")) - 1)  # the positive label's tail follows the prompt
    with serving(make_app(shipped)) as url:
        status, answer = http(f"{url}/v1/score", {"text_1": QUERY, "text_2": [document, "short"]})
        assert status == 400 and "pair 0: too long" in answer["detail"] and "truncate_prompt_tokens" in answer["detail"]
        for side in ("right", "left"):
            body = {"text_1": QUERY, "text_2": [document, "short"], "truncate_prompt_tokens": -1,
                    "truncation_side": side}  # fmt: skip
            status, answer = http(f"{url}/v1/score", body)
            assert status == 200, answer
            cut = longest_prefix(shipped, document, limit, side)
            assert 0 < len(cut) < len(document)
            assert abs(answer["data"][0]["score"] - eager_relevance(shipped, QUERY, cut)) < 1e-5
            assert abs(answer["data"][1]["score"] - eager_relevance(shipped, QUERY, "short")) < 1e-5
        status, answer = http(f"{url}/score", {"text_1": QUERY, "text_2": document, "truncate_prompt_tokens": 60})
        assert status == 200, answer
        expected = eager_relevance(shipped, QUERY, longest_prefix(shipped, document, 60))
        assert abs(answer["data"][0]["score"] - expected) < 1e-5
        assert answer["usage"]["prompt_tokens"] <= 60
        # the template and query alone do not fit: an error, never a cut template
        status, answer = http(f"{url}/v1/score", {"text_1": "q" * 100, "text_2": "d", "truncate_prompt_tokens": -1})
        assert status == 400 and "cannot truncate: the template and the query take" in answer["detail"]
        # Cohere's max_tokens_per_doc (and max_tokens_per_query): each keeps at most that many of its own tokens
        status, answer = http(f"{url}/v1/rerank", {"query": QUERY + " in python", "documents": [document, "xy"],
                                                   "max_tokens_per_doc": 40, "max_tokens_per_query": 14})  # fmt: skip
        assert status == 200, answer
        by_index = {r["index"]: r["relevance_score"] for r in answer["results"]}
        assert abs(by_index[0] - eager_relevance(shipped, QUERY, document[:40])) < 1e-5  # ASCII: a byte a token
        assert abs(by_index[1] - eager_relevance(shipped, QUERY, "xy")) < 1e-5
        assert answer["results"][0]["document"]["text"] in (document, "xy")  # the document is returned whole


def test_tei_rerank_shape_with_truncate(shipped):  # noqa: F811
    # TEI's documented body: {"query": "What is Deep Learning?",
    #                         "texts": ["Deep Learning is not...", "Deep learning is..."]}
    query, texts = "What is Deep Learning?", ["Deep Learning is not...", "Deep learning is..."]
    expected = [eager_relevance(shipped, query, t) for t in texts]
    with serving(make_app(shipped)) as url:
        status, answer = http(f"{url}/rerank", {"query": query, "texts": texts})
        assert status == 200 and isinstance(answer, list), answer
        assert [a["index"] for a in answer] == sorted(range(2), key=lambda i: -expected[i])
        assert all(abs(a["score"] - expected[a["index"]]) < 1e-5 and "text" not in a for a in answer)
        status, answer = http(
            f"{url}/rerank", {"query": query, "texts": texts, "raw_scores": True, "return_text": True}
        )
        assert status == 200
        for a in answer:
            p = expected[a["index"]]
            assert abs(a["score"] - math.log(p / (1 - p))) < 1e-4 and a["text"] == texts[a["index"]]
        long_text = "Deep learning stacks layers. " * 10
        status, answer = http(f"{url}/rerank", {"query": query, "texts": [long_text]})
        assert status == 400 and "too long" in answer["detail"]
        status, answer = http(f"{url}/rerank", {"query": query, "texts": [long_text], "truncate": True,
                                                "truncation_direction": "Left"})  # fmt: skip
        assert status == 200, answer
        limit = 128 - (len(ids(shipped, " yes")) - 1)
        for c in range(len(long_text), -1, -1):
            piece = long_text[len(long_text) - c :]
            if len(ids(shipped, DEFAULT_TEMPLATE.format(query=query, document=piece))) <= limit:
                break
        assert abs(answer[0]["score"] - eager_relevance(shipped, query, piece)) < 1e-5
        status, answer = http(f"{url}/rerank", {"query": query, "texts": texts, "truncation_direction": "up"})
        assert status == 400 and "'truncation_direction' must be 'Right' or 'Left'" in answer["detail"]


@torch.no_grad()
def test_tei_embed_shape_normalize_and_truncate(shipped):  # noqa: F811
    # TEI's documented body: {"inputs": "What is Deep Learning?"}
    with serving(make_app(shipped)) as url:
        status, answer = http(f"{url}/embed", {"inputs": "What is Deep Learning?"})
        assert status == 200 and isinstance(answer, list) and len(answer) == 1, answer
        expected = eager_pooled(shipped, ids(shipped, "What is Deep Learning?"))
        got = torch.tensor(answer[0], dtype=torch.float64)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5
        texts = ["a b c", "Deep learning stacks layers. " * 6]  # the second: 174 bytes, longer than 128
        status, answer = http(f"{url}/embed", {"inputs": texts, "normalize": False})
        assert status == 400 and "input[1]: too long: 174 tokens" in answer["detail"], answer
        status, answer = http(f"{url}/embed", {"inputs": texts, "normalize": False, "truncate": True,
                                               "truncation_direction": "Left"})  # fmt: skip
        assert status == 200, answer
        model = shipped[0]
        for vector, prompt in zip(answer, [ids(shipped, texts[0]), ids(shipped, texts[1])[-128:]], strict=True):
            hidden = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
            raw = hidden.double().mean(dim=0)  # not normalised
            assert ((torch.tensor(vector, dtype=torch.float64) - raw).norm() / raw.norm()).item() < 1e-5
