"""The rerank and score APIs (Cohere/Jina/vLLM shapes) on 127.0.0.1, with a real client, against eager forwards."""

import math

import pytest
import torch
from test_serving_cli import http, serving

from moe_compile.serving.relevance import DEFAULT_TEMPLATE, RelevanceTemplate

pytest.importorskip("fastapi")

QUERY = "how to join paths"
DOCUMENTS = ["os.path.join(a, b)", "def join(self, *parts):", "x = 1", "import pathlib; Path(a) / b"]


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny MoE in float32 with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_compile.predictor import TINY_MOE_DIR

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MOE_DIR), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(TINY_MOE_DIR))


def make_app(shipped, **kwargs):
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    model, tokenizer = shipped
    engine = PrefillEngine(model, tokenizer=tokenizer, compile=False, block_size=8)
    return create_app(engine, warmup=False, model_name="tiny-moe", **kwargs)


@torch.no_grad()
def eager_relevance(shipped, query, document, template=DEFAULT_TEMPLATE, positive=" yes", negative=" no"):
    """The relevance score by hand: one plain forward of prompt + label per label, fp32."""
    model, tokenizer = shipped
    prompt = tokenizer(template.format(query=query, document=document), add_special_tokens=False)["input_ids"]
    logps = []
    for label in [positive] + ([negative] if negative else []):
        ids = tokenizer(label, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt + ids[:-1]])).logits[0].float()  # [n + k - 1, V]
        logp = torch.log_softmax(logits, dim=-1)
        logps.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
    if negative:
        return math.exp(logps[0]) / (math.exp(logps[0]) + math.exp(logps[1]))
    return math.exp(logps[0])


def test_cohere_client_reranks_with_the_eager_scores_and_order(shipped):
    cohere = pytest.importorskip("cohere")
    expected = [eager_relevance(shipped, QUERY, d) for d in DOCUMENTS]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert len(set(expected)) == len(expected)  # a strict order to check
    with serving(make_app(shipped)) as url:
        client = cohere.ClientV2(api_key="unused", base_url=url)
        answer = client.rerank(model="tiny-moe", query=QUERY, documents=DOCUMENTS, top_n=3)
        assert [r.index for r in answer.results] == order[:3]
        for r in answer.results:
            assert abs(r.relevance_score - expected[r.index]) < 1e-5 * max(1.0, expected[r.index])
            assert 0.0 <= r.relevance_score <= 1.0
        with pytest.raises(cohere.core.api_error.ApiError) as bad:
            client.rerank(model="tiny-moe", query="", documents=DOCUMENTS)
        assert bad.value.status_code == 400 and "'query' is empty" in str(bad.value.body)
        with pytest.raises(cohere.core.api_error.ApiError) as bad:
            client.rerank(model="another-model", query=QUERY, documents=DOCUMENTS)
        assert bad.value.status_code == 404 and "another-model" in str(bad.value.body)


def test_rerank_and_v1_score_shapes_match_vllm(shipped):
    expected = [eager_relevance(shipped, QUERY, d) for d in DOCUMENTS]
    with serving(make_app(shipped)) as url:
        for path in ("/rerank", "/v1/rerank"):
            status, answer = http(f"{url}{path}", {"model": "tiny-moe", "query": QUERY, "documents": DOCUMENTS})
            assert status == 200, answer
            assert answer["id"].startswith("rerank-") and answer["usage"]["total_tokens"] > 0
            results = answer["results"]
            assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))  # no top_n: all
            assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results),
                                                                     reverse=True)  # fmt: skip
            for r in results:
                assert r["document"] == {"text": DOCUMENTS[r["index"]]}
                assert abs(r["relevance_score"] - expected[r["index"]]) < 1e-5
        status, answer = http(f"{url}/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                                                   "top_n": 1, "return_documents": False})  # fmt: skip
        assert status == 200 and len(answer["results"]) == 1 and "document" not in answer["results"][0]
        assert answer["results"][0]["index"] == max(range(len(DOCUMENTS)), key=lambda i: expected[i])

        status, answer = http(f"{url}/v1/score", {"model": "tiny-moe", "text_1": QUERY, "text_2": DOCUMENTS})
        assert status == 200, answer
        assert answer["object"] == "list" and answer["id"].startswith("score-") and answer["model"] == "tiny-moe"
        assert [d["index"] for d in answer["data"]] == list(range(len(DOCUMENTS)))
        assert all(d["object"] == "score" for d in answer["data"])
        for d in answer["data"]:
            assert abs(d["score"] - expected[d["index"]]) < 1e-5
        queries = ["a", "b"]
        status, answer = http(f"{url}/v1/score", {"text_1": queries, "text_2": DOCUMENTS[:2]})
        assert status == 200, answer
        for d, q, doc in zip(answer["data"], queries, DOCUMENTS, strict=False):
            assert abs(d["score"] - eager_relevance(shipped, q, doc)) < 1e-5


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/rerank", {"documents": ["a"]}, 400, "missing key(s) 'query'"),
        ("/v1/rerank", {"query": "q", "documents": "a"}, 400, "'documents' must be a non-empty list"),
        ("/v1/rerank", {"query": "q", "documents": []}, 400, "'documents' must be a non-empty list"),
        ("/v1/rerank", {"query": "q", "documents": ["a", 5]}, 400, "documents[1] must be a string"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 400, "'top_n' must be an integer >= 0"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": []}, 400, "unknown key(s) 'rank_fields'"),
        ("/v1/rerank", {"query": "q", "documents": ["a" * 300]}, 400, "pair 0: too long"),
        ("/v1/rerank", {"model": "gpt", "query": "q", "documents": ["a"]}, 404, "The model `gpt` does not exist"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "give one text_1"),
        ("/v1/score", {"text_1": "a"}, 400, "missing key(s) 'text_2'"),
        ("/v1/score", {"text_1": "a", "text_2": 7}, 400, "'text_2' must be a string or a non-empty list"),
        ("/v1/score", b"{not json", 400, "not JSON"),
        ("/v1/score", b"[1]", 400, "must be a JSON object"),
        ("/v1/score", b'{"text_1": "\\ud800", "text_2": "a"}', 400, "lone surrogate"),
    ],
)
def test_requests_in_the_wrong_shape_get_4xx_with_a_message(shipped, path, body, status, message):
    with serving(make_app(shipped)) as url:
        got, answer = http(f"{url}{path}", body)
        assert got == status and message in answer["detail"], (got, answer)
        got, _ = http(f"{url}/health")  # nothing stalled
        assert got == 200


def test_template_and_labels_are_configurable(shipped, monkeypatch):
    template = "Q={query} D={document} ok?"
    monkeypatch.setenv("MOE_COMPILE_RERANK_TEMPLATE", template)
    monkeypatch.setenv("MOE_COMPILE_RERANK_POSITIVE", "y")
    monkeypatch.setenv("MOE_COMPILE_RERANK_NEGATIVE", "")
    assert RelevanceTemplate.from_env() == RelevanceTemplate(template, "y", "")
    assert RelevanceTemplate.from_env(positive="Y").positive == "Y"  # a flag wins over the environment
    with serving(make_app(shipped)) as url:  # create_app reads the environment
        status, answer = http(f"{url}/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS[0]})
        assert status == 200, answer
        expected = eager_relevance(shipped, QUERY, DOCUMENTS[0], template, "y", "")
        assert abs(answer["data"][0]["score"] - expected) < 1e-5 * max(1.0, expected)
    for bad in ("no fields", "{query} only", "{query} {document} {other}", "{query} {document} {query}", "{query"):
        with pytest.raises(ValueError, match="rerank template"):
            RelevanceTemplate(bad)
    with pytest.raises(ValueError, match="positive rerank label is empty"):
        RelevanceTemplate(positive="")
