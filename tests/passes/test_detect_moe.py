"""detect_moe: finds MoE blocks by data flow (analysis only: the graph is not changed)."""

import torch
from custom_moe import TinyLM

from moe_compile.passes.detect_moe import DetectMoE
from moe_compile.testing import zoo
from moe_compile.testing.pass_harness import PassHarness, op_counts

from .pass_testing import run


def test_finds_each_block_and_its_parts():
    torch.manual_seed(0)
    harness = run(PassHarness(DetectMoE()), TinyLM(layers=2).eval(), torch.randint(0, 64, (2, 5)))
    record = harness.record
    matches = record.ctx.detected.matches
    assert [(m.num_experts, m.top_k, m.hidden_size, m.intermediate_size) for m in matches] == [(4, 2, 32, 16)] * 2
    assert [m.path for m in matches] == ["blocks.0", "blocks.1"]
    assert all(m.source == "batched" and m.candidates[0].activation == "silu" for m in matches)
    assert record.changed == {"detect_moe": False} and op_counts(record.after) == op_counts(record.before)


def test_near_miss_input_scaled_by_routing_weights_is_reported_not_matched():
    """Llama 4 style: the routing weights scale the experts' input, so the block is another function."""
    torch.manual_seed(0)
    harness = run(PassHarness(DetectMoE()), TinyLM(weight_input=True).eval(), torch.randint(0, 64, (2, 5)))
    assert harness.record.ctx.detected.matches == []
    assert [s.where for s in harness.report.skipped] == ["blocks.0", "blocks.1"]
    assert all("input is scaled before the experts" in s.reason for s in harness.report.skipped)


def test_dense_model_has_nothing_to_find():
    model = zoo.build_dense()
    harness = run(PassHarness(DetectMoE()), model, zoo.make_inputs(model, seq=4))
    assert harness.record.ctx.detected.matches == [] and harness.report.skipped == []


def test_a_batched_input_is_not_taken_for_expert_weights():
    """A graph whose input is the hidden states [B, S, H] (a MoE layer compiled alone, or a graph after a break):
    with B >= 2 the input is 3-D like an expert weight [E, ., .], but it is flattened across its first dimension
    before any matmul, so it is no expert weight and must neither be paired with the experts' matmuls nor hide them."""
    from custom_moe import CustomMoE

    for batch in (2, 4):  # 4: as many rows as the layer has experts
        torch.manual_seed(0)
        harness = run(PassHarness(DetectMoE()), CustomMoE().eval(), torch.randn(batch, 5, 32))
        matches = harness.record.ctx.detected.matches
        assert [(m.num_experts, m.top_k, m.hidden_size, m.intermediate_size) for m in matches] == [(4, 2, 32, 16)]
        assert harness.report.skipped == [], harness.report.skipped


class _TableRowExperts(torch.nn.Module):
    """Doge-style retrieval experts: top-k ids pick rank-1 experts out of two embedding tables."""

    def __init__(self, hidden=16, experts=8, k=2):
        super().__init__()
        self.k = k
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.down_embed = torch.nn.Embedding(experts, hidden)
        self.up_embed = torch.nn.Embedding(experts, hidden)

    def forward(self, x_TH):
        w_TK, ids_TK = self.router(x_TH).softmax(-1).topk(self.k, dim=-1)
        h_TK = torch.matmul(self.down_embed(ids_TK), x_TH.unsqueeze(-1)).squeeze(-1)
        return torch.matmul((torch.relu(h_TK) * w_TK).unsqueeze(1), self.up_embed(ids_TK)).squeeze(1)


def test_experts_stored_as_table_rows_are_named_not_passed_over():
    torch.manual_seed(0)
    harness = run(PassHarness(DetectMoE()), _TableRowExperts().eval(), torch.randn(6, 16))
    assert harness.record.ctx.detected.matches == []
    [skipped] = harness.report.skipped
    assert "experts stored as table rows" in skipped.reason, skipped
    assert "down_embed.weight and up_embed.weight" in skipped.reason and skipped.where == "<model>", skipped
