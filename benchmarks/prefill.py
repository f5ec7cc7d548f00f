"""End-to-end prefill throughput: moe_prefill vs eager vs Inductor, side by side in one run.

A Qwen3-MoE model with real layer shapes (Qwen3-30B-A3B: H=2048, E=128, top-8,
I=768, 32 heads of 128, 4 KV heads) but few layers and random weights, in bf16,
prefilling batches of 4k and 16k tokens on a GPU; reports tokens/s and model FLOPs
utilisation (MFU). Without a GPU (``--cpu``, the default there) the same script
runs a tiny zoo model in fp32 so that it is checked, not to measure anything.

    python benchmarks/prefill.py                 # GPU: Qwen3-30B-A3B shapes, 4 layers
    python benchmarks/prefill.py --cpu           # CPU: tiny zoo models and a mid-size Qwen3-MoE

On CPU (``--cpu``) the contenders run interleaved, round after round, so that load on the
machine hits them alike; each row gives the median time, the median of the per-round
speed-ups over eager and their spread (min-max), and the experts alone are measured
against a dense matmul of equal FLOPs (GFLOP/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

import moe_compile
from moe_compile.testing import zoo

#: dense bf16 peak of the GPUs we report MFU against (SXM parts, no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=32768,
)  # fmt: skip


def prefill_flops(config, batch: int, seq: int, logits_to_keep: int = 0) -> float:
    """Matmul FLOPs of one prefill: projections, active experts, attention scores and values, LM head.

    ``logits_to_keep`` as in Hugging Face's forward: 0 computes logits for every token, ``n`` for the last ``n``.
    """
    H, L, T = config.hidden_size, config.num_hidden_layers, batch * seq
    d = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attn_proj = 2 * T * H * (q + 2 * kv) + 2 * T * q * H
    attn_scores = 2 * 2 * batch * seq * seq * q / 2  # QK^T and PV, causal half
    k, inter = config.num_experts_per_tok, config.moe_intermediate_size
    experts = 2 * T * k * 3 * H * inter
    router = 2 * T * H * config.num_experts
    head = 2 * (batch * min(logits_to_keep, seq) if logits_to_keep else T) * H * config.vocab_size
    return L * (attn_proj + attn_scores + experts + router) + head


def timed(fn, *args, warmup: int, iters: int, sync) -> float:
    for _ in range(warmup):
        fn(*args)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync()
    return (time.perf_counter() - start) / iters


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of ``device_name`` from :data:`PEAK_FLOPS`, or None (no MFU)."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def build_model(layers: int, cpu: bool) -> tuple[torch.nn.Module, int]:
    """``(model, sequence length)``: Qwen3-30B-A3B shapes in bf16 on the GPU, or a tiny zoo model in fp32 on CPU."""
    torch.manual_seed(0)
    if cpu:
        return zoo.build("qwen3_moe", num_layers=layers), 128
    config = transformers.Qwen3MoeConfig(num_hidden_layers=layers, **QWEN3_30B_A3B)
    with torch.device("cuda"):
        model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    return model, 4096


def measure(
    model, contenders: dict, tokens: list[int], seq: int, warmup: int = 2, iters: int = 5, on_row=None,
    logits_to_keep: int = 0,
):  # fmt: skip
    """One row per (token count, contender): ms, tokens/s, speed-up over the first contender, MFU.

    ``contenders`` maps a name to a callable model (eager first); ``on_row(row)`` sees each row as it is measured.
    ``logits_to_keep=1`` asks for the last token's logits only (what a prefill server needs).
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    rows = []
    for total in tokens:
        batch = max(1, total // seq)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, min(seq, total)), device=device)
        flops = prefill_flops(model.config, batch, input_ids.shape[1], logits_to_keep)
        kwargs = {"use_cache": False, **({"logits_to_keep": logits_to_keep} if logits_to_keep else {})}
        base = None
        with torch.no_grad():
            for name, fn in contenders.items():

                def run(x, fn=fn, kwargs=kwargs):
                    return fn(x, **kwargs).logits

                seconds = timed(run, input_ids, warmup=warmup, iters=iters, sync=sync)
                base = base or seconds
                n = input_ids.numel()
                row = {
                    "tokens": n, "variant": name, "ms": seconds * 1e3, "tokens_per_s": n / seconds,
                    "vs_first": base / seconds, "mfu": flops / seconds / peak if peak else None,
                }  # fmt: skip
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


#: the mid-size CPU shape: Qwen3-MoE with H=1024, E=32, top-4, I=512 (4 layers, 1 x 1024 tokens)
CPU_SHAPE = dict(
    hidden_size=1024, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=2048,
    num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
)  # fmt: skip
#: CPU setups: (name, zoo family, config overrides, layers, (batch, seq), rounds)
CPU_SETUPS = [
    ("tiny qwen3_moe", "qwen3_moe", {}, 2, (1, 128), 40),
    ("tiny mixtral", "mixtral", {}, 2, (1, 128), 40),
    ("tiny deepseek_v3", "deepseek_v3", {}, 2, (1, 128), 40),
    ("qwen3_moe H=1024 E=32 k=4", "qwen3_moe", CPU_SHAPE, 4, (1, 1024), 9),
]


def interleaved(contenders: dict, input_ids: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each contender, measured round-robin (one call each per round)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in contenders.values():
                fn(input_ids, use_cache=False)
        for _ in range(rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn(input_ids, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return times


def expert_gflops(shape: dict, tokens: int, rounds: int = 5) -> tuple[float, float]:
    """GFLOP/s of one MoE layer's experts (``moe_torch``, uniform random routing) and of a dense fp32
    matmul pair of equal FLOPs (``[T*K, H] @ [H, 2I]`` then ``[T*K, I] @ [I, H]``)."""
    from moe_compile.ops import moe_torch
    from moe_compile.spec import ExpertSpec

    H, E, K, I = (
        shape["hidden_size"],
        shape["num_experts"],
        shape["num_experts_per_tok"],
        shape["moe_intermediate_size"],
    )
    x = torch.randn(tokens, H)
    weights, ids = torch.randn(tokens, E).softmax(-1).topk(K)
    w_up, w_down = torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5
    a, up, down = torch.randn(tokens * K, H), torch.randn(H, 2 * I), torch.randn(I, H)
    flops = 2 * tokens * K * (H * 2 * I + I * H)
    runs = {
        "experts": lambda: moe_torch(x, ids, weights, w_up, w_down, None, None, ExpertSpec()),
        "dense": lambda: (a @ up)[:, :I] @ down,
    }
    best = {}
    for name, fn in runs.items():
        fn()
        best[name] = min(_seconds(fn) for _ in range(rounds))
    return flops / best["experts"] / 1e9, flops / best["dense"] / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_main(inductor: bool, setups: list[tuple] = CPU_SETUPS) -> list[dict]:
    """The CPU table (see the module docstring); returns its rows."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"cpu: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, load {load}"
    )
    print(f"{'setup':<27} {'variant':>12} {'median ms':>10} {'vs eager':>9} {'spread':>13}")
    rows = []
    for name, family, overrides, layers, (batch, seq), rounds in setups:
        torch._dynamo.reset()  # one model per process, as served: no other model's guards to check first
        torch.manual_seed(0)
        model = zoo.build(family, num_layers=layers, overrides=overrides or None)
        contenders = {"eager": model, "moe_prefill": torch.compile(model, backend="moe_prefill")}
        if inductor:
            contenders["inductor"] = torch.compile(model)
            contenders["moe_prefill+ind"] = torch.compile(model, backend="moe_prefill", options={"inductor": True})
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        times = interleaved(contenders, input_ids, rounds)
        for variant, ts in times.items():
            ratios = [e / t for e, t in zip(times["eager"], ts, strict=True)]
            row = {
                "setup": name, "variant": variant, "median_ms": statistics.median(ts) * 1e3,
                "vs_eager": statistics.median(ratios), "spread": (min(ratios), max(ratios)), "rounds": rounds,
            }  # fmt: skip
            rows.append(row)
            spread = f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}x"
            print(f"{name:<27} {variant:>12} {row['median_ms']:>10.2f} {row['vs_eager']:>8.2f}x {spread:>13}")
    experts, dense = expert_gflops(CPU_SHAPE, tokens=1024)
    print(f"experts of one layer at H=1024 E=32 k=4 I=512, 1024 tokens: {experts:.0f} GFLOP/s; "
          f"dense matmuls of equal FLOPs: {dense:.0f} GFLOP/s ({experts / dense:.0%})")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny and mid-size models on the CPU (default without CUDA)")
    parser.add_argument("--inductor", action="store_true", help="CPU: also Inductor (minutes of compiling)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--no-inductor", action="store_true", help="skip plain torch.compile (slow to compile on CPU)")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        cpu_main(args.inductor)
        return
    model, seq = build_model(args.layers, cpu)
    tokens = [256, 1024] if cpu else args.tokens
    contenders = {"eager": model, "moe_prefill": torch.compile(model, backend="moe_prefill")}
    if not args.no_inductor:
        contenders["inductor"] = torch.compile(model)
    dtype = next(model.parameters()).dtype
    c = model.config
    device_name = torch.cuda.get_device_name() if not cpu else "cpu"
    print(f"device: {device_name}, dtype {dtype}, {c.num_hidden_layers} layers, H={c.hidden_size}, E={c.num_experts}")
    print(f"{'tokens':>7} {'variant':>12} {'ms':>9} {'tokens/s':>11} {'vs eager':>8} {'MFU':>6}")

    def show(r: dict) -> None:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['tokens']:>7} {r['variant']:>12} {r['ms']:>9.1f} {r['tokens_per_s']:>11.0f} "
            f"{r['vs_first']:>7.2f}x {mfu:>6}"
        )

    measure(model, contenders, tokens, seq, on_row=show)
    report = moe_compile.last_report()
    if report is not None:
        implementations = sorted({b.implementation for b in report.blocks})
        print(f"moe_prefill: {len(report.blocks)} blocks, implementations {implementations}")


if __name__ == "__main__":
    main()
