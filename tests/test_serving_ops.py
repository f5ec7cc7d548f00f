"""Operations of the HTTP front end: /metrics (parsed by prometheus_client), --api-key, the body limit,
/v1/models, and a SIGTERM that drains."""

import http.client as httpclient
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_serving_cli import http, serving
from test_serving_rerank import shipped  # noqa: F401  (a fixture)

from moe_compile.testing import zoo

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")


def make_app(shipped, **kwargs):  # noqa: F811
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    model, tokenizer = shipped
    engine = PrefillEngine(model, tokenizer=tokenizer, compile=False, block_size=8)
    return engine, create_app(engine, warmup=False, model_name="tiny-moe", **kwargs)


def scrape(url):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_count_calls_latency_queue_and_prefix_cache(shipped):  # noqa: F811
    engine, app = make_app(shipped)
    prompt = list(range(40, 80))
    with serving(app) as url:
        for i in range(2):
            body = {"requests": [{"id": "a", "tokens": prompt + [90 + i], "labels": [5]}]}
            assert http(f"{url}/score", body)[0] == 200
        assert http(f"{url}/v1/score", {"text_1": "a"})[0] == 400
        assert http(f"{url}/nowhere")[0] == 404
        m = scrape(url)
    assert m[("moe_compile:http_requests_total", (("endpoint", "/score"), ("status", "200")))] == 2
    assert m[("moe_compile:http_requests_total", (("endpoint", "/v1/score"), ("status", "400")))] == 1
    assert m[("moe_compile:http_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert m[("moe_compile:e2e_request_latency_seconds_count", (("endpoint", "/score"),))] == 2
    assert m[("moe_compile:e2e_request_latency_seconds_sum", (("endpoint", "/score"),))] > 0
    assert m[("moe_compile:num_requests_waiting", ())] == 0 and m[("moe_compile:num_requests_running", ())] == 0
    rank = (("rank", "0"),)
    assert m[("moe_compile:prompt_tokens_total", rank)] == engine.stats.prompt_tokens == 82
    assert m[("moe_compile:prompt_tokens_cached_total", rank)] == engine.stats.cached_tokens == 40  # 5 blocks of 8
    assert m[("moe_compile:prefix_cache_queries_total", rank)] == 82
    assert m[("moe_compile:prefix_cache_hits_total", rank)] == 40
    assert m[("moe_compile:prompt_tokens_computed_total", rank)] == engine.stats.computed_tokens == 42
    assert m[("moe_compile:request_success_total", rank)] == 2


def test_api_key_refuses_a_wrong_key_before_anything_is_scored(shipped):  # noqa: F811
    cohere = pytest.importorskip("cohere")
    openai = pytest.importorskip("openai")
    engine, app = make_app(shipped, api_key="s3cret")
    body = {"requests": [{"id": "a", "tokens": [72, 101], "labels": [5]}]}
    with serving(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            req = urllib.request.Request(
                f"{url}/score", json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=30)
            assert refused.value.code == 401 and "--api-key" in json.loads(refused.value.read())["detail"]
        assert engine.stats.requests == 0  # nothing of a refused call was scored
        for path in ("/health", "/ready", "/metrics"):
            conn = http_connection(url)
            conn.request("GET", path)
            assert conn.getresponse().status == 200, path
        answer = cohere.ClientV2(api_key="s3cret", base_url=url).rerank(model="tiny-moe", query="q", documents=["d"])
        assert len(answer.results) == 1
        with pytest.raises(cohere.core.api_error.ApiError) as bad:
            cohere.ClientV2(api_key="nope", base_url=url).rerank(model="tiny-moe", query="q", documents=["d"])
        assert bad.value.status_code == 401
        models = openai.OpenAI(api_key="s3cret", base_url=f"{url}/v1").models.list()
        assert [m.id for m in models.data] == ["tiny-moe"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="nope", base_url=f"{url}/v1").models.list()


def http_connection(url):
    host, port = url.removeprefix("http://").split(":")
    return httpclient.HTTPConnection(host, int(port), timeout=30)


def test_a_body_over_the_byte_limit_is_refused_whole(shipped):  # noqa: F811
    engine, app = make_app(shipped, max_body_bytes=1000)
    small = {"requests": [{"id": "a", "tokens": [72, 101], "labels": [5]}]}
    big = {"requests": [{"id": i, "tokens": [72] * 40, "labels": [5]} for i in range(10)]}  # > 1000 bytes
    with serving(app) as url:
        status, answer = http(f"{url}/score", big)
        assert status == 413 and "at most 1000" in answer["detail"] and "--max-body-bytes" in answer["detail"]
        conn = http_connection(url)  # chunked: no Content-Length to judge by
        data = json.dumps(big).encode()
        conn.request("POST", "/score", body=iter([data[:600], data[600:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        assert response.status == 413 and "more than 1000" in json.loads(response.read())["detail"]
        assert engine.stats.requests == 0
        status, answer = http(f"{url}/score", small)
        assert status == 200 and engine.stats.requests == 1


def test_v1_models_and_health_version(shipped):  # noqa: F811
    import moe_compile

    _, app = make_app(shipped)
    with serving(app) as url:
        status, answer = http(f"{url}/v1/models")
        assert status == 200 and answer["object"] == "list"
        assert answer["data"][0]["id"] == "tiny-moe" and answer["data"][0]["object"] == "model"
        assert answer["data"][0]["max_model_len"] == 128
        status, health = http(f"{url}/health")
        assert status == 200 and health["version"] == moe_compile.__version__


@pytest.mark.timeout(300)
def test_sigterm_drains_the_call_in_flight_then_exits(tmp_path):
    path = tmp_path / "qwen3_moe"
    zoo.build("qwen3_moe").save_pretrained(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "moe_compile.cli", "serve", "--model", str(path), "--port", str(port),
            "--no-compile", "--no-warmup", "--token-budget", "256"]  # fmt: skip
    log = tmp_path / "server.log"  # a file, not a pipe: a pipe nobody reads can fill and block the server
    with open(log, "wb") as out_file:
        server = subprocess.Popen(argv, stdout=out_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http(f"{url}/ready", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        body = {"requests": [{"id": i, "tokens": [3 + (i * 7 + j) % 120 for j in range(100)], "labels": [5]}
                             for i in range(600)]}  # fmt: skip
        out: list = []
        call = threading.Thread(target=lambda: out.append(http(f"{url}/score", body, timeout=240)), daemon=True)
        call.start()
        deadline = time.monotonic() + 60
        while True:  # until the call is queued or running
            m = scrape(url)
            if m[("moe_compile:num_requests_waiting", ())] + m[("moe_compile:num_requests_running", ())] > 0:
                break
            assert time.monotonic() < deadline and call.is_alive()
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new calls: the server stopped listening
            http(f"{url}/health", timeout=5)
        call.join(240)
        ((status, answer),) = out
        assert status == 200 and [r["id"] for r in answer["scores"]] == list(range(600))  # it finished
        assert all("logprobs" in r for r in answer["scores"])
        server.wait(60)
        assert server.returncode in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_flags_api_key_from_the_environment_and_bad_classify_labels(tmp_path, monkeypatch, capsys):
    import argparse

    from test_serving_cli import run_cli

    from moe_compile.serving.cli import _front_kwargs, add_subcommands

    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setenv("MOE_COMPILE_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--max-concurrent-requests", "7",
                              "--request-timeout", "2.5", "--max-body-bytes", "100"])  # fmt: skip
    front = _front_kwargs(args)
    assert front["api_key"] == "from-env" and front["max_concurrent_requests"] == 7
    assert front["request_timeout"] == 2.5 and front["max_body_bytes"] == 100
    assert front["classify_labels"] == [" yes", " no"]
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--api-key", "flag"])
    assert _front_kwargs(args)["api_key"] == "flag"  # a flag wins over the environment
    with pytest.raises(SystemExit) as exited:
        run_cli(["serve", "--model", str(tmp_path), "--classify-labels", '["only one"]'])
    assert exited.value.code == 2
    assert "argument --classify-labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["serve", "--model", str(tmp_path), "--max-concurrent-requests", "0"])
    assert "--max-concurrent-requests: must be an integer >= 1" in capsys.readouterr().err
