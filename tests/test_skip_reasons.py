"""A block the canonical op cannot reproduce is left alone, and the reason names the op it could not match.

The activations the op gained for issue 11 (relu², Inkling 2's softcapped SwiGLU) are found, with their
constants, where the same harness was skipped before.
"""

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
    "relu_cubed": (lambda u: F.relu(u) ** 3, False, "pow (exponent 3"),
    "gelu_squared": (lambda u: F.gelu(u) ** 2, False, "pow (exponent 2"),
    # the softcap inside the SiLU (sigmoid of the capped gate), not Inkling 2's form
    "softcapped_silu": (lambda g, u: F.silu(7.0 * torch.tanh(g / 7.0)) * u, True, "tanh (a softcap"),
    "up_only_softcap": (lambda g, u: F.silu(g) * (torch.tanh(u / 3.0) * 3.0), True, "tanh (a softcap"),
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


def _inkling_softcap(gate_cap, up_cap):
    """Inkling 2's ``Inkling2SoftcappedSwiGLU``, written out: fp32 inside, the sigmoid sees the raw gate."""

    def act(g, u):
        dtype, g, u = g.dtype, g.float(), u.float()
        return (torch.tanh(g / gate_cap) * gate_cap * torch.sigmoid(g) * (torch.tanh(u / up_cap) * up_cap)).to(dtype)

    return act


FOUND = {
    "relu2": (lambda u: F.relu(u) ** 2, False, "ReLU² (non-gated)"),
    "relu2_square": (lambda u: torch.square(F.relu(u)), False, "ReLU² (non-gated)"),
    "relu2_gated": (lambda g, u: F.relu(g) * F.relu(g) * u, True, "ReLU²-gated"),
    # caps small enough to bite on these activations, and unequal: a swapped gate/up would not verify
    "swiglu_softcap": (_inkling_softcap(0.75, 1.5), True, "softcapped SwiGLU (gate cap=0.75, up cap=1.5)"),
    "swiglu_softcap_swapped": (_inkling_softcap(1.5, 0.75), True, "softcapped SwiGLU (gate cap=1.5, up cap=0.75)"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(FOUND))
def test_new_activations_are_found_and_exact(case, dtype, one_torch_thread):
    act, gated, described = FOUND[case]
    torch.manual_seed(0)
    model = OddActivationMoE(act, gated).eval().to(dtype)
    x = torch.randn(1, 6, 32, dtype=dtype)
    report = moe_compile.explain(model, x, options={"inductor": False})
    assert report.skipped == [], report
    assert [b.activation for b in report.blocks] == [described], report
    compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 2e-2)
