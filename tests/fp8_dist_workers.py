"""Workers of the multi-rank fp8 tests (run by ``dist_workers.spawn`` in gloo groups)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_aep_worker(rank: int, world_size: int, overrides: dict) -> dict:
    """A tiny fp8 Qwen3-MoE under AEP against the same model on this rank alone; gathered bytes vs bf16's."""
    import moe_compile
    from moe_compile.testing import zoo
    from moe_compile.testing.fp8 import quantize_model

    out = {}
    model = zoo.build("qwen3_moe", dtype=torch.bfloat16, seed=0, overrides=overrides)  # same weights on every rank
    fp8, _ = quantize_model(model)
    moe_compile.prepare(fp8)
    batch = zoo.make_inputs(model, batch=2, seq=5 + rank, seed=100 + rank)  # each rank its own requests
    for name, m in (("fp8", fp8), ("bf16", model)):
        torch._dynamo.reset()
        with torch.no_grad():
            expected = zoo.logits(m, batch)  # single rank, eager (fp8: the torch W8A8 emulation)
            compiled = torch.compile(m, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
            with moe_compile.backend.collect_reports() as report:
                got = zoo.logits(compiled, batch)
        out[name] = {
            "error": rel_err(got, expected),
            "equal": bool(torch.equal(got, expected)),
            "blocks": [(b.path, b.quantization) for b in report.blocks],
            "gather_bytes": [b.schedule.get("gather_bytes") for b in report.blocks],
            "skipped": [(s.where, s.reason) for s in report.skipped],
        }
    torch._dynamo.reset()  # EP: the AllToAll runtime has no fp8 path; the blocks stay replicated, named in the report
    fp8, _ = quantize_model(zoo.build("qwen3_moe", dtype=torch.bfloat16, seed=0, overrides=overrides))  # AEP released
    moe_compile.prepare(fp8)
    with torch.no_grad():
        expected = zoo.logits(fp8, batch)
        compiled = torch.compile(fp8, backend="moe_prefill", options={"parallel": "ep", "inductor": False})
        with moe_compile.backend.collect_reports() as report:
            got = zoo.logits(compiled, batch)
    out["ep"] = {"equal": bool(torch.equal(got, expected)), "skipped": [s.reason for s in report.skipped]}
    return out
