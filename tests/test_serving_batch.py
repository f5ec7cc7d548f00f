"""OpenAI batch files in ``moe-compile score``: lines checked against OpenAI's batch output schema, scores
against eager forwards, per-line errors, resume by custom_id; the native JSON lines still work."""

import json

import pytest
import torch
from test_serving_cli import run_cli
from test_serving_rerank import eager_relevance, shipped  # noqa: F401  (a fixture)

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def check_openai_batch_line(line):
    """OpenAI's batch output object: {id, custom_id, response: {status_code, request_id, body} | null,
    error: {code, message} | null} (https://platform.openai.com/docs/api-reference/batch/request-output)."""
    assert set(line) == {"id", "custom_id", "response", "error"}, line
    assert isinstance(line["id"], str) and line["id"] and isinstance(line["custom_id"], str)
    response, error = line["response"], line["error"]
    assert (response is None) != (error is None), line
    if response is not None:
        assert set(response) == {"status_code", "request_id", "body"}
        assert isinstance(response["status_code"], int) and isinstance(response["request_id"], str)
        assert isinstance(response["body"], (dict, list))
    else:
        assert set(error) == {"code", "message"} and isinstance(error["code"], str) and error["message"]


QUERY, DOCS = "how to join paths", ["os.path.join(a, b)", "x = 1"]
LINES = [
    {"custom_id": "rerank", "method": "POST", "url": "/v1/rerank", "body": {"query": QUERY, "documents": DOCS}},
    {"custom_id": "score", "method": "POST", "url": "/v1/score", "body": {"text_1": QUERY, "text_2": DOCS}},
    {"custom_id": "sglang", "method": "POST", "url": "/v1/score",
     "body": {"query": QUERY, "items": DOCS, "label_token_ids": [121, 110], "apply_softmax": True}},
    {"custom_id": "classify", "method": "POST", "url": "/classify", "body": {"input": DOCS}},
    {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": DOCS}},
    {"custom_id": "native", "method": "POST", "url": "/score",
     "body": {"requests": [{"id": "n", "tokens": [72, 101, 108], "labels": [5]}]}},
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
    {"custom_id": "get", "method": "GET", "url": "/v1/rerank", "body": {}},
    {"custom_id": "bad-body", "method": "POST", "url": "/v1/rerank", "body": {"query": QUERY}},
    {"custom_id": "cut", "method": "POST", "url": "/v1/score",
     "body": {"text_1": "q" * 200, "text_2": "d", "truncate_prompt_tokens": -1}},
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir():
    from moe_compile.predictor import TINY_MOE_DIR

    return str(TINY_MOE_DIR)


def test_openai_batch_file_lines_errors_and_resume(shipped, tiny_dir, tmp_path, capsys):  # noqa: F811
    requests, output = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    text = [json.dumps(line) for line in LINES]
    text[3:3] = ["{not json", json.dumps(LINES[0])]  # a malformed line and a repeated custom_id
    requests.write_text("\n".join(text) + "\n")
    argv = ["score", "--model", tiny_dir, "--input", str(requests), "--output", str(output), "--no-compile",
            "--block-size", "8", "--chunk", "4"]  # fmt: skip
    assert run_cli(argv) == 1  # malformed lines: exit status 1
    err = capsys.readouterr()
    assert f"{requests}:4: skipped malformed line: not JSON" in err.err
    assert f"{requests}:5: skipped malformed line: duplicate custom_id 'rerank' (first on line 1)" in err.err
    assert "answered 10 batch lines" in err.out
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    for line in lines:
        check_openai_batch_line(line)
    by_id = {line["custom_id"]: line for line in lines}
    assert [line["custom_id"] for line in lines] == [line["custom_id"] for line in LINES]  # input order, once each
    expected = [eager_relevance(shipped, QUERY, d) for d in DOCS]
    rerank = by_id["rerank"]["response"]
    assert rerank["status_code"] == 200
    for r in rerank["body"]["results"]:
        assert abs(r["relevance_score"] - expected[r["index"]]) < 1e-5
    score = by_id["score"]["response"]["body"]
    assert all(abs(d["score"] - expected[d["index"]]) < 1e-5 for d in score["data"])
    assert by_id["sglang"]["response"]["body"]["object"] == "scoring"
    assert len(by_id["classify"]["response"]["body"]["data"]) == 2
    embedding = by_id["embed"]["response"]["body"]["data"][0]["embedding"]
    assert len(embedding) == shipped[0].config.hidden_size and abs(torch.tensor(embedding).norm() - 1) < 1e-5
    assert by_id["native"]["response"]["body"]["scores"][0]["id"] == "n"
    assert by_id["chat"]["response"] is None and by_id["chat"]["error"]["code"] == "invalid_url"
    assert "unknown url '/v1/chat/completions'" in by_id["chat"]["error"]["message"]
    assert by_id["get"]["error"]["code"] == "invalid_method"
    bad = by_id["bad-body"]["response"]
    assert bad["status_code"] == 400 and "missing key(s) 'query'" not in bad["body"]["detail"]
    assert "missing key(s) 'documents'" in bad["body"]["detail"]
    cut = by_id["cut"]["response"]  # a truncation that would cut the template: that line alone fails
    assert cut["status_code"] == 400 and "cannot truncate: the template and the query take" in cut["body"]["detail"]

    # interrupted after four lines, the fifth half written: a rerun answers the rest, each custom_id once
    kept = output.read_text().splitlines(keepends=True)
    output.write_text("".join(kept[:4]) + kept[4][:30])
    assert run_cli(argv) == 1
    assert "answered 6 batch lines" in capsys.readouterr().out
    resumed = [json.loads(x) for x in output.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in resumed) == sorted(by_id)
    for line in resumed:
        check_openai_batch_line(line)
        if line["response"] is not None and line["custom_id"] in ("rerank", "score", "classify"):
            assert line["response"]["body"].get("results", line["response"]["body"].get("data")) is not None
    again = {line["custom_id"]: line for line in resumed}
    rescored = again["embed"]["response"]["body"]["data"][0]["embedding"]  # the half-written line, answered again
    assert ((torch.tensor(rescored) - torch.tensor(embedding)).norm() / torch.tensor(embedding).norm()).item() < 1e-5
    assert again["embed"]["id"] != by_id["embed"]["id"]
