"""PrefillEngine: batched scoring of prefill-only requests on one (compiled) model replica.

::

    engine = PrefillEngine(model, tokenizer=tok, token_budget=2048)
    scores = engine.score([Request(id="q1", text="Is the sky green? Answer:", labels=("yes", "no"))])
    scores[0].value  # [1, 2] log-probabilities of " yes" / " no" at the last position

One call of :meth:`PrefillEngine.score`:

1. **prepare** each request: tokenize, check it (empty, longer than the model takes,
   token or label ids outside the vocabulary, read positions outside the prompt), resolve
   its read positions; a bad request becomes a :class:`Score` with an ``error``.
2. **shared prefixes**: prefixes that two or more prompts share and the prefix cache does
   not hold are run first, each once, in waves (:func:`prefix_cache.shared_prefixes`).
3. **batches**: each prompt takes its longest cached prefix (whole blocks, never past its
   first read position), the rest are packed under ``token_budget``
   (:mod:`~moe_compile.serving.batching`) and the decoder runs once per batch: compiled
   with ``backend="moe_prefill"`` (``options={"inductor": False}`` on CPU by default), on
   the new tokens only, with the prefixes' keys/values as ``past_key_values``.
4. **read out**: the final hidden states of the read positions are gathered
   (``[n_read, H]``) and only they meet the LM head (:mod:`~moe_compile.serving.readout`);
   the new blocks' keys/values go into the prefix cache.

Exactness: scores equal a plain eager forward of each request alone (padding and prefix
reuse change nothing beyond float rounding), for decoders with per-token routing. Models
whose cache is not a plain per-layer key/value cache (sliding windows, linear attention,
state-space layers) run without the prefix cache; ``engine.prefix_cache_off`` says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..loading.model import experts_zeroed_if_sharded
from .batching import Batch, Row, collate, plan_batches
from .prefix_cache import BlockKV, PrefixCache, shared_prefixes
from .readout import LogitHead
from .requests import Request, Score
from .routing import reuse_limit

log = logging.getLogger(__name__)

#: tokens in the prompt that checks the serving head against the model's own logits
PROBE_TOKENS = 8


@dataclasses.dataclass
class EngineStats:
    """Counters over the engine's life."""

    requests: int = 0  # scored, errors included
    errors: int = 0
    prompt_tokens: int = 0  # of the scored requests
    cached_tokens: int = 0  # of which reused from the prefix cache
    computed_tokens: int = 0  # tokens run, shared-prefix passes included, padding excluded
    padded_tokens: int = 0  # tokens run, padding included
    batches: int = 0
    padding_batches: int = 0  # decoder calls on padding only (lockstep AEP serving: a rank with nothing to run)
    oom_batches: int = 0  # batches that ran out of device memory (their requests got the error)
    forward_s: float = 0.0  # wall time of the decoder calls

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens whose keys/values came from the prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclasses.dataclass
class PreparedRequest:
    """A checked, tokenized prompt; ``request`` is None for a shared-prefix pass (nothing read)."""

    tokens: list[int]
    limit: int  # leading tokens that may come from the cache
    request: Request | None = None
    reads: list[int] = dataclasses.field(default_factory=list)  # absolute positions
    labels: list[int] | None = None


class _FloatsSpecialized:
    """Calls a ``torch.compile(dynamic=True)`` callable with Dynamo's ``specialize_float`` on.

    Under ``dynamic=True`` Dynamo traces the model's float attributes (RMSNorm's
    ``variance_epsilon``, attention's ``scaling``) as symbolic floats; AOTAutograd's tensorify pass
    then specialises them back to constants and restarts the whole frame's analysis, so every graph
    was traced twice (Dynamo and AOTAutograd). Specialising them at once gives the same graph (the
    floats are constants either way, guarded alike) in one trace: each compile is 2-3x shorter
    (benchmarks/cold_start.py). The patch is scoped to each call, as compiling happens inside it.
    """

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(specialize_float=True):
            return self.compiled(*args, **kwargs)


class PrefillEngine:
    """Scores prefill requests on ``model`` (a transformers causal LM); see the module docstring.

    Args:
        model: a decoder-only causal LM in eval mode.
        tokenizer: turns ``text`` requests and string labels into token ids (optional).
        token_budget: padded new tokens per forward pass.
        compile: compile the decoder with ``backend="moe_prefill"``.
        options: the backend's options (default ``{"inductor": False}`` on CPU, ``{}`` elsewhere).
        prefix_cache_tokens: capacity of the prefix cache in tokens (0: no prefix cache).
        block_size: tokens per prefix-cache block (prefixes are reused in whole blocks).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        tokenizer: Any = None,
        token_budget: int = 2048,
        compile: bool = True,
        options: dict[str, Any] | None = None,
        prefix_cache_tokens: int = 65536,
        block_size: int = 16,
    ) -> None:
        config = model.config.get_text_config()
        if model.config.is_encoder_decoder:
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; the engine serves decoders")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.device = next(model.parameters()).device
        self.decoder = model.get_decoder()
        if compile:
            options = options if options is not None else ({"inductor": False} if self.device.type == "cpu" else {})
            # dynamic: one graph for every batch shape (batching.collate keeps sizes >= 2), not a static one first
            compiled = torch.compile(self.decoder, backend="moe_prefill", options=options, dynamic=True)
            self._decoder = _FloatsSpecialized(compiled)
        else:
            self._decoder = self.decoder
        self.head = LogitHead(model)
        self.vocab_in = model.get_input_embeddings().num_embeddings
        self.vocab_out = self.head.weight.shape[0]
        self.max_tokens: int | None = getattr(config, "max_position_embeddings", None)
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.prefix_cache_off = self._prefix_cache_off(prefix_cache_tokens)
        self.cache = None if self.prefix_cache_off else PrefixCache(prefix_cache_tokens, block_size)
        self.stats = EngineStats()
        self._kv_template = self._check_head()  # per layer ([Hkv, 0, Dk], [Hkv, 0, Dv])
        #: how ``auto`` sizes were chosen (:func:`moe_compile.serving.sizing.resolve`), or None
        self.sizing: dict[str, Any] | None = None

    # -- public ------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the prefix cache and zero the counters (the compiled decoder is kept)."""
        if self.cache is not None:
            self.cache = PrefixCache(self.cache.capacity_tokens, self.cache.block_size)
        self.stats = EngineStats()

    def resize(self, token_budget: int, prefix_cache_tokens: int) -> None:
        """Set the token budget and the prefix cache's capacity (emptied; 0: off) before serving."""
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.token_budget = token_budget
        if self.cache is not None:
            block = self.cache.block_size
            self.cache = PrefixCache(prefix_cache_tokens, block) if prefix_cache_tokens > 0 else None
            if self.cache is None:
                self.prefix_cache_off = "prefix_cache_tokens is 0"

    @torch.no_grad()
    def warmup(self) -> int:
        """Run every kind of batch this engine will run, so that serving compiles nothing more.

        The compiled decoder takes one graph for batches of two or more prompts and one for a
        batch of a single prompt (Dynamo specialises size 1), each with and without cached
        prefixes; sizes are dynamic, so these serve every length. Warm-up runs each kind on
        random prompts of sizes that differ from each other and from the model's own sizes
        (no coincidental size equality gets baked into a graph), then empties the prefix
        cache and zeroes the counters. Returns the number of decoder calls it made.
        """
        limit = self.max_tokens or 4 * self.token_budget
        block = self.cache.block_size if self.cache is not None else 16
        gen = torch.Generator().manual_seed(0)

        def prompt(n: int) -> tuple[int, ...]:
            low = min(3, self.vocab_in - 1)
            return tuple(torch.randint(low, self.vocab_in, (max(2, min(n, limit)),), generator=gen).tolist())

        # a batch of three (or two) prompts of distinct lengths that fits the token budget together
        rows = 3 if self.token_budget >= 3 * 4 else 2
        longest = max(2, min(2 * block + 13, self.token_budget // rows))
        shared = prompt(2 * block + 3)
        groups = [
            [prompt(2 * block + 5)],  # one prompt alone
            [prompt(max(2, longest - 2 * i)) for i in range(rows)],  # several in one batch
            [shared + prompt(5), shared + prompt(9), shared + prompt(3)],  # a shared prefix (computed once)
        ]
        batches = self.stats.batches
        for _ in range(2):  # the second time, with the prompts' prefixes in the cache
            for group in groups:
                self.score([Request(id=i, tokens=tokens) for i, tokens in enumerate(group)])
        calls = self.stats.batches - batches
        self.reset()
        return calls

    def prepare(self, request: Request) -> PreparedRequest | Score:
        """Tokenize and check ``request``: the prepared prompt, or a :class:`Score` with the error."""

        def fail(message: str) -> Score:
            return Score(id=request.id, output=request.output, error=message)

        if request.text is not None:
            if self.tokenizer is None:
                return fail("the request has 'text' but the engine has no tokenizer; send 'tokens'")
            if not request.text:
                return fail("empty text: nothing to score")
            try:
                tokens = self._encode_prompt(request.text)
            except Exception as e:  # noqa: BLE001  (a tokenizer's own error, e.g. text it cannot encode)
                return fail(f"cannot tokenize the text: {type(e).__name__}: {e}")
            if not tokens:
                return fail("empty text: the tokenizer gives no tokens")
        else:
            tokens = list(request.tokens)
        n = len(tokens)
        if n == 0:
            return fail("empty request: no tokens")
        if self.max_tokens is not None and n > self.max_tokens:
            return fail(f"too long: {n} tokens, the model takes at most {self.max_tokens}")
        bad = next((t for t in tokens if not 0 <= t < self.vocab_in), None)
        if bad is not None:
            return fail(f"token id {bad} is outside the vocabulary [0, {self.vocab_in})")
        reads = list(range(n)) if request.read == "all" else [p + n if p < 0 else p for p in request.read]
        positions = () if request.read == "all" else zip(request.read, reads, strict=True)
        bad = next((p for p, a in positions if not 0 <= a < n), None)
        if bad is not None:
            return fail(f"read position {bad} is outside the prompt of {n} tokens")
        labels = None
        if request.labels is not None:
            labels = []
            for label in request.labels:
                label_id = self._label_id(label)
                if isinstance(label_id, str):
                    return fail(label_id)
                labels.append(label_id)
        return PreparedRequest(tokens, reuse_limit(n, min(reads)), request, reads, labels)

    @torch.no_grad()
    def score(self, requests: Iterable[Request]) -> list[Score]:
        """Scores of ``requests``, in order (see the module docstring for the steps)."""
        requests = list(requests)
        scores: list[Score | None] = [None] * len(requests)
        items: list[PreparedRequest] = []
        where: list[int] = []
        for i, request in enumerate(requests):
            prepared = self.prepare(request)
            if isinstance(prepared, Score):
                scores[i] = prepared
            else:
                items.append(prepared)
                where.append(i)
        if self.cache is not None:
            for wave in shared_prefixes([it.tokens for it in items], [it.limit for it in items], self.cache):
                self._run([PreparedRequest(tokens, len(tokens) - 1) for tokens in wave])
        for i, score in zip(where, self._run(items), strict=True):
            scores[i] = score
        self.stats.requests += len(requests)
        self.stats.errors += sum(s.error is not None for s in scores)
        for item in items:
            self.stats.prompt_tokens += len(item.tokens)
        for i in where:
            self.stats.cached_tokens += scores[i].cached_tokens
        return scores

    @torch.no_grad()
    def pad_forward(self, decoder: Any = None) -> None:
        """One decoder call on a minimal padding batch (two rows of two padding tokens); nothing is read or stored.

        Lockstep AEP serving (:mod:`~moe_compile.serving.aep`) runs it on a rank that has no
        batch of its own while another rank runs one: every rank must call the compiled
        decoder equally often, so that the collectives inside it pair up.
        """
        rows = [Row([self.pad_id] * 2), Row([self.pad_id] * 2)]  # B >= 2: the graph real batches use
        batch = collate(rows, self.pad_id, self._kv_template if self.cache is not None else None)
        cache = None
        if batch.past is not None:
            cache = DynamicCache(config=self.model.config)
            for layer, (k, v) in enumerate(batch.past):
                cache.update(k, v, layer)  # [B, Hkv, P, D]
        (decoder if decoder is not None else self._decoder)(
            input_ids=batch.input_ids.to(self.device),  # [2, 2]
            attention_mask=batch.attention_mask.to(self.device),
            position_ids=batch.position_ids.to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        self.stats.padding_batches += 1

    # -- batches -----------------------------------------------------------------------------------------------

    def _run(self, items: list[PreparedRequest]) -> list[Score | None]:
        """Run ``items`` in batches; their scores (None for shared-prefix passes)."""
        joined: dict[int, BlockKV] = {}  # one concatenated prefix per cached chain, shared by its rows
        rows = []
        for item in items:
            cached, kv = self.cache.lookup(item.tokens, item.limit, joined) if self.cache else (0, None)
            rows.append(Row(item.tokens, cached, kv))
        scores: list[Score | None] = [None] * len(items)
        for members in plan_batches(rows, self.token_budget):
            batch_rows, batch_items = [rows[i] for i in members], [items[i] for i in members]
            out = None
            with contextlib.suppress(torch.OutOfMemoryError):  # torch.cuda's too: this batch fails, the rest run
                out = self._forward(batch_rows, batch_items)
            if out is None:  # out of memory; here its traceback, and with it the batch's tensors, are gone
                out = self._out_of_memory(batch_rows, batch_items)
            for i, score in zip(members, out, strict=True):
                scores[i] = score
        return scores

    def _out_of_memory(self, rows: list[Row], items: list[PreparedRequest]) -> list[Score | None]:
        """The errors of a batch that ran out of device memory; the allocator's cached blocks are freed."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_batches += 1
        padded = len(rows) * max(r.new for r in rows)
        cached = sum(r.cached for r in rows)
        message = (f"out of device memory running this request's batch ({len(rows)} prompts, {padded} padded tokens, "
                   f"{cached} cached prefix tokens); the server goes on serving: retry, or lower --token-budget "
                   f"(now {self.token_budget}) or --prefix-cache-tokens")  # fmt: skip
        log.warning("a batch ran out of device memory: %s", message)
        return [None if it.request is None else
                Score(it.request.id, it.request.output, error=message, out_of_memory=True) for it in items]  # fmt: skip

    def _forward(self, rows: list[Row], items: list[PreparedRequest]) -> list[Score | None]:
        """One decoder call on a batch; store its new blocks, read its outputs."""
        batch = collate(rows, self.pad_id, self._kv_template if self.cache is not None else None)
        cache = None
        if batch.past is not None:
            cache = DynamicCache(config=self.model.config)
            for layer, (k, v) in enumerate(batch.past):
                cache.update(k, v, layer)  # [B, Hkv, P, D]
        start = time.perf_counter()
        out = self._decoder(
            input_ids=batch.input_ids.to(self.device),  # [B, S]
            attention_mask=batch.attention_mask.to(self.device),  # [B, P + S]
            position_ids=batch.position_ids.to(self.device),  # [B, S]
            past_key_values=cache,
            use_cache=cache is not None,
        )
        hidden = out.last_hidden_state  # [B, S, H]
        self.stats.forward_s += time.perf_counter() - start
        self.stats.batches += 1
        self.stats.padded_tokens += batch.padded_tokens
        self.stats.computed_tokens += sum(r.new for r in rows)
        if cache is not None:
            self._store(rows, batch, out.past_key_values)
        return self._read(rows, items, hidden)

    def _store(self, rows: list[Row], batch: Batch, past: DynamicCache) -> None:
        """Put the whole blocks each row computed into the prefix cache."""
        block = self.cache.block_size
        layers = [(layer.keys, layer.values) for layer in past.layers]  # per layer [B, Hkv, P + S, D]
        for b, row in enumerate(rows):
            first = row.cached // block  # cached prefixes are whole blocks
            values = []
            for j in range(first, len(row.tokens) // block):
                slot = batch.prefix_len + j * block - row.cached
                values.append([(k[b, :, slot : slot + block].clone(), v[b, :, slot : slot + block].clone())
                               for k, v in layers])  # fmt: skip  # per layer [Hkv, block, D]
            if values:
                self.cache.insert(row.tokens, values, first_block=first)

    def _read(self, rows: list[Row], items: list[PreparedRequest], hidden: torch.Tensor) -> list[Score | None]:
        """The outputs of each request: only the read rows of ``hidden [B, S, H]`` meet the head."""
        B, S, H = hidden.shape
        index = [
            b * S + a - row.cached for b, (row, item) in enumerate(zip(rows, items, strict=True)) for a in item.reads
        ]
        read = hidden.reshape(B * S, H)[torch.tensor(index, dtype=torch.long, device=hidden.device)]  # [n_read, H]
        is_label = [item.request is not None and item.request.output == "labels" for item in items]
        offsets = [0]
        for item in items:
            offsets.append(offsets[-1] + len(item.reads))
        mask = torch.tensor(
            [lab for item, lab in zip(items, is_label, strict=True) for _ in item.reads], dtype=torch.bool
        )
        lse = torch.full((len(index),), float("nan"))  # [n_read]; filled for label rows only
        if mask.any():
            lse[mask] = self.head.log_normaliser(read[mask.to(read.device)]).cpu()
        scores: list[Score | None] = []
        for item, row, (lo, hi) in zip(items, rows, itertools.pairwise(offsets), strict=True):
            if item.request is None:
                scores.append(None)
                continue
            h = read[lo:hi]  # [n_read_i, H]
            kind = item.request.output
            if kind == "labels":
                labels = torch.tensor(item.labels, device=h.device)
                value = self.head.label_logits(h, labels).cpu() - lse[lo:hi, None]  # [n_read_i, L]
            elif kind == "logits":
                value = self.head.logits(h).cpu()  # [n_read_i, V]
            else:
                value = h.float().mean(dim=0).cpu()  # [H]
            scores.append(Score(item.request.id, kind, value, item.reads, item.labels, len(item.tokens), row.cached))
        return scores

    # -- setup -------------------------------------------------------------------------------------------------

    def _encode_prompt(self, text: str) -> list[int]:
        """``text`` as a causal-LM prompt: its tokens, after a BOS only where the tokenizer adds one.

        Never an end-of-sequence token (a seq2seq tokenizer such as ByT5 appends ``</s>`` when asked
        for special tokens; the default read position -1 must read after the prompt itself).
        """
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and (not ids or ids[0] != bos):
            with_special = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(with_special) and with_special[0] == bos:
                ids.insert(0, bos)
        return ids

    def _label_id(self, label: int | str) -> int | str:
        """The token id of ``label``, or an error message."""
        if isinstance(label, int):
            if not 0 <= label < self.vocab_out:
                return f"unknown label token {label}: outside the vocabulary [0, {self.vocab_out})"
            return label
        if self.tokenizer is None:
            return f"label {label!r} is text but the engine has no tokenizer; send token ids"
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            return f"label {label!r} is not one token: it encodes to {ids}"
        return ids[0]

    def _prefix_cache_off(self, capacity: int) -> str | None:
        """Why the prefix cache cannot be used, or None."""
        if capacity <= 0:
            return "prefix_cache_tokens is 0"
        layers = DynamicCache(config=self.model.config).layers
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        if odd or not layers:
            return f"the model's cache has {', '.join(odd) or 'no'} layers, not plain key/value layers"
        return None

    @torch.no_grad()
    def _check_head(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Check that the serving head reproduces the model's logits (eager, on a probe prompt).

        Returns the empty per-layer key/value tensors ``[Hkv, 0, D]`` of the probe's cache (the
        shapes a batch cache needs), or None without a prefix cache.
        """
        n = min(PROBE_TOKENS, self.max_tokens or PROBE_TOKENS)
        probe = (torch.arange(n, device=self.device) * 7 + 3) % self.vocab_in  # [n]
        # a sharded load (moe_compile.loading) cannot run its experts eagerly: they give zeros here, which the
        # head's check and the cache's shapes do not depend on
        with experts_zeroed_if_sharded(self.model):
            out = self.decoder(input_ids=probe[None], use_cache=self.cache is not None)
            self.head.check(self.model, out.last_hidden_state, probe[None])  # hidden [1, n, H]
        if self.cache is None:
            return None
        return [(layer.keys[0, :, :0], layer.values[0, :, :0]) for layer in out.past_key_values.layers]
