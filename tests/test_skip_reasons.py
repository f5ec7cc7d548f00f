"""A block the canonical op cannot reproduce is left alone, and the reason names the op it could not match."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import moe_compile


class OddActivationMoE(nn.Module):
    """Top-2 MoE whose experts' activation is ``act`` (gated: ``act(gate, up)``, else ``act(up)``)."""

    def __init__(self, act, gated, hidden=32, inter=8, experts=4):
        super().__init__()
        self.act, self.gated = act, gated
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, (2 if gated else 1) * inter, hidden) * 0.2)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)

    def forward(self, x_BSH):
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        w_TK, ids_TK = self.router(x_TH).softmax(-1).topk(2, dim=-1)
        ids_P = ids_TK.reshape(-1)
        x_PH = x_TH.repeat_interleave(2, dim=0)
        up_PN = torch.bmm(self.w_up[ids_P], x_PH.unsqueeze(-1)).squeeze(-1)
        h_PI = self.act(*up_PN.chunk(2, dim=-1)) if self.gated else self.act(up_PN)
        y_PH = torch.bmm(self.w_down[ids_P], h_PI.unsqueeze(-1)).squeeze(-1) * w_TK.reshape(-1, 1)
        return y_PH.view(-1, 2, H).sum(dim=1).view(B, S, H)


CASES = {
    "relu_squared": (lambda u: F.relu(u) ** 2, False, "relu²"),
    "softcapped_swiglu": (lambda g, u: F.silu(7.0 * torch.tanh(g / 7.0)) * u, True, "tanh (a softcap"),
    "erf_gated": (lambda g, u: torch.erf(g) * u, True, "erf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unmatched_activation_is_named(case, one_torch_thread):
    act, gated, cause = CASES[case]
    torch.manual_seed(0)
    model = OddActivationMoE(act, gated).eval()
    x = torch.randn(1, 6, 32)  # batch 1: an input [B >= 2, S, H] would pass for expert weights [E, ., .]
    report = moe_compile.explain(model, x, options={"inductor": False})
    assert report.blocks == [], report
    assert len(report.skipped) == 1, report
    reason = report.skipped[0].reason
    assert cause in reason and "best rel err" in reason, reason
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-6  # left alone: still exact
