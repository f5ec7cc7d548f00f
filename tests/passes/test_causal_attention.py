"""causal_attention: traced causal masks that depend only on the length become SDPA's is_causal."""

import pytest
import torch

from moe_compile.passes.causal_attention import CausalAttention, _is_causal, _sdpa_fields
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness

from .pass_testing import rel_err


def _sdpa_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def _mask_of(node: torch.fx.Node):
    fields = _sdpa_fields(node)
    return fields.get("attn_mask", fields.get("attn_bias"))


def _compile(model, calls, dynamic=None):
    """Compile with the pass alone; every call's logits against eager, fresh random ids each."""
    harness = PassHarness(CausalAttention())
    compiled = torch.compile(model, backend=harness, options={"inductor": False}, dynamic=dynamic)
    with torch.no_grad():
        for kwargs in calls:
            expected = model(**kwargs, use_cache=False).logits
            got = compiled(**kwargs, use_cache=False).logits
            assert rel_err(got, expected) < 1e-5
    return harness


def _ids(model, batch, seq, seed):
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dynamic", [False, True])
def test_length_only_causal_masks_become_is_causal(dynamic):
    model = zoo.build("qwen3_moe")
    harness = _compile(model, [{"input_ids": _ids(model, 2, 9, 0)}, {"input_ids": _ids(model, 3, 13, 1)}], dynamic)
    for gm in harness.final_graphs():
        calls = _sdpa_calls(gm)
        assert len(calls) == model.config.num_hidden_layers
        for node in calls:
            assert _mask_of(node) is None and _sdpa_fields(node)["is_causal"] is True, node.format_node()
    assert len(harness.records) == (1 if dynamic else 2)  # static: one graph per length
    for record in harness.records:
        notes = record.ctx.report.notes
        assert any("2 attention call(s) run with is_causal=True" in n for n in notes), notes


def test_near_miss_a_padding_mask_input_is_kept():
    """A caller's attention_mask is a graph input: the mask may hide tokens, so it stays."""
    model = zoo.build("qwen3_moe")
    ids = _ids(model, 2, 9, 2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    harness = _compile(model, [{"input_ids": ids, "attention_mask": mask}])
    (gm,) = harness.final_graphs()
    assert all(_mask_of(n) is not None for n in _sdpa_calls(gm))
    assert harness.record.changed["causal_attention"] is False
    assert any("keeps its mask: the mask reads the graph input" in n for n in harness.report.notes), (
        harness.report.notes
    )


def test_near_miss_a_sliding_window_is_kept():
    """A window of 4 positions: the mask equals the causal one only for short sequences, so it stays."""
    model = zoo.build("mixtral", overrides={"sliding_window": 4})
    harness = _compile(model, [{"input_ids": _ids(model, 1, 11, 3)}])
    (gm,) = harness.final_graphs()
    assert all(_mask_of(n) is not None for n in _sdpa_calls(gm))
    assert any("compares positions with the constant(s)" in n for n in harness.report.notes), harness.report.notes


def test_option_off_runs_no_such_pass():
    from moe_compile.options import Options
    from moe_compile.passes import build_pipeline

    assert any(isinstance(p, CausalAttention) for p in build_pipeline(Options()))
    assert not any(isinstance(p, CausalAttention) for p in build_pipeline(Options(causal_attention=False)))


def test_is_causal_reads_boolean_and_additive_masks():
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    additive = torch.zeros(5, 5).masked_fill(~keep, float("-inf"))
    assert (
        _is_causal(keep[None, None])
        and _is_causal(additive)
        and _is_causal(additive.clamp(min=torch.finfo(torch.float32).min))
    )
    assert not _is_causal(torch.ones(5, 5, dtype=torch.bool))  # bidirectional
    assert not _is_causal(keep & ~torch.eye(5, dtype=torch.bool))  # no diagonal
    window = keep & torch.ones(5, 5, dtype=torch.bool).triu(-1)  # a window of 2
    assert not _is_causal(window) and not _is_causal(torch.zeros(5, 5).masked_fill(~window, float("-inf")))
    assert not _is_causal(additive.masked_fill(keep, 0.5))  # a bias on kept positions
