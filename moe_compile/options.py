"""Options of the ``moe_prefill`` backend, validated in one place.

``torch.compile(model, backend="moe_prefill", options={...})`` hands the dict to
:meth:`Options.from_user`. An unknown key or a value of the wrong kind raises a
``ValueError`` that names it and lists what is accepted. Later features add a
field here (with its check) and nothing else needs to change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@dataclasses.dataclass(frozen=True)
class Options:
    #: write every graph before and after each pass (code, picture, summary) to ``debug_dir``;
    #: also on with the environment variable ``MOE_COMPILE_DEBUG=1``.
    debug: bool = dataclasses.field(default_factory=lambda: _env_flag("MOE_COMPILE_DEBUG"))
    #: where debug output goes (one sub-folder per compiled graph).
    debug_dir: str = dataclasses.field(default_factory=lambda: os.environ.get("MOE_COMPILE_DEBUG_DIR", "moe_debug"))
    #: expert kernels: "auto" (Triton on a GPU, torch elsewhere), "triton" (force), "torch" (never Triton).
    kernels: str = "auto"
    #: run the rewritten graph through Inductor: True, False, or "auto" (Inductor on CUDA, eager on CPU).
    inductor: bool | str = "auto"
    #: check each rewrite on random probe inputs against the original subgraph before applying it.
    verify: bool = True
    #: run the experts across the ranks of torch.distributed's default group (see docs/parallel.md):
    #: None (every rank runs the model it holds), "aep" (asynchronous expert parallelism: each rank keeps
    #: 1/W of every layer's experts and all-gathers a layer's experts ahead of use), "ep" (expert
    #: parallelism: tokens are sent to the rank owning their expert with AllToAll; the baseline).
    parallel: str | None = None
    #: AEP: how many MoE layers ahead of its use a layer's gather is issued (int >= 0), or "auto"
    #: (the planner's choice for the device; 1 where the device is unknown, e.g. CPU). Not with a predictor
    #: (the predicted experts are gathered at the start of their own layer).
    prefetch_depth: int | str = "auto"
    #: AEP: bytes the gathered expert weights may occupy at once on a rank (the ring of prefetched
    #: layers), or None for no bound; the prefetch depth is lowered to fit. With a predictor: the ring of
    #: two layer buffers must fit (a ValueError at compile time otherwise).
    memory_budget: int | None = None
    #: AEP: keep the R most used experts of every MoE layer resident on every rank and gather only the
    #: other E - R (E - R must divide by the world size; R >= E: no gather); needs ``routing_stats``.
    hot_experts: int = 0
    #: AEP with hot_experts > 0: a routing statistics file for this model (which experts are most used),
    #: made by ``moe_compile.collect_routing_stats(model, samples).save(path)`` or `moe-compile routing-stats`.
    routing_stats: str | os.PathLike | None = None
    #: a predictor file made by `moe-compile train-predictor` for this model (docs/predictors.md), or
    #: None: each MoE layer's predictor runs on the layer's pre-attention activation and drives the
    #: offload prefetch (offload="cpu") or, with parallel="aep", the gather of the union over ranks of the
    #: predicted experts (the rest on demand); a file made for another model is an error at compile time.
    #: Needs offload="cpu" or parallel="aep" (refused otherwise: nothing would use the predictions).
    predictor: str | os.PathLike | None = None
    #: attention whose traced mask is only the causal lower triangle of the sequence length runs with
    #: SDPA's is_causal=True instead of the mask, as eager Hugging Face attention does (passes/causal_attention.py).
    causal_attention: bool = True
    #: keep expert weights off the device: None, or "cpu" (host memory, pinned on CUDA; a ring of two
    #: layer buffers on the device; experts copied ahead by the predictor, the rest on demand).
    offload: str | None = None

    _CHOICES = {
        "kernels": ("auto", "triton", "torch"),
        "inductor": ("auto", True, False),
        "parallel": (None, "aep", "ep"),
        "offload": (None, "cpu"),
    }

    @classmethod
    def from_user(cls, options: dict[str, Any] | None) -> Options:
        """The user's ``options`` dict (``torch.compile(..., options=...)``, ``explain(options=...)``) validated.

        The one conversion: what flows on, to ``compile_graph`` and the passes, is always an :class:`Options`.
        """
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise ValueError(f"moe_prefill options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(f"unknown moe_prefill option {key!r}; valid options are: {', '.join(valid)}")
        opts = cls(**options)
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in ("debug", "verify", "causal_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"moe_prefill option {name!r} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.debug_dir, (str, os.PathLike)):
            raise ValueError(f"moe_prefill option 'debug_dir' must be a path, got {self.debug_dir!r}")
        for name, choices in self._CHOICES.items():
            value = getattr(self, name)
            # `True == 1` in Python: compare types too so that 1 is not taken for True.
            if not any(value == c and type(value) is type(c) for c in choices):
                shown = ", ".join(repr(c) for c in choices)
                raise ValueError(f"moe_prefill option {name!r} must be one of {shown}, got {value!r}")
        depth = self.prefetch_depth
        if depth != "auto" and not (type(depth) is int and depth >= 0):
            raise ValueError(f"moe_prefill option 'prefetch_depth' must be an int >= 0 or 'auto', got {depth!r}")
        budget = self.memory_budget
        if budget is not None and not (type(budget) is int and budget > 0):
            raise ValueError(
                f"moe_prefill option 'memory_budget' must be a number of bytes > 0 or None, got {budget!r}"
            )
        hot = self.hot_experts
        if not (type(hot) is int and hot >= 0):
            raise ValueError(f"moe_prefill option 'hot_experts' must be an int >= 0, got {hot!r}")
        if self.routing_stats is not None and not isinstance(self.routing_stats, (str, os.PathLike)):
            raise ValueError(
                f"moe_prefill option 'routing_stats' must be None or a path to a routing statistics file, "
                f"got {self.routing_stats!r}"
            )
        if hot > 0 and self.routing_stats is None:
            raise ValueError(
                f"moe_prefill option hot_experts={hot} needs routing_stats=PATH, a routing statistics file for "
                "this model that says which experts are most used; make one with "
                "moe_compile.collect_routing_stats(model, samples).save(PATH) or `moe-compile routing-stats`"
            )
        if self.routing_stats is not None and hot == 0:
            raise ValueError("moe_prefill option 'routing_stats' applies only with hot_experts > 0")
        if self.parallel != "aep":
            for name, default in (("prefetch_depth", "auto"), ("memory_budget", None), ("hot_experts", 0)):
                if getattr(self, name) != default:
                    raise ValueError(f"moe_prefill option {name!r} applies only with parallel='aep'")
        if self.parallel == "aep" and self.predictor is not None and self.prefetch_depth != "auto":
            raise ValueError(
                "moe_prefill option 'prefetch_depth' does not apply with parallel='aep' and a predictor: "
                "each layer's predicted experts are gathered at the start of that layer (before its attention); "
                "leave prefetch_depth unset"
            )
        if self.parallel == "aep" and self.predictor is not None and self.hot_experts:
            raise ValueError(
                "moe_prefill option 'hot_experts' cannot be combined with a predictor under parallel='aep': "
                "the predicted gather fetches each layer's experts from their owners' shards and keeps none "
                "resident; use one or the other"
            )
        if self.predictor is not None and not isinstance(self.predictor, (str, os.PathLike)):
            raise ValueError(
                f"moe_prefill option 'predictor' must be None or a path to a predictor file, got {self.predictor!r}"
            )
        if self.predictor is not None and self.offload is None and self.parallel != "aep":
            raise ValueError(
                f"moe_prefill option 'predictor' does nothing without offload='cpu' or parallel='aep' "
                f"(got parallel={self.parallel!r}): its predictions drive a prefetch; add offload='cpu' (experts in "
                "host memory, copied ahead by the predictor) or parallel='aep' (the predicted experts gathered "
                "ahead), or drop 'predictor'"
            )
        if self.offload is not None and self.parallel is not None:
            raise ValueError(f"moe_prefill option 'offload' cannot be combined with parallel={self.parallel!r}")

    def use_inductor(self, on_cuda: bool) -> bool:
        return on_cuda if self.inductor == "auto" else bool(self.inductor)

    def kernel_impl(self, on_cuda: bool) -> str:
        """'triton' or 'torch' for the expert compute of each block."""
        if self.kernels == "auto":
            return "triton" if on_cuda else "torch"
        return self.kernels
