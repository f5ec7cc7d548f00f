"""One family against eager: build the tiny model, ``moe_compile.explain`` it, compile it at two sequence
lengths and compare (:func:`check_family` -> :class:`Row`, whose ``status`` is one of :data:`STATUSES`).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

import torch

from ... import verify
from .common import quiet as _quiet
from .common import short as _short
from .configs import TINY_EXPERTS, _zoo_entry, tiny_config

#: compiled vs eager, fp32 relative error (Frobenius) under which a family counts as exact (the models run in fp32)
TOLERANCE = verify.tolerance(torch.float32)
#: sequence lengths of the two compiled runs (the second compiles a dynamic-shape graph)
SEQ_LENS = (5, 11)
STATUSES = ("exact", "skipped", "missed", "inexact", "not-built")


@dataclasses.dataclass
class Row:
    family: str
    status: str
    model: str = "-"  # the class built
    expert_modules: int = 0  # modules of the tiny model holding E experts (a block each)
    blocks: int = 0  # blocks found and rewritten
    rel_err: float | None = None  # max over the sequence lengths, compiled vs eager
    reason: str = ""
    seconds: float = 0.0
    prepared: str = ""  # what ``moe_compile.prepare`` replaced, e.g. "2 stacked" (empty: nothing)

    def cells(self) -> list[str]:
        err = "-" if self.rel_err is None else f"{self.rel_err:.1e}"
        blocks = f"{self.blocks}/{self.expert_modules}"
        return [self.family, self.status, blocks, err, self.model, self.prepared or "-", self.reason or "-"]


HEADER = ["family", "status", "blocks/expert modules", "rel err", "model", "prepare", "reason"]


def _model_class(model_type: str, config: Any):
    """The model class to build: the zoo's, else causal LM, seq2seq LM, base model, backbone."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    entry = _zoo_entry(model_type)
    if entry is not None:
        return getattr(transformers, entry.model_cls_name)
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                    "MODEL_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES"):  # fmt: skip
        name = getattr(auto, mapping, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        cls = getattr(transformers, name, None) if name else None
        # a composite config (llama4, qwen3_5_moe) registers its text model as the causal LM: that class takes
        # the text sub-config, not this one (a class of another family, as sarvam_moe's Glm4Moe, is fine)
        if cls is not None and getattr(cls, "config_class", None) not in _sub_config_types(config):
            return cls
    base = type(config).__name__.removesuffix("Config")
    for suffix in ("ForCausalLM", "Model"):
        if hasattr(transformers, base + suffix):
            return getattr(transformers, base + suffix)
    raise LookupError(f"no model class registered for {model_type!r} in the auto mappings")


def _sub_config_types(config: Any) -> set[type]:
    """The classes of the configs nested in ``config`` (``text_config``, ``vision_config``, ...)."""
    from transformers import PretrainedConfig

    return {type(v) for v in vars(config).values() if isinstance(v, PretrainedConfig)}


def _build_model(model_type: str):
    import torch

    from .. import zoo

    entry = _zoo_entry(model_type)
    if entry is not None:
        return zoo.build(entry.name)
    config = tiny_config(model_type)
    cls = _model_class(model_type, config)
    torch.manual_seed(0)
    with zoo._uninitialized_memory_is_nan():
        if cls.__name__.startswith("Auto"):
            model = cls.from_config(config, dtype=torch.float32)
        else:
            model = cls._from_config(config, dtype=torch.float32)
    zoo._redraw_degenerate(model, 0)
    return model.eval()


def _expert_modules(model: Any) -> int:
    """Modules of ``model`` that hold its experts: a 3D parameter ``[E, ., .]`` or E child modules."""
    import torch

    counts, containers = set(), []
    E = TINY_EXPERTS
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == E:  # experts as rows (doge)
            counts.add(name.rpartition(".")[0] or name)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            children = list(module.children())
            mlps = [c for c in children if any(isinstance(m, torch.nn.Linear) for m in c.modules())]
            if len(mlps) == E:
                counts.add(name.rpartition(".")[0] or name)
                containers.append(name + ".")
            continue
        if any(name.startswith(c) for c in containers):
            continue  # one expert of a container already counted
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] == E and "embed" not in pname:
                counts.add(name)
            elif (any(part.startswith("expert") for part in name.split(".")) and "shared" not in name
                  and p.dim() == 2 and p.shape[0] % E == 0 and p.shape[0] > E):  # fmt: skip
                counts.add(name)  # experts flattened into [E * I, H] (dbrx)
    return len(counts)


def _inputs(model: Any, seq: int, seed: int) -> dict[str, Any]:
    import torch

    config = model.config
    text = config.get_text_config()
    gen = torch.Generator().manual_seed(seed)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.randint(3, getattr(text, "vocab_size", 128) or 128, (2, seq), generator=gen)
        kwargs = {"input_ids": ids, "use_cache": False}  # prefill: no cache (some hybrid caches cannot start empty)
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids[:, : max(1, seq // 2)]
        return kwargs
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        kwargs = {"pixel_values": torch.randn(2, channels, *size, generator=gen)}
        if "dataset_index" in inspect.signature(model.forward).parameters:  # vitpose: the expert is picked per image
            kwargs["dataset_index"] = torch.randint(0, TINY_EXPERTS, (2,), generator=gen)
        return kwargs
    raise ValueError(f"main input {name!r} (not text or images): no generic inputs")


def _output(out: Any):
    import torch

    for key in ("logits", "last_hidden_state", "feature_maps", "heatmaps"):
        value = getattr(out, key, None)
        if isinstance(value, (list, tuple)):
            value = value[-1]
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (list, tuple)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no tensor output in {type(out).__name__}")


def check_family(model_type: str, keep: dict[str, Any] | None = None) -> Row:
    """Build, prepare, explain, compile and compare one family; never raises (a failure is a not-built row).

    The model is run the way the README tells a user to: ``moe_compile.prepare(model)`` (which
    rewrites the expert loops it can prove equal, in place) and then ``torch.compile``. The
    reference is the eager model *as built*, before ``prepare``: the row checks both steps.
    ``keep``, a dict, receives the ``model``, the first compile's ``report`` and the ``errors`` per
    length, for callers that check more than the row (the per-family tests).
    """
    import torch

    import moe_compile  # noqa: F401  (registers the backend)

    start = time.perf_counter()
    row = Row(model_type, "not-built")
    try:
        with _quiet():
            model = _build_model(model_type)
        row.model = type(model).__name__
        row.expert_modules = _expert_modules(model)
        if row.expert_modules == 0:
            row.reason = f"the tiny model has no module with {TINY_EXPERTS} experts (MoE layers off in the tiny config)"
            return row
        kwargs = _inputs(model, 6, 0)
        if not _deterministic(model, kwargs):
            row.reason = "eager forward gives different outputs under one seed: compiled and eager cannot be compared"
            return row
        expected = {}
        with torch.no_grad(), _quiet():
            for seq in SEQ_LENS:
                torch.manual_seed(seq)  # a forward that samples (diffusion models) draws the same numbers
                expected[seq] = _output(model(**_inputs(model, seq, seq))).clone()
    except Exception as err:  # noqa: BLE001
        row.reason = f"build: {_short(err)}"
        row.seconds = time.perf_counter() - start
        return row
    try:
        from ...backend import collect_reports, register_root
        from ...prepare import prepare, prepare_report

        with _quiet():
            prepare(model)
        done = prepare_report(model)
        kinds = [what.partition(":")[0] for _, what in done if not what.startswith("left alone")]
        row.prepared = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        refused = [f"prepare left {name} alone: {what.removeprefix('left alone: ')}"
                   for name, what in done if what.startswith("left alone")]  # fmt: skip
        torch._dynamo.reset()
        register_root(model)  # block paths read as the model's module paths, as explain() gives them
        compiled = torch.compile(model, backend="moe_prefill", options={"inductor": False})
        errs = []
        with torch.no_grad(), _quiet():
            for seq in SEQ_LENS:
                kw = _inputs(model, seq, seq)
                for value in kw.values():  # one dynamic-shape compile serves both lengths
                    if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
                        torch._dynamo.maybe_mark_dynamic(value, 1)
                # the first length's compile is what ``moe_compile.explain`` reports (explain = compile + collect)
                with collect_reports() as collected:
                    torch.manual_seed(seq)
                    got = _output(compiled(**kw))
                if seq == SEQ_LENS[0]:
                    report = collected
                want = expected[seq].double()
                errs.append(verify.rel_err(got, want))
        row.blocks = len(report.blocks)
        if keep is not None:
            keep.update(model=model, report=report, errors=errs)
        reasons = list(dict.fromkeys(s.reason for s in report.skipped))
        row.rel_err = max(errs)
        if not row.rel_err < TOLERANCE:
            row.status, row.reason = "inexact", f"compiled differs from eager (rel err {row.rel_err:.2g})"
        elif row.blocks >= row.expert_modules:  # every module holding the experts was rewritten
            row.status = "exact"
            row.reason = "; ".join(f"also left alone: {r}" for r in reasons)  # e.g. a dense group of shared experts
        elif reasons or refused:
            row.status, row.reason = "skipped", "; ".join(reasons + refused)
        else:
            row.status = "missed"
            row.reason = f"{row.expert_modules - row.blocks} expert module(s) not found, no reason given"
            if report.graphs > 1:
                row.reason += f" ({report.graphs} graphs: graph breaks)"
    except Exception as err:  # noqa: BLE001
        row.status, row.reason = "not-built", f"compile: {_short(err)}"
    finally:
        torch._dynamo.reset()
    row.seconds = time.perf_counter() - start
    return row


def _deterministic(model: Any, kwargs: dict[str, Any]) -> bool:
    """Two eager forwards under one seed agree (a diffusion model samples noise in its forward)."""
    import torch

    outs = []
    with torch.no_grad(), _quiet():
        for _ in range(2):
            torch.manual_seed(0)
            outs.append(_output(model(**kwargs)))
    return torch.equal(outs[0], outs[1])
