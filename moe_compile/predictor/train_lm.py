"""Train the tiny MoE language model shipped in ``moe_compile/assets/tiny_moe`` (a few minutes on CPU).

::

    python -m moe_compile.predictor.train_lm                  # writes moe_compile/assets/tiny_moe
    python -m moe_compile.predictor.train_lm --out /tmp/tiny --steps 100

What it does, with a fixed seed:

1. reads the standard library's ``.py`` files (:mod:`.corpus`), split by file into train and held-out;
2. trains :func:`.tiny_moe.tiny_moe_config` on random 128-byte windows of the train files with AdamW
   (linear warm-up, cosine decay) plus ``--aux-coef`` times a per-layer load-balancing loss
   (:func:`load_balancing_loss`; transformers' own pools all layers' routers into one histogram, which
   lets single layers leave experts unused);
3. saves it with ``save_pretrained`` (safetensors, weights rounded to bf16 to keep the file small)
   plus a ByT5 byte tokenizer and ``training.json`` (settings, held-out loss, routing statistics);
4. reloads the saved checkpoint with ``from_pretrained`` in fp32 and reports, on held-out windows, the
   loss in nats per byte (bits per byte beside it) and per layer the expert load histogram and how
   peaked the router is per token (:func:`routing_stats`).

Threads default to 1: on 2 CPU cores shared with other jobs, one thread measured 3-10x faster per
step than two (oversubscription). Run-to-run results are identical for the same thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from . import corpus
from .collect import collect_routing
from .model_info import moe_layers
from .tiny_moe import SEQ_LEN, TINY_MOE_DIR, load_model, tiny_moe_config

HELDOUT_TOKENS = 64 * 1024  # held-out bytes scored at the end


def sample_batch(stream: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows ``[B, S]`` of the token ``stream`` ``[N]``."""
    starts = torch.randint(0, stream.numel() - SEQ_LEN, (batch,), generator=generator)  # [B]
    return stream[starts[:, None] + torch.arange(SEQ_LEN)]  # [B, S]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss per layer, averaged over layers (1.0 when perfectly balanced).

    Per layer with router logits ``[T, E]``: ``E * sum_e f_e * p_e``, where ``f_e`` is the share of the
    ``T*K`` routing slots that chose expert ``e`` and ``p_e`` its mean router probability.
    """
    losses = []
    for logits in router_logits:  # [T, E]
        probs = logits.float().softmax(-1)  # [T, E]
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, K]
        slots = torch.nn.functional.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k  # [E]
        losses.append(num_experts * (slots * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[B, S, V]`` against the next tokens of ``ids`` ``[B, S]``."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def heldout_loss(model: transformers.PreTrainedModel, chunks: torch.Tensor, batch: int = 32) -> float:
    """Mean next-byte cross-entropy (nats per byte) over the ``chunks`` ``[B, S]``."""
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch):
        ids = chunks[start : start + batch]  # [b, S]
        logits = model(input_ids=ids, use_cache=False).logits  # [b, S, V]
        total, count = total + next_byte_loss(logits, ids, "sum").item(), count + ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def routing_stats(model: transformers.PreTrainedModel, chunks: torch.Tensor) -> dict[int, dict[str, object]]:
    """Per MoE layer on ``chunks``: expert load histogram and how peaked the router is per token.

    - ``load``: the share of (token, slot) routing choices each expert gets;
    - ``top_k_mass``: mean router probability of the chosen experts (``K / E`` for a uniform router);
    - ``entropy``: mean entropy of the router's softmax in nats (``log E`` for a uniform router).

    The load histogram alone does not tell trained from random routing (a random router is skewed
    too, and a balancing loss flattens a trained one); the per-token figures do.
    """
    data = collect_routing(model, chunks, progress=False)
    stats = {}
    for moe in moe_layers(model):
        ids = data.topk[moe.index]  # [N, K]
        probs = torch.softmax(torch.nn.functional.linear(data.router_input[moe.index], moe.router.weight), -1)  # [N, E]
        stats[moe.index] = {
            "load": [
                round(v, 4) for v in (torch.bincount(ids.flatten(), minlength=data.num_experts) / ids.numel()).tolist()
            ],
            "top_k_mass": round(probs.gather(1, ids).sum(-1).mean().item(), 4),
            "entropy": round(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().item(), 4),
        }
    return stats


def train(args: argparse.Namespace) -> dict:
    """Train, save to ``args.out``, reload and score; returns the summary written to ``training.json``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_files, heldout_files = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    train_stream = corpus.token_stream(train_files)  # [N]
    heldout = corpus.chunks(corpus.token_stream(heldout_files), SEQ_LEN, HELDOUT_TOKENS // SEQ_LEN)  # [B, S]
    print(f"corpus: {len(train_files)} train files ({train_stream.numel() / 1e6:.1f} MB), "
          f"{len(heldout_files)} held-out files; Python {platform.python_version()}")  # fmt: skip

    config = tiny_moe_config(args.layers, args.dense_first)
    model = transformers.Qwen3MoeForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{args.steps} steps x {args.batch} x {SEQ_LEN} bytes, {args.threads} thread(s)")  # fmt: skip
    started, smoothed = time.perf_counter(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        ids = sample_batch(train_stream, args.batch, generator)  # [B, S]
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        lm_loss = next_byte_loss(out.logits, ids)
        aux_loss = load_balancing_loss(out.router_logits, config.num_experts_per_tok)
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = lm_loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * lm_loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train loss {smoothed:.3f} nats/byte  balance {aux_loss.item():.3f}  "
                  f"{time.perf_counter() - started:6.0f} s", flush=True)  # fmt: skip
    train_seconds = time.perf_counter() - started

    out_dir = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    transformers.ByT5Tokenizer(extra_ids=0).save_pretrained(out_dir)
    saved = load_model(out_dir)  # fp32 compute on the saved (bf16-valued) weights
    loss = heldout_loss(saved, heldout)
    routing = routing_stats(saved, heldout)
    summary = {
        "heldout_loss_nats_per_byte": round(loss, 4),
        "heldout_bits_per_byte": round(loss / math.log(2), 4),
        "heldout_bytes": heldout.numel(),
        "routing": {str(layer): layer_stats for layer, layer_stats in routing.items()},
        "train_seconds": round(train_seconds),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "lr": args.lr,
        "aux_coef": args.aux_coef,
        "seed": args.seed,
        "layers": args.layers,
        "dense_first": args.dense_first,
        "threads": args.threads,
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "saved_dtype": "bfloat16",
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out loss: {loss:.4f} nats/byte ({loss / math.log(2):.3f} bits/byte) on {heldout.numel()} bytes; "
          f"trained in {train_seconds:.0f} s")  # fmt: skip
    uniform_mass, uniform_entropy = config.num_experts_per_tok / config.num_experts, math.log(config.num_experts)
    for layer, layer_stats in routing.items():
        print(f"layer {layer} expert load: " + " ".join(f"{share:5.1%}" for share in layer_stats["load"])
              + f"; chosen experts' probability {layer_stats['top_k_mass']:.2f} (uniform router: {uniform_mass:.2f}), "
              f"router entropy {layer_stats['entropy']:.2f} nats (uniform: {uniform_entropy:.2f})")  # fmt: skip
    print(f"saved to {out_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TINY_MOE_DIR), help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16, help="windows of 128 bytes per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up steps")
    parser.add_argument("--aux-coef", type=float, default=0.01, help="weight of the per-layer load-balancing loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=10, help="decoder layers")
    parser.add_argument("--dense-first", type=int, default=1, help="how many first layers are a dense MLP, not MoE")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see module doc)")
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
