"""The markdown summary of a run (:func:`render_summary`), ready to paste into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["-" * max(3, len(h)) for h in header]
    rule = [(":" + r[1:]) if a == "l" else (r[:-1] + ":") for r, a in zip(rule, align, strict=True)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def render_summary(res: dict[str, Any]) -> str:
    m, sec = res["machine"], res["sections"]
    smoke = res["mode"] == "cpu-smoke"
    title = "GPU suite (benchmarks/gpu_suite.py)" + (" — CPU smoke run, figures meaningless" if smoke else "")
    out = [f"## {title}", ""]
    device = m.get("device", "?") + (f", sm {m['capability']}, {m['memory_gib']} GiB" if "capability" in m else "")
    out += [
        f"- Machine: {device}; {m.get('cpu_count')} CPU cores.",
        f"- Date: {m['date']}.",
        (
            f"- Versions: torch {m.get('torch')}, triton {m.get('triton')}, transformers {m.get('transformers')}, "
            f"Python {m.get('python')}, CUDA {m.get('cuda', '-')}, moe_compile {m.get('moe_compile_commit', '?')}."
        ),
        f"- Command: `{res['command']}` ({res['wall_s']} s wall, budget {res['budget_s']:.0f} s).",
        *([f"- Missing modules: {', '.join(res['missing_modules'])}.", ""] if res.get("missing_modules") else [""]),
        "### Sections",
        "",
    ]
    rows = []
    for name, d in sec.items():
        note = "; ".join([*(d.get("notes") or []), *([d["error"].splitlines()[0]] if d.get("error") else [])])
        rows.append([name, d["status"], d.get("wall_s", "-"), note.replace("|", "/") or "-"])
    out += [_table(["section", "status", "wall s", "notes"], rows, "llrl"), ""]
    out += [
        "### Targets",
        "",
        _table(
            ["target", "measured", "threshold", "result", "detail"],
            [[t["name"], t["measured"], t["threshold"], t["status"], t["detail"] or "-"] for t in res["targets"]],
            "lrrll",
        ),
        "",
    ]

    if "tests" in sec:
        r = sec["tests"].get("result", {})
        c = r.get("counts", {})
        out += [
            "### CUDA-only tests",
            "",
            (
                f"`pytest {' '.join(r.get('paths', []))}` in {r.get('shards', '?')} shard(s): "
                f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
                f"{c.get('skipped', 0)} skipped of {r.get('collected', '?')} collected."
            ),
            "",
        ]
        for f in r.get("failures", [])[:20]:
            out.append(f"- FAILED `{f['id']}`: {f['message']}")
        out.append("")
    if "autotune" in sec:
        r = sec["autotune"].get("result", {})
        out += [
            "### Autotune",
            "",
            (
                f"Table written to `{r.get('file', '-')}` ({r.get('shapes', 0)} shapes); "
                f"not tuned (budget): {', '.join(r.get('skipped', [])) or 'none'}."
            ),
            "",
        ]
        rows = [
            [d["model"], d["tokens"], "/".join(str(v) for v in d["config"].values()), f"{d['seconds']:.0f}"]
            for d in r.get("done", [])
        ]
        out += [_table(["model", "tokens", "block m/n/k, group m, warps, stages", "s"], rows), ""]
    if "gemm" in sec:
        r = sec["gemm"].get("result", {})
        out += [
            "### Grouped GEMM (TFLOP/s, " + str(r.get("dtype", "?")) + ", SiLU-gated)",
            "",
            (
                "`triton`: moe_compile's fused MoE layer; `grouped_mm`: the same layer on torch._grouped_mm "
                "(moe_torch); `dense`: two matmuls of the same FLOPs, no routing."
            ),
            "",
        ]
        rows = [
            [
                g["model"],
                g["tokens"],
                g["routing"],
                _fmt(g["triton_tflops"]),
                _fmt(g["grouped_mm_tflops"]),
                _fmt(g["dense_tflops"]),
                _fmt(g["triton_tflops"] / g["grouped_mm_tflops"], ".2f"),
                _fmt(g["triton_tflops"] / g["dense_tflops"], ".2f"),
                _fmt(g["rel_err"], ".1e"),
            ]
            for g in r.get("rows", [])
        ]
        header = ["model", "tokens", "routing", "triton", "grouped_mm", "dense", "tri/grp", "tri/dense", "rel err"]
        out += [_table(header, rows, "lrlrrrrrr"), ""]
    if "fp8" in sec:
        out += _fp8_tables(sec["fp8"].get("result", {}))
    if "prefill" in sec:
        r = sec["prefill"].get("result", {})
        out += [
            "### End-to-end prefill",
            "",
            (
                f"{r.get('model', '?')}, random weights, {r.get('dtype', '?')}, {r.get('layers', '?')} layers "
                f"({r.get('layers_why', '')}), sequences of {r.get('seq', '?')} tokens, last-token logits. "
                f"moe_prefill rewrote {r.get('moe_blocks', '?')} MoE block(s), implementations "
                f"{r.get('implementations', '?')}."
            ),
            "",
        ]
        rows = [
            [
                p["tokens"],
                p["variant"],
                _fmt(p["ms"], ".1f"),
                _fmt(p["tokens_per_s"], ".0f"),
                _fmt(p["vs_first"], ".2f") + "x",
                _fmt(p["mfu"], ".1%"),
            ]
            for p in r.get("rows", [])
        ]
        out += [_table(["tokens", "variant", "ms", "tokens/s", "vs eager", "MFU"], rows, "rlrrrr"), ""]
    if "offload" in sec:
        r = sec["offload"].get("result", {})
        o, b = r.get("overlap", {}), r.get("bytes", {})

        def mib(n):
            return "-" if n is None else f"{n / 2**20:.1f} MiB"

        out += [
            "### Offload overlap",
            "",
            (
                f'`offload="cpu"` with a random-weight predictor, {r.get("layers", "?")} layers, '
                f"{r.get('tokens', '?')} tokens, one profiled prefill ({_fmt(r.get('profiled_ms'), '.1f')} ms); "
                f"trace `{r.get('trace', '-')}`."
            ),
            "",
        ]
        rows = [
            ["expert-copy time overlapping compute", _fmt(o.get("copy_overlap_fraction"), ".1%")],
            ["of the prefetched (side-stream) copy time", _fmt(o.get("ahead_overlap_fraction"), ".1%")],
            [
                "copy time ahead / on demand (us)",
                f"{_fmt(o.get('copy_ahead_us'), '.0f')} / {_fmt(o.get('copy_on_demand_us'), '.0f')}",
            ],
            ["compute-stream busy time (us)", _fmt(o.get("compute_us"), ".0f")],
            [
                "bytes ahead (used) / on demand",
                f"{mib(b.get('bytes_ahead'))} ({mib(b.get('bytes_ahead_used'))}) / {mib(b.get('bytes_on_demand'))}",
            ],
        ]
        out += [_table(["metric", "value"], rows, "lr"), ""]
    if "serve" in sec:
        out += _serve_table(sec["serve"].get("result", {}))
    return "\n".join(out) + "\n"


def _serve_table(r: dict[str, Any]) -> list[str]:
    """The serve section: ``moe-compile score`` on a checkpoint on disk, against HF eager."""
    rows = [
        ["requests (prompt tokens)", f"{r.get('requests', '-')} ({r.get('prompt_tokens', '-')})"],
        ["requests/s", _fmt(r.get("requests_per_s"), ".1f")],
        ["tokens/s", _fmt(r.get("tokens_per_s"), ".0f")],
        ["launch to first answer (s)", _fmt(r.get("first_answer_s"), ".1f")],
        [
            "max abs log-prob diff vs HF eager",
            f"{_fmt(r.get('max_abs_logprob_diff'), '.1e')} (tolerance {_fmt(r.get('tolerance'), 'g')})",
        ],  # fmt: skip
    ]
    return [
        "### Serving a checkpoint (`moe-compile score`)",
        "",
        (
            f"{r.get('model', '?')}, random weights, {r.get('dtype', '?')}, {r.get('layers', '?')} layers "
            f"({r.get('layers_why', '')}), written to disk and scored by `moe-compile score --device "
            f"{r.get('device', '?')}` in a subprocess ({r.get('chunk', '?')} requests per written chunk), "
            "against HF eager on the same requests."
        ),
        "",
        _table(["metric", "value"], rows, "lr"),
        "",
    ]


def _fp8_tables(r: dict[str, Any]) -> list[str]:
    out = [
        "### Block-fp8 experts (TFLOP/s, SiLU-gated)",
        "",
        (
            "`fp8`: `fused_moe_fp8` (W8A8, 128x128 weight blocks, activations quantized per token and 128 channels, "
            "the quantizer included); `bf16`: the Triton layer on the same weights dequantized; `grouped_mm`: "
            "torch._grouped_mm (moe_torch) in bf16. `rel err`: fp8 vs the torch W8A8 emulation (moe_fp8_torch), "
            "smallest token count only."
        ),
        "",
    ]
    rows = [
        [
            g["model"],
            g["tokens"],
            _fmt(g["fp8_tflops"]),
            _fmt(g["bf16_tflops"]),
            _fmt(g["grouped_mm_tflops"]),
            _fmt(g["fp8_vs_bf16"], ".2f"),
            _fmt(g["fp8_vs_grouped_mm"], ".2f"),
            _fmt(g["rel_err"], ".1e"),
        ]
        for g in r.get("rows", [])
    ]
    header = ["model", "tokens", "fp8", "bf16", "grouped_mm", "fp8/bf16", "fp8/grp", "rel err"]
    out += [_table(header, rows), ""]
    e = r.get("e2e")
    if not e:
        return [*out, "End-to-end fp8 prefill: not run.", ""]
    b, quant = e["expert_bytes"], ", ".join(e.get("quantization", [])) or "-"
    out += [
        (
            f"End-to-end fp8 prefill: {e['model']}, experts as transformers' FP8Experts (attention bf16), "
            f"`moe_prefill` options {e['options'] or 'default'}, last-token logits; {e.get('fp8_blocks')} fp8 "
            f"block(s) ({quant}). Expert bytes: bf16 {b['bf16']:,}, fp8 {b['fp8_weights']:,} + {b['fp8_scales']:,} "
            "of scales. "
            f"Against the eager W8A8 emulation: {_fmt(e.get('rel_err'), '.1e')} compiled without Inductor "
            f"({'exact' if e.get('exact') else 'NOT exact'}: tolerance {e['tolerance']:.0e}), "
            f"{_fmt(e.get('rel_err_timed'), '.1e')} as timed; fp8 vs the bf16 model "
            f"{_fmt(e.get('rel_vs_bf16'), '.1e')}."
        ),
        "",
    ]
    rows = [
        [
            p["tokens"],
            p["variant"],
            _fmt(p["ms"], ".1f"),
            _fmt(p["tokens_per_s"], ".0f"),
            _fmt(p["vs_first"], ".2f") + "x",
        ]
        for p in e.get("rows", [])
    ]
    out += [_table(["tokens", "model", "ms", "tokens/s", "vs bf16"], rows, "rlrrr"), ""]
    return out
