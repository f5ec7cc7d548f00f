"""The targets of the kernels issue, evaluated on the gemm and prefill rows (:func:`evaluate_targets`), and those of
the fp8 issue (#22) on the fp8 rows (:func:`evaluate_fp8_targets`)."""

from __future__ import annotations

import dataclasses

from .common import TOKENS
from .fp8 import FP8_TOKENS


@dataclasses.dataclass
class Target:
    name: str
    measured: str  # what was measured, as text
    threshold: str
    status: str  # "pass", "miss", "n/a" (not measured, or meaningless on this run)
    detail: str = ""


def evaluate_targets(gemm_rows: list[dict], prefill_rows: list[dict], smoke: bool) -> list[Target]:
    """The kernels issue's targets against the measured rows (worst case over the rows each target covers)."""
    targets: list[Target] = []

    def add(name: str, ratios: list[tuple[float, str]], threshold: float, text: str) -> None:
        if not ratios:
            targets.append(Target(name, "-", text, "n/a", "not measured"))
            return
        worst, where = min(ratios)
        status = "n/a" if smoke else ("pass" if worst >= threshold else "miss")
        detail = f"worst: {where}" + ("; cpu-smoke: figures meaningless" if smoke else "")
        targets.append(Target(name, f"{worst:.2f}x", text, status, detail))

    rows = [r for r in gemm_rows if r.get("triton_tflops")]
    add(
        "Triton MoE >= torch._grouped_mm, every shape",
        [(r["triton_tflops"] / r["grouped_mm_tflops"], _gemm_where(r)) for r in rows],
        1.0,
        ">= 1.00x",
    )
    big = max((r["tokens"] for r in rows), default=None) if smoke else TOKENS[-1]  # the smoke has one tiny size
    add(
        f"Triton MoE >= 60% of dense bf16 at {big} tokens",
        [(r["triton_tflops"] / r["dense_tflops"], _gemm_where(r)) for r in rows if r["tokens"] == big],
        0.6,
        ">= 0.60x",
    )
    for other, threshold in (("eager", 1.3), ("inductor", 1.15)):
        ratios = []
        for tokens in sorted({r["tokens"] for r in prefill_rows}):
            by = {r["variant"]: r for r in prefill_rows if r["tokens"] == tokens}
            if "moe_prefill" in by and other in by:
                ratios.append((by["moe_prefill"]["tokens_per_s"] / by[other]["tokens_per_s"], f"{tokens} tokens"))
        add(f"end-to-end moe_prefill >= {threshold}x {other}", ratios, threshold, f">= {threshold:.2f}x")
    return targets


def _gemm_where(r: dict) -> str:
    return f"{r['model']} {r['tokens']} tokens {r['routing']}"


def evaluate_fp8_targets(fp8_rows: list[dict], smoke: bool) -> list[Target]:
    """Issue #22's targets on the fp8 kernel rows: fp8/bf16 Triton >= 1.3x at 16k tokens, >= 1.5x at 512 (worst
    shape); stretch: the best fp8 row at 16k tokens >= 700 TFLOP/s. The smoke's two tiny sizes stand in."""
    rows = [r for r in fp8_rows if r.get("fp8_tflops")]
    sizes = sorted({r["tokens"] for r in rows}) if smoke else FP8_TOKENS
    small, big = (sizes[0], sizes[-1]) if sizes else (None, None)
    targets = []
    for T, threshold in ((big, 1.3), (small, 1.5)):
        ratios = [(r["fp8_tflops"] / r["bf16_tflops"], f"{r['model']} {T} tokens") for r in rows if r["tokens"] == T]
        name = f"fp8 Triton >= {threshold}x bf16 Triton at {T} tokens"
        targets.append(_judge(name, min(ratios) if ratios else None, threshold, f">= {threshold:.2f}x", "x", smoke))
    best = [(r["fp8_tflops"], f"{r['model']} {big} tokens") for r in rows if r["tokens"] == big]
    targets.append(_judge("stretch: fp8 Triton >= 700 TFLOP/s (best shape)", max(best) if best else None, 700.0,
                          ">= 700 TFLOP/s", " TFLOP/s", smoke, "best"))  # fmt: skip
    return targets


def _judge(name, value, threshold, text, unit, smoke, which="worst") -> Target:
    if value is None:
        return Target(name, "-", text, "n/a", "not measured")
    measured, where = value
    status = "n/a" if smoke else ("pass" if measured >= threshold else "miss")
    detail = f"{which}: {where}" + ("; cpu-smoke: figures meaningless" if smoke else "")
    return Target(name, f"{measured:.2f}{unit}" if unit == "x" else f"{measured:.0f}{unit}", text, status, detail)
