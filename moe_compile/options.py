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

    _CHOICES = {"kernels": ("auto", "triton", "torch"), "inductor": ("auto", True, False)}

    @classmethod
    def from_user(cls, options: dict[str, Any] | None) -> Options:
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"moe_prefill options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown moe_prefill option {key!r}; valid options are: {', '.join(valid)}"
                )
        opts = cls(**options)
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in ("debug", "verify"):
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

    def use_inductor(self, on_cuda: bool) -> bool:
        return on_cuda if self.inductor == "auto" else bool(self.inductor)

    def kernel_impl(self, on_cuda: bool) -> str:
        """'triton' or 'torch' for the expert compute of each block."""
        if self.kernels == "auto":
            return "triton" if on_cuda else "torch"
        return self.kernels
