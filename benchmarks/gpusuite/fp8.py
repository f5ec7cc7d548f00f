"""The ``fp8`` section (issue #22): the block-fp8 expert layer's kernel rows and an fp8 end-to-end prefill.

Kernel rows: ``benchmarks/fp8_gemm.py``'s ``bench_fp8`` (Triton fp8 vs Triton bf16 vs ``torch._grouped_mm`` bf16,
TFLOP/s) on the Qwen3-30B-A3B, Qwen3-235B-A22B and DeepSeek-V3 expert shapes at :data:`FP8_TOKENS`; the relative
error of the fp8 layer against the torch W8A8 emulation (``moe_fp8_torch``) at the smallest token count (the
emulation loops over experts and K blocks). End to end: a tiny-depth Qwen3-MoE-shaped model whose experts are
transformers' ``FP8Experts`` (:func:`moe_compile.testing.fp8.quantize_model`, attention kept bf16), prepared and
compiled with ``moe_prefill``, timed against the same model in bf16 compiled alike; its last-token logits against
the eager emulation, compiled without Inductor (the exactness check) and as timed (a figure).
The smoke run: the tiny ``grouped_gemm.SMOKE`` shape and the tiny zoo Qwen3-MoE, Triton under the interpreter.
"""

from __future__ import annotations

import time

from .common import Section

#: token counts of the kernel rows (the targets' two sizes)
FP8_TOKENS = [512, 16384]
SMOKE_TOKENS = [8, 16]
#: the issue's acceptance tolerance: fp8 against the torch W8A8 emulation, relative (Frobenius)
FP8_TOL = 1e-2
#: what stays bf16 in the fp8 model besides lm_head (transformers' patterns match names' suffixes)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
#: the end-to-end token counts: one (a static compile per count, three compiles each; the prefill section has 4k)
E2E_TOKENS = [16384]
#: share of the section's budget kept for the end-to-end rows
E2E_SHARE = 0.55


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_fp8(s: Section) -> None:
    import fp8_gemm
    import grouped_gemm as gg
    import torch

    smoke = s.opts.cpu_smoke
    if smoke:
        device, dtype, shapes, tokens = "cpu", torch.float32, [gg.SMOKE], SMOKE_TOKENS
    else:
        device, dtype = "cuda", torch.bfloat16
        shapes, tokens = [gg.MODELS[m] for m in fp8_gemm.FP8_MODELS], FP8_TOKENS
    rows: list[dict] = []
    mismatches: list[str] = []
    s.result.update(dtype=str(dtype).removeprefix("torch."), rows=rows, tolerance=FP8_TOL, mismatches=mismatches)
    reserve = E2E_SHARE * s.remaining()
    plan = [(shape, T) for shape in shapes for T in tokens]
    for done, (shape, T) in enumerate(plan):
        if rows and s.remaining() - reserve < 1.5 * s.result["seconds_per_row"]:
            s.notes.append(f"out of budget: {len(plan) - done} kernel row(s) not measured")
            break
        start = time.time()
        torch.manual_seed(0)
        r = fp8_gemm.bench_fp8(shape, T, "uniform", device, dtype, check=tokens[0] == T)
        row = {"model": shape.name, "E": shape.E, "H": shape.H, "I": shape.I, "K": shape.K, "tokens": T, **r}
        row["fp8_vs_bf16"] = r["fp8_tflops"] / r["bf16_tflops"]
        row["fp8_vs_grouped_mm"] = r["fp8_tflops"] / r["grouped_mm_tflops"]
        row["rel_err"] = None if r["rel_err"] != r["rel_err"] else r["rel_err"]  # NaN (not checked) -> None
        rows.append(row)
        if row["rel_err"] is not None and not row["rel_err"] < FP8_TOL:
            mismatches.append(f"{shape.name} {T} tokens: fp8 layer vs emulation relative error {row['rel_err']:.2e}")
        s.result["seconds_per_row"] = max(s.result.get("seconds_per_row") or 0, time.time() - start)
        err = "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
        print(
            f"fp8 {shape.name} {T} tokens: fp8 {r['fp8_tflops']:.3g} bf16 {r['bf16_tflops']:.3g} grouped_mm "
            f"{r['grouped_mm_tflops']:.3g} TFLOP/s, fp8/bf16 {row['fp8_vs_bf16']:.2f}, rel err {err}",
            flush=True,
        )
        s.save()
        if device == "cuda":
            torch.cuda.empty_cache()
    e2e_ok = _run_e2e(s, smoke)
    status = "failed" if mismatches else ("partial" if len(rows) < len(plan) or not e2e_ok else "ok")
    s.save(status, error="; ".join(mismatches) or None)


def _e2e_model(smoke: bool):
    """``(bf16 model, fp8 model, sequence length, what it is)``: experts in fp8, the rest bf16."""
    import prefill as pf
    import torch
    import transformers

    import moe_compile
    from moe_compile.testing import zoo
    from moe_compile.testing.fp8 import quantize_model

    torch.manual_seed(0)
    if smoke:  # hidden 160: a full and a partial 128-block; I = 72: gate and up one partial block row each
        overrides = {"hidden_size": 160, "moe_intermediate_size": 72}
        model = zoo.build("qwen3_moe", dtype=torch.bfloat16, seed=0, num_layers=2, overrides=overrides)
        seq, what = 16, "tiny zoo qwen3_moe (hidden 160, I 72), 2 layers, bf16"
    else:
        config = transformers.Qwen3MoeConfig(num_hidden_layers=2, **pf.QWEN3_30B_A3B)
        with torch.device("cuda"):
            model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
        seq, what = 4096, "Qwen3-30B-A3B layer shapes, 2 layers, random weights, bf16"
    fp8, _ = quantize_model(model, keep=("lm_head", *ATTENTION))
    moe_compile.prepare(fp8)
    return model, fp8, seq, what


def _run_e2e(s: Section, smoke: bool) -> bool:
    """The end-to-end rows; False when the budget left none to measure."""
    import prefill as pf
    import torch

    import moe_compile
    from moe_compile.quant.prepare_fp8 import BlockFP8Linear, fp8_bytes
    from moe_compile.testing.fp8 import expert_param_bytes

    if s.remaining() < 10:
        s.notes.append("out of budget: the end-to-end fp8 prefill was not run")
        return False
    model, fp8, seq, what = _e2e_model(smoke)
    tokens = [16] if smoke else E2E_TOKENS
    options = {"kernels": "triton"} if smoke else {}  # the GPU's defaults: Triton kernels, Inductor
    e2e: dict = {"model": what, "seq": seq, "options": options, "rows": [], "tolerance": FP8_TOL}
    e2e["expert_bytes"] = {"bf16": expert_param_bytes(model), **{f"fp8_{k}": v for k, v in fp8_bytes(fp8).items()}}
    e2e["dense_fp8_layers"] = sum(isinstance(m, BlockFP8Linear) for m in fp8.modules())  # 0: experts only
    s.result["e2e"] = e2e
    contenders = {}
    for name, m in (("bf16", model), ("fp8", fp8)):
        contenders[name] = torch.compile(m, backend="moe_prefill", options=options, dynamic=False)
    exact = torch.compile(fp8, backend="moe_prefill", options={**options, "inductor": False}, dynamic=False)
    device = next(model.parameters()).device
    total = tokens[0]
    ids = torch.randint(0, model.config.vocab_size, (max(1, total // seq), min(seq, total)), device=device)
    kwargs = {"use_cache": False, "logits_to_keep": 1}
    with torch.no_grad():
        emulated = fp8(ids, **kwargs).logits  # eager: the torch W8A8 emulation ops
        got = exact(ids, **kwargs).logits
        timed = contenders["fp8"](ids, **kwargs).logits
        report = moe_compile.last_report()
        bf16 = contenders["bf16"](ids, **kwargs).logits
    quantized = [b for b in (report.blocks if report else []) if (b.quantization or "").startswith("fp8")]
    e2e["fp8_blocks"] = len(quantized)  # blocks rewritten with fp8 experts (the report's quantization field)
    e2e["quantization"] = sorted({b.quantization for b in quantized})
    e2e["rel_err"] = _rel(got, emulated)  # compiled (no Inductor) vs the eager emulation
    e2e["rel_err_timed"] = _rel(timed, emulated)  # as timed (Inductor on the GPU recomputes the bf16 rest)
    e2e["rel_vs_bf16"] = _rel(timed, bf16)  # the quantization's effect on the logits, not an error
    e2e["exact"] = e2e["rel_err"] < FP8_TOL
    print(
        f"fp8 e2e: {e2e['fp8_blocks']} fp8 blocks; rel err vs emulation {e2e['rel_err']:.1e} (timed "
        f"{e2e['rel_err_timed']:.1e}), vs bf16 {e2e['rel_vs_bf16']:.1e}",
        flush=True,
    )
    if not e2e["exact"]:
        s.result["mismatches"].append(f"e2e: compiled fp8 vs emulation relative error {e2e['rel_err']:.2e}")
    if not e2e["fp8_blocks"]:
        s.result["mismatches"].append("e2e: moe_prefill rewrote no fp8 block")
    s.save()

    def on_row(row: dict) -> None:
        e2e["rows"].append(row)
        print(f"fp8 e2e {row['tokens']} tokens {row['variant']}: {row['tokens_per_s']:.0f} tokens/s", flush=True)
        s.save()

    warmup, iters = (0, 1) if smoke else (2, 5)  # the smoke's one shape is compiled and run above already
    pf.measure(model, contenders, tokens, seq, warmup=warmup, iters=iters, on_row=on_row, logits_to_keep=1)
    return True
