"""``moe-compile score`` (malformed lines, bad requests, resume, summary) and ``moe-compile serve`` over HTTP."""

import argparse
import contextlib
import json
import threading
import time
import urllib.request

import pytest
import torch
from serving_helpers import eager_value, rel_err

import moe_compile
from moe_compile.serving import Request
from moe_compile.serving.cli import add_subcommands
from moe_compile.testing import zoo


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    model = zoo.build("qwen3_moe")
    model.save_pretrained(path)
    return path, model


def write_requests(path, n=12):
    prefix = list(range(3, 40))
    lines = [json.dumps({"id": f"r{i}", "tokens": prefix + [50 + i] * (1 + i % 4), "labels": [5, 6]}) for i in range(n)]
    lines[3:3] = ["{not json", json.dumps({"id": "r0", "tokens": [5]}), json.dumps({"tokens": [5]}), ""]
    lines.append(json.dumps({"id": "empty", "tokens": []}))
    lines.append(json.dumps({"id": "bad-label", "tokens": [5, 6], "labels": [4096]}))
    path.write_text("\n".join(lines) + "\n")


def test_score_writes_every_request_reports_malformed_lines_and_resumes(checkpoint, tmp_path, capsys):
    model_dir, model = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    write_requests(requests)
    argv = ["score", "--model", str(model_dir), "--input", str(requests), "--output", str(output),
            "--no-compile", "--block-size", "8", "--chunk", "5"]  # fmt: skip
    assert run_cli(argv) == 1  # malformed lines: exit status 1
    captured = capsys.readouterr()
    assert f"{requests}:4: skipped malformed line: not JSON" in captured.err
    assert f"{requests}:5: skipped malformed line: duplicate id 'r0' (first on line 1)" in captured.err
    assert f"{requests}:6: skipped malformed line: no 'id'" in captured.err
    assert "scored 14 requests (2 with errors)" in captured.out and "3 malformed line(s)" in captured.out
    assert "requests/s" in captured.out and "tokens/s" in captured.out and "prefix cache:" in captured.out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(records) == len(by_id) == 14
    assert by_id["empty"]["error"] == "empty request: no tokens"
    assert by_id["bad-label"]["error"] == "unknown label token 4096: outside the vocabulary [0, 128)"
    for i in range(12):
        record = by_id[f"r{i}"]
        tokens = list(range(3, 40)) + [50 + i] * (1 + i % 4)
        expected = eager_value(model, Request(id=i, tokens=tuple(tokens), labels=(5, 6)))
        assert rel_err(torch.tensor(record["logprobs"]), expected) < 1e-5
    assert sum(r.get("cached_tokens", 0) for r in records) > 0

    # interrupted: the last 4 records are lost and a fifth is half written
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:9]) + lines[9][:20])
    assert run_cli(argv) == 1
    captured = capsys.readouterr()
    assert "scored 5 requests" in captured.out and "skipped 9 already in the output" in captured.out
    resumed = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in resumed) == sorted(by_id)  # all there, none twice
    assert {r["id"]: r for r in resumed} == by_id


def test_score_refuses_a_missing_model_or_input(tmp_path, capsys):
    out = str(tmp_path / "y")
    refused(["score", "--model", str(tmp_path), "--input", str(tmp_path / "x"), "--output", out], capsys,
            "argument --input: no such input file")  # fmt: skip
    (tmp_path / "in.jsonl").write_text("")
    refused(["score", "--model", str(tmp_path), "--input", str(tmp_path / "in.jsonl"), "--output", out], capsys,
            "argument --model", "not a checkpoint directory")  # fmt: skip


def test_http_endpoint_scores_on_localhost(checkpoint):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    _, model = checkpoint
    engine = PrefillEngine(model, compile=False, block_size=8)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_requests=4), host="127.0.0.1", port=0,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"

        def post(body):
            req = urllib.request.Request(
                f"{url}/score", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        prompt = list(range(3, 30))
        calls = [
            [{"id": "a", "tokens": prompt + [40], "labels": [5, 6]}, {"id": "b", "tokens": []}],
            [{"id": "c", "tokens": prompt + [41], "labels": [5, 6]}, {"id": "d", "tokn": [1]}],
        ]
        answers = [post({"requests": call}) for call in calls]  # a bounded number of requests
        assert [status for status, _ in answers] == [200, 200]
        (a, b), (c, d) = (body["scores"] for _, body in answers)
        expected = eager_value(model, Request(id="a", tokens=tuple(prompt + [40]), labels=(5, 6)))
        assert rel_err(torch.tensor(a["logprobs"]), expected) < 1e-5
        assert b == {"id": "b", "error": "empty request: no tokens"}
        assert c["cached_tokens"] == 24  # the second call reused the first call's prefix (3 blocks of 8)
        assert d["id"] == "d" and d["error"].startswith("malformed request: unknown key(s) tokn")
        status, body = post({"requests": [{"id": i, "tokens": [5]} for i in range(5)]})
        assert status == 413 and "at most 4" in body["detail"]
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            health = json.loads(response.read())
        assert health["status"] == "ok" and health["requests"] == 3
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_bad_lines_are_reported_with_their_numbers_and_the_run_goes_on(checkpoint, tmp_path, capsys):
    model_dir, _ = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    good = [json.dumps({"id": f"g{i}", "tokens": [5, 6, 7 + i], "labels": [5]}).encode() for i in range(2)]
    lines = [
        good[0],
        b'{"id": "s", "tokens": [5], "labels": ["\\ud800"]}',  # a lone surrogate escape
        b'{"id": "x\xff", "tokens": [5]}',  # a byte that is not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested 100,000 deep
        b'{"id": "\\udc00", "tokens": [5]}',
        good[1],
    ]
    requests.write_bytes(b"\n".join(lines) + b"\n")
    argv = ["score", "--model", str(model_dir), "--input", str(requests), "--output", str(output), "--no-compile"]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert f"{requests}:2: skipped malformed line: 'labels' holds a lone surrogate" in err
    assert f"{requests}:3: skipped malformed line: not UTF-8: byte 0xff at column 10" in err
    assert f"{requests}:4: skipped malformed line: nested too deeply" in err
    assert f"{requests}:5: skipped malformed line: 'id' holds a lone surrogate" in err
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(records) == ["g0", "g1"] and all("logprobs" in r for r in records.values())


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a thread; yields its URL."""
    uvicorn = pytest.importorskip("uvicorn")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def http(url, body=None, timeout=60):
    """(status, decoded JSON) of a GET (``body`` None) or a POST of ``body`` (bytes or a JSON-ready object)."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_bad_requests_get_error_records_and_the_rest_is_scored(checkpoint):
    pytest.importorskip("fastapi")
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    _, model = checkpoint
    engine = PrefillEngine(model, compile=False, block_size=8)
    good = [json.dumps({"id": i, "tokens": [5, 6, 7 + i], "labels": [5]}).encode() for i in range(3)]
    body = b'{"requests": [' + b", ".join([
        good[0],
        b'{"id": "s", "tokens": [5], "labels": ["\\ud800"]}',
        b'{"id": "x\xff", "tokens": [5]}',
        b"[" * 100_000 + b"]" * 100_000,
        good[1],
        json.dumps({"id": 0, "tokens": [9, 9]}).encode(),  # the id of the first request again
        good[2],
    ]) + b"]}"  # fmt: skip
    with serving(create_app(engine)) as url:
        status, answer = http(f"{url}/score", body)
        assert status == 200, answer
        records = answer["scores"]
        assert [r.get("id") for r in records] == [0, "s", None, None, 1, 0, 2]
        for i in (0, 4, 6):
            expected = eager_value(model, Request(id=0, tokens=(5, 6, 7 + records[i]["id"]), labels=(5,)))
            assert rel_err(torch.tensor(records[i]["logprobs"]), expected) < 1e-5
        assert records[1]["error"].startswith("malformed request: 'labels' holds a lone surrogate")
        assert records[2]["error"] == "malformed request: not UTF-8: byte 0xff at column 10"
        assert records[3]["error"] == "malformed request: nested too deeply"
        assert records[5]["error"] == "malformed request: duplicate id 0 (first at index 0)"
        for bad in (b"{not json", b'{"requests": 5}', b"[" * 100_000):
            status, answer = http(f"{url}/score", bad)
            assert status == 400 and "detail" in answer, (bad[:20], status, answer)
        status, health = http(f"{url}/health")
        assert status == 200 and health["status"] == "ok"


# -- the output file is only ever a scores file of this tool, written by one run at a time -----------------------


def score_argv(model_dir, requests, output, *extra):
    return ["score", "--model", str(model_dir), "--input", str(requests), "--output", str(output), "--no-compile",
            "--quiet", *extra]  # fmt: skip


def refused(argv, capsys, *expected):
    """Run ``argv``: it must stop with argparse's exit status 2 and a message holding each of ``expected``."""
    with pytest.raises(SystemExit) as stop:
        run_cli(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    for text in expected:
        assert text in err, err
    return err


def test_output_that_is_the_input_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    model_dir, _ = checkpoint
    requests = tmp_path / "requests.jsonl"
    write_requests(requests)
    before = requests.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(requests)
    monkeypatch.chdir(tmp_path)
    for output in (requests, tmp_path / "link.jsonl", "requests.jsonl", "./sub/../requests.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        refused(score_argv(model_dir, requests, output), capsys, "--output", "is the input file")
    assert requests.read_bytes() == before


@pytest.mark.parametrize("content", [
    b"my notes: try block size 8\nand then 16 (no newline at the end)",
    b'{"id": 1, "note": "a JSON-lines file of something else"}\n{"id": 2, "note": "x"}\n',
    b"[1, 2]\n",
])  # fmt: skip
def test_output_that_is_not_a_scores_file_is_refused_and_left_alone(checkpoint, tmp_path, capsys, content):
    model_dir, _ = checkpoint
    requests, notes = tmp_path / "requests.jsonl", tmp_path / "notes.txt"
    write_requests(requests, n=2)
    notes.write_bytes(content)
    refused(score_argv(model_dir, requests, notes), capsys, "--output", "not a scores file of moe-compile score")
    assert notes.read_bytes() == content


def test_a_scores_file_in_use_by_another_run_is_refused(checkpoint, tmp_path, capsys):
    import fcntl

    model_dir, _ = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    write_requests(requests, n=2)
    with open(output, "ab") as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(score_argv(model_dir, requests, output), capsys, "--output", "another run is writing")
    assert output.read_bytes() == b""
    assert run_cli(score_argv(model_dir, requests, output)) == 1  # unlocked: it runs (malformed lines: 1)
    assert len(output.read_text().splitlines()) == 4


@pytest.mark.parametrize("flag, value, expected", [
    ("--chunk", "-1", "must be an integer >= 1"),
    ("--chunk", "0", "must be an integer >= 1"),
    ("--token-budget", "0", "must be an integer >= 1"),
    ("--block-size", "0", "must be an integer >= 1"),
    ("--prefix-cache-tokens", "-1", "must be an integer >= 0"),
    ("--slack", "-5", "must be a number >= 0"),
    ("--dtype", "float8", "invalid choice"),
])  # fmt: skip
def test_bad_arguments_are_argparse_errors(checkpoint, tmp_path, capsys, flag, value, expected):
    model_dir, _ = checkpoint
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, n=2)
    refused([*score_argv(model_dir, requests, tmp_path / "out.jsonl"), flag, value], capsys, f"argument {flag}",
            expected)  # fmt: skip
    assert not (tmp_path / "out.jsonl").exists()


def test_a_missing_output_directory_is_refused_before_anything_is_scored(checkpoint, tmp_path, capsys):
    model_dir, _ = checkpoint
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, n=2)
    err = refused(score_argv(model_dir, requests, tmp_path / "nope" / "out.jsonl"), capsys, "--output",
                  "directory", "does not exist")  # fmt: skip
    assert "scored" not in err


def test_no_progress_bar_floods_a_log_file(checkpoint, tmp_path, capsys):
    model_dir, _ = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    write_requests(requests)
    argv = score_argv(model_dir, requests, output, "--chunk", "2")
    argv.remove("--quiet")
    assert run_cli(argv) == 1
    err = capsys.readouterr().err  # not a terminal, as a log file is not
    assert "%|" not in err and "req/s" not in err and "it/s" not in err, err


def shipped_requests(path, n=24):
    """Text requests on the shipped model: Python lines after a shared header, cut at varied lengths."""
    import inspect as pyinspect

    source = pyinspect.getsource(json.decoder).splitlines()
    header = "import json\nimport os\n\n"
    lines = [line for line in source if len(line.strip()) > 12][:n]
    objects = [{"id": f"t{i}", "text": header + line[: 8 + (5 * i) % (len(line) - 8)], "labels": ["e", "s", " "]}
               for i, line in enumerate(lines)]  # fmt: skip
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return objects


def test_a_run_resumed_mid_chunk_equals_a_clean_run(tmp_path, capsys):
    from moe_compile.predictor import TINY_MOE_DIR

    requests, clean, resumed = tmp_path / "requests.jsonl", tmp_path / "clean.jsonl", tmp_path / "resumed.jsonl"
    shipped_requests(requests)
    # no --dtype: the default must be one whose scores do not depend on batching (the checkpoint is bf16)
    base = ["--block-size", "8", "--chunk", "8", "--token-budget", "256"]
    assert run_cli(score_argv(TINY_MOE_DIR, requests, clean, *base)) == 0
    lines = clean.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:5]) + lines[5][:30])  # interrupted in the first chunk, mid-line
    assert run_cli(score_argv(TINY_MOE_DIR, requests, resumed, *base)) == 0
    assert "scored 19 requests" in capsys.readouterr().out
    a = {r["id"]: r for r in map(json.loads, clean.read_text().splitlines())}
    b = {r["id"]: r for r in map(json.loads, resumed.read_text().splitlines())}
    assert sorted(a) == sorted(b) and len(a) == 24
    assert sum(r["cached_tokens"] for r in a.values()) != sum(r["cached_tokens"] for r in b.values())
    diff = max((torch.tensor(a[i]["logprobs"]) - torch.tensor(b[i]["logprobs"])).abs().max().item() for i in a)
    assert diff < 1e-5


def test_dtype_option_loads_the_checkpoint_in_that_dtype(tmp_path):
    from moe_compile.predictor import TINY_MOE_DIR
    from moe_compile.serving.cli import _engine

    parser = argparse.ArgumentParser(prog="moe-compile")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    for flag, dtype in ((None, torch.float32), ("bfloat16", torch.bfloat16), ("auto", torch.bfloat16)):
        argv = ["serve", "--model", str(TINY_MOE_DIR), "--no-compile", *(["--dtype", flag] if flag else [])]
        engine = _engine(parser.parse_args(argv))
        assert engine.model.dtype == dtype


def test_health_says_warming_up_until_the_engine_is_warm(checkpoint, monkeypatch):
    pytest.importorskip("fastapi")
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    _, model = checkpoint
    engine = PrefillEngine(model, compile=False, block_size=8)
    release, warmed = threading.Event(), []
    warmup = engine.warmup
    monkeypatch.setattr(engine, "warmup", lambda: release.wait(60) and warmed.append(warmup()))
    with serving(create_app(engine)) as url:
        status, health = http(f"{url}/health")  # liveness: alive while warming up
        assert (status, health["status"], health["version"]) == (200, "warming up", moe_compile.__version__)
        assert http(f"{url}/ready") == (503, {"status": "warming up"})  # readiness: not yet
        answers = []
        early = threading.Thread(target=lambda: answers.append(http(f"{url}/score", {"requests": [
            {"id": "early", "tokens": [5, 6, 7], "labels": [5]}]})))  # fmt: skip
        early.start()
        time.sleep(0.5)
        assert not answers  # a call made while warming up waits for it
        release.set()
        early.join(timeout=60)
        ((status, body),) = answers
        assert status == 200 and body["scores"][0]["id"] == "early" and "logprobs" in body["scores"][0]
        assert warmed and warmed[0] >= 4
        status, health = http(f"{url}/health")
        assert (status, health["status"], health["requests"]) == (200, "ok", 1)  # warm-up's own calls not counted
        assert http(f"{url}/ready") == (200, {"status": "ready"})


def test_health_reports_a_failed_warmup(checkpoint, monkeypatch):
    pytest.importorskip("fastapi")
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app

    _, model = checkpoint
    engine = PrefillEngine(model, compile=False, block_size=8)

    def broken():
        raise RuntimeError("the backend failed")

    monkeypatch.setattr(engine, "warmup", broken)
    with serving(create_app(engine)) as url:
        deadline = time.monotonic() + 30
        while (health := http(f"{url}/health"))[1]["status"] == "warming up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, body = health
        assert status == 503 and body["status"] == "failed" and "RuntimeError: the backend failed" in body["error"]
        status, body = http(f"{url}/score", {"requests": [{"id": 1, "tokens": [5, 6]}]})
        assert status == 503 and "warm-up failed" in body["detail"]
        assert http(f"{url}/ready") == (503, {"status": "failed"})


def test_auto_sizes_are_reported_by_score_and_health(checkpoint, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from moe_compile.serving import PrefillEngine
    from moe_compile.serving.http import create_app
    from moe_compile.serving.sizing import resolve

    model_dir, model = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    write_requests(requests, n=3)
    argv = score_argv(model_dir, requests, output, "--token-budget", "auto", "--prefix-cache-tokens", "auto")
    assert run_cli(argv) == 1  # the malformed lines of write_requests
    err = capsys.readouterr().err
    assert "--token-budget 2048, --prefix-cache-tokens 65536 (on cpu 'auto' keeps the defaults" in err
    engine = PrefillEngine(model, compile=False, block_size=8)
    sizing = resolve(engine, "auto", "auto", mem_info=(64 * 2**20, 100 * 2**20))  # as a GPU would report it
    with serving(create_app(engine, warmup=False)) as url:
        status, health = http(f"{url}/health")
    assert status == 200 and health["sizing"] == sizing.to_json()
    assert (health["token_budget"], health["prefix_cache_tokens"]) == (sizing.token_budget, sizing.prefix_cache_tokens)
    assert health["memory"]["prefix_cache_bytes"] > 0 and "64 MiB free of 100 MiB" in health["sizing"]["how"]


def test_inductor_flag_maps_to_the_backend_option(checkpoint, tmp_path, capsys, monkeypatch):
    from moe_compile.serving import engine as engine_module

    model_dir, _ = checkpoint
    requests, output = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    write_requests(requests)
    refused(["serve", "--model", str(model_dir), "--inductor", "yes"], capsys,
            "argument --inductor: invalid choice: 'yes' (choose from ", "auto", "on", "off")  # fmt: skip
    refused(score_argv(model_dir, requests, output, "--inductor", "on"), capsys,
            "argument --inductor on: nothing is compiled with --no-compile; drop one")  # fmt: skip
    seen = []

    class Stop(Exception):
        pass

    def engine(model, **kwargs):
        seen.append(kwargs["options"])
        raise Stop

    monkeypatch.setattr(engine_module, "PrefillEngine", engine)
    argv = ["score", "--model", str(model_dir), "--input", str(requests), "--output", str(output), "--quiet"]
    for flag, value in (("auto", "auto"), ("on", True), ("off", False)):
        with pytest.raises(Stop):
            run_cli([*argv, "--inductor", flag])
        assert seen[-1] == {"inductor": value}
