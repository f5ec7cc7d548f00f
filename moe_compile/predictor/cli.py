"""``moe-compile train-predictor`` and ``moe-compile eval-predictor``.

::

    moe-compile train-predictor --out predictors.safetensors            # the shipped tiny model, stdlib text
    moe-compile train-predictor --model DIR --out FILE --texts docs/ notes.txt --epochs 5
    moe-compile eval-predictor --predictor predictors.safetensors       # per-layer accuracy table

``--model`` defaults to the shipped tiny MoE (``moe_compile/assets/tiny_moe``). Without ``--texts``,
training reads the standard library's train files and evaluation its held-out files
(:mod:`.corpus`), so the table is measured on text the predictors never saw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TRAIN_TOKENS = 128 * 1024
DEFAULT_EVAL_TOKENS = 32 * 1024


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _load_model(path: str):
    """The causal LM at ``path``, checked to have MoE layers in the layout predictors support."""
    from .model_info import moe_layers
    from .tiny_moe import load_model

    try:
        model = load_model(path)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise SystemExit(f"moe-compile: cannot load the model at {path}: {err}") from err
    try:
        moe_layers(model)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"moe-compile: {path}: {err}") from err
    return model


def chunks_or_exit(texts: list[str] | None, split: str, max_tokens: int, seq_len: int):
    """:func:`~.corpus.text_chunks` for a command line: a missing or bad text file exits with the reason."""
    from .corpus import text_chunks

    try:
        return text_chunks(texts, split, seq_len, max_tokens)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"moe-compile: {err}") from err


def cmd_train_predictor(args: argparse.Namespace) -> int:
    """Collect routing on the training text, train predictors and baselines, save them to ``--out``."""
    import torch

    from .checkpoint import save_bundle
    from .train import TrainConfig, train_predictors

    torch.set_num_threads(args.threads)
    model = _load_model(args.model)
    chunks = chunks_or_exit(args.texts, "train", args.max_tokens, args.seq_len)
    config = TrainConfig(epochs=args.epochs, width=args.width, seed=args.seed)
    bundle = train_predictors(model, chunks, config, progress=not args.quiet)
    save_bundle(bundle, args.out)
    size = Path(args.out).stat().st_size
    print(f"trained on {bundle.training['tokens']} tokens: pre-attention predictors for layers "
          f"{bundle.pre_attention.layers}, cross-layer baselines for {bundle.cross_layer.layers}; "
          f"saved to {args.out} ({size / 1024:.0f} KiB)")  # fmt: skip
    return 0


def cmd_eval_predictor(args: argparse.Namespace) -> int:
    """Print the per-layer accuracy table of the predictor file and its baselines on held-out text."""
    import torch

    from .checkpoint import PredictorFileError, load_bundle
    from .evaluate import evaluate, format_table

    torch.set_num_threads(args.threads)
    model = _load_model(args.model)
    try:
        bundle = load_bundle(args.predictor, model)
    except PredictorFileError as err:
        raise SystemExit(f"moe-compile: {err}") from err
    chunks = chunks_or_exit(args.texts, "heldout", args.max_tokens, args.seq_len)
    print(format_table(evaluate(model, bundle, chunks, progress=not args.quiet)))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train-predictor`` and ``eval-predictor`` to the ``moe-compile`` sub-command parsers."""
    from .net import DEFAULT_WIDTH
    from .tiny_moe import SEQ_LEN, TINY_MOE_DIR
    from .train import TrainConfig

    epochs = TrainConfig().epochs

    def common(p: argparse.ArgumentParser, split: str, tokens: int) -> None:
        p.add_argument(
            "--model", default=str(TINY_MOE_DIR), help="checkpoint directory (default: the shipped tiny MoE)"
        )
        p.add_argument(
            "--texts",
            nargs="+",
            default=None,
            metavar="PATH",
            help=f"text files or directories (.py/.txt/.md/.rst); default: the stdlib's {split} files",
        )
        p.add_argument("--max-tokens", type=_positive_int, default=tokens, help=f"tokens to use (default {tokens})")
        p.add_argument(
            "--seq-len", type=_positive_int, default=SEQ_LEN, help=f"tokens per sequence (default {SEQ_LEN})"
        )
        p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = subparsers.add_parser("train-predictor", help="train pre-attention expert predictors (and baselines)")
    common(p, "train", DEFAULT_TRAIN_TOKENS)
    p.add_argument("--out", required=True, help="predictor file to write (safetensors)")
    p.add_argument(
        "--epochs", type=_positive_int, default=epochs, help=f"passes over the collected tokens (default {epochs})"
    )
    p.add_argument(
        "--width", type=_positive_int, default=DEFAULT_WIDTH, help=f"predictor hidden units (default {DEFAULT_WIDTH})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_predictor)

    p = subparsers.add_parser("eval-predictor", help="accuracy of a predictor file and the baselines, per layer")
    common(p, "held-out", DEFAULT_EVAL_TOKENS)
    p.add_argument("--predictor", required=True, help="predictor file written by train-predictor")
    p.set_defaults(func=cmd_eval_predictor)
