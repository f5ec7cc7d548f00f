"""PrefillEngine: scores equal a plain eager forward per request (compiled, with and without prefix reuse),
padding and batching change nothing, only the read rows meet the LM head, bad requests get errors."""

import pytest
from serving_helpers import eager_value, max_error, rel_err, request_mix

import moe_compile
from moe_compile.serving import PrefillEngine, Request
from moe_compile.testing import zoo

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return zoo.build("qwen3_moe")


@pytest.mark.parametrize("prefix_cache_tokens", [4096, 0], ids=["prefix-cache", "no-cache"])
def test_compiled_engine_matches_eager(model, prefix_cache_tokens):
    requests = request_mix()
    engine = PrefillEngine(model, token_budget=96, block_size=8, prefix_cache_tokens=prefix_cache_tokens)
    first = engine.score(requests)
    assert max_error(model, requests, first) < TOL
    second = engine.score(requests)  # with the cache: every prefix up to the first read is now cached
    assert max_error(model, requests, second) < TOL
    report = moe_compile.last_report()
    assert report is not None and len(report.blocks) == 2  # the decoder really went through moe_prefill
    if prefix_cache_tokens:
        assert any(s.cached_tokens for s in first)  # the shared prefixes were computed once and reused
        assert all(s.cached_tokens == (min(s.read) // 8) * 8 for s in second)
        assert engine.stats.computed_tokens < engine.stats.prompt_tokens
    else:
        assert engine.cache is None and not any(s.cached_tokens for s in first + second)
        assert engine.stats.computed_tokens == engine.stats.prompt_tokens


def test_padding_and_batch_company_do_not_change_scores(model):
    engine = PrefillEngine(model, compile=False, prefix_cache_tokens=0, token_budget=10_000)
    short = Request(id="short", tokens=(7, 8, 9), labels=(4, 5))
    alone = engine.score([short])[0].value
    others = [Request(id=i, tokens=tuple(range(3, 3 + n)), labels=(4, 5)) for i, n in enumerate((40, 25, 60))]
    together = engine.score([*others, short])
    assert engine.stats.batches == 2  # the short request shared a right-padded batch of 60 columns
    assert rel_err(together[-1].value, alone) < TOL
    assert rel_err(alone, eager_value(model, short)) < TOL


def test_batches_stay_under_the_token_budget(model):
    engine = PrefillEngine(model, compile=False, prefix_cache_tokens=0, token_budget=32)
    requests = [Request(id=i, tokens=tuple(range(3, 3 + n))) for i, n in enumerate((5, 9, 12, 16, 30, 50))]
    scores = engine.score(requests)
    assert max_error(model, requests, scores) < TOL
    # sorted by length: [5, 9] (3 x 12 > 32), [12, 16] (2 x 16), [30] (2 x 50 > 32), [50] (over budget: alone)
    assert engine.stats.batches == 4
    assert engine.stats.padded_tokens == 2 * 9 + 2 * 16 + 30 + 50


def test_only_the_read_rows_meet_the_head(model, monkeypatch):
    engine = PrefillEngine(model, compile=False, prefix_cache_tokens=0)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head"))
    seen = []
    original = engine.head.log_normaliser
    monkeypatch.setattr(engine.head, "log_normaliser", lambda h: seen.append(tuple(h.shape)) or original(h))
    requests = [Request(id=i, tokens=tuple(range(3, 43 + i)), labels=(5, 6), read=(-1, 0)) for i in range(3)]
    scores = engine.score(requests)
    assert calls == []  # the model's head never ran on [tokens, V]
    assert seen == [(6, 32)]  # the normaliser saw the 2 read rows of each of the 3 requests
    assert max_error(model, requests, scores) < TOL


def test_bad_requests_get_errors_and_the_rest_is_scored(model):
    engine = PrefillEngine(model, compile=False)
    good = Request(id="ok", tokens=(5, 6, 7), labels=(3,))
    requests = [
        Request(id="empty", tokens=()),
        Request(id="long", tokens=(5,) * 300),
        Request(id="label", tokens=(5, 6), labels=(3, 128)),
        Request(id="token", tokens=(5, 600)),
        Request(id="read", tokens=(5, 6), read=(2,)),
        Request(id="text", text="hello"),
        Request(id="word", tokens=(5, 6), labels=("yes",)),
        good,
    ]
    scores = {s.id: s for s in engine.score(requests)}
    assert scores["empty"].error == "empty request: no tokens"
    assert scores["long"].error == "too long: 300 tokens, the model takes at most 256"
    assert scores["label"].error == "unknown label token 128: outside the vocabulary [0, 128)"
    assert scores["token"].error == "token id 600 is outside the vocabulary [0, 128)"
    assert scores["read"].error == "read position 2 is outside the prompt of 2 tokens"
    assert "no tokenizer" in scores["text"].error and "no tokenizer" in scores["word"].error
    assert scores["ok"].error is None and rel_err(scores["ok"].value, eager_value(model, good)) < TOL
    assert engine.stats.errors == 7 and engine.stats.requests == 8


@pytest.mark.parametrize("family", ["granitemoe", "gpt_oss", "deepseek_v3"])
def test_other_families_match_eager(family):
    """Granite scales its logits, GPT-OSS has sliding-window layers (no prefix cache), DeepSeek-V3 uses MLA."""
    model = zoo.build(family)
    engine = PrefillEngine(model, compile=False, block_size=8)
    requests = request_mix(seed=1)
    assert max_error(model, requests, engine.score(requests)) < TOL
    assert max_error(model, requests, engine.score(requests)) < TOL
    if family == "gpt_oss":
        assert engine.cache is None and "DynamicSlidingWindowLayer" in engine.prefix_cache_off
    else:
        assert engine.stats.cached_tokens > 0


def test_text_requests_and_string_labels_use_the_tokenizer(model):
    class Tokenizer:  # one token per character, offset past the special ids
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + ord(c) % 120 for c in text]}

    engine = PrefillEngine(model, tokenizer=Tokenizer(), compile=False)
    scores = engine.score([Request(id=0, text="is it?", labels=("y", "n")), Request(id=1, text="x", labels=("no",))])
    ids = [3 + ord(c) % 120 for c in "is it?yn"]
    as_ids = Request(id=0, tokens=tuple(ids[:-2]), labels=tuple(ids[-2:]))
    assert rel_err(scores[0].value, eager_value(model, as_ids)) < TOL
    assert scores[1].error == "label 'no' is not one token: it encodes to [113, 114]"


def test_encoder_decoder_models_are_refused():
    with pytest.raises(ValueError, match="encoder-decoder"):
        PrefillEngine(zoo.build("switch_transformers"), compile=False)


# -- text prompts are causal-LM prompts (no end token appended) ----------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny MoE in fp32 and its ByT5 tokenizer (which appends ``</s>`` when asked for special tokens)."""
    from transformers import AutoTokenizer

    from moe_compile.predictor import TINY_MOE_DIR, load_model

    return load_model(), AutoTokenizer.from_pretrained(str(TINY_MOE_DIR))


def test_text_is_scored_after_the_prompt_not_after_an_end_token(shipped):
    model, tokenizer = shipped
    engine = PrefillEngine(model, tokenizer=tokenizer, compile=False)
    text = "def __init__(sel"
    ids = [b + 3 for b in text.encode()]  # ByT5: byte + 3, no </s>
    labels = tuple(tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "fx")
    scores = engine.score([
        Request(id="text", text=text, labels=("f", "x")),
        Request(id="empty", text="", labels=("f",)),
    ])  # fmt: skip
    assert scores[0].tokens == len(ids) and scores[0].error is None
    expected = eager_value(model, Request(id=0, tokens=tuple(ids), labels=labels))
    assert rel_err(scores[0].value, expected) < TOL
    assert scores[0].value[0, 0] > -0.5  # the model, trained on Python, is sure "sel" goes on with "f"
    assert scores[1].error == "empty text: nothing to score"


def test_a_tokenizer_that_adds_a_bos_token_keeps_it_and_nothing_else(model):
    class BosEosTokenizer:  # like Llama's: BOS in front, and here also an EOS behind, when special tokens are on
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            ids = [3 + ord(c) % 120 for c in text]
            return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}

    engine = PrefillEngine(model, tokenizer=BosEosTokenizer(), compile=False)
    score = engine.score([Request(id=0, text="abc", labels=(5,))])[0]
    as_ids = Request(id=0, tokens=(1, *[3 + ord(c) % 120 for c in "abc"]), labels=(5,))
    assert score.tokens == 4 and rel_err(score.value, eager_value(model, as_ids)) < TOL


def test_text_the_tokenizer_cannot_encode_is_a_per_request_error(shipped):
    model, tokenizer = shipped
    engine = PrefillEngine(model, tokenizer=tokenizer, compile=False)
    scores = engine.score([Request(id="bad", text="a\ud800b"), Request(id="ok", text="ab")])
    assert "cannot tokenize the text" in scores[0].error and scores[1].error is None


@pytest.mark.parametrize("prefix_cache_tokens", [4096, 0], ids=["prefix-cache", "no-cache"])
def test_after_warmup_serving_compiles_nothing(model, prefix_cache_tokens):
    import random

    import torch

    engine = PrefillEngine(model, token_budget=96, block_size=8, prefix_cache_tokens=prefix_cache_tokens)
    assert engine.warmup() >= 4
    assert engine.stats.requests == 0 and (engine.cache is None or not engine.cache.lookup(list(range(3, 40)), 39)[0])
    rng = random.Random(1)

    def toks(n):
        return tuple(rng.randrange(3, 128) for _ in range(n))

    prefix = toks(30)
    calls = [
        [Request(id=0, tokens=toks(2))],  # one prompt, shortest
        [Request(id=0, tokens=toks(90))],  # one prompt, long
        [Request(id=i, tokens=toks(3 + i)) for i in range(5)],
        [Request(id=i, tokens=prefix + toks(1 + i), labels=(5,)) for i in range(4)],  # a shared prefix
        [Request(id=i, tokens=prefix + toks(2 + i), read="all", output="pooled") for i in range(2)],  # cached now
        [Request(id=0, tokens=prefix + toks(17))],  # one prompt with a cached prefix
        [Request(id=i, tokens=toks(8)) for i in range(12)],  # two batches under the budget
        [Request(id=i, tokens=toks(2)) for i in range(2)],
    ]
    with torch.compiler.set_stance("fail_on_recompile"):  # any compile from here on raises
        for requests in calls:
            assert max_error(model, requests, engine.score(requests)) < TOL


def test_each_batch_graph_is_traced_once(model):
    """Under dynamic=True Dynamo would trace the model's floats (RMSNorm's eps, attention's scaling) as symbols,
    and AOTAutograd would then restart the frame's analysis to make them constants: every graph traced twice."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = PrefillEngine(model, token_budget=96, prefix_cache_tokens=0)
    requests = [Request(id=i, tokens=tuple(range(3, 9 + 2 * i)), labels=(5, 6)) for i in range(3)]
    assert max_error(model, requests, engine.score(requests)) < TOL
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["total"] == counters["aot_autograd"]["ok"] == 1, dict(counters["aot_autograd"])
