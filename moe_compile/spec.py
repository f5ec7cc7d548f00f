"""The canonical description of a block's experts: one frozen dataclass.

Every pass after detection works on one operation, ``moe_compile::moe``
(:mod:`moe_compile.ops`), and the variants of expert math it supports are the
fields of :class:`ExpertSpec`. The spec travels inside the graph as a short
string argument of the op (custom-op schemas take no dataclasses), written by
:meth:`ExpertSpec.encode` and read back, cached, by :func:`ExpertSpec.decode`.

Weight layouts (``E`` experts, hidden ``H``, intermediate ``I``, ``N = 2I`` when
gated else ``I``)::

    transposed=False:  w_up [E, N, H]   w_down [E, H, I]   (y = x @ w.T, like nn.Linear)
    transposed=True:   w_up [E, H, N]   w_down [E, I, H]   (y = x @ w,   GPT-OSS)
    biases (optional): b_up [E, N]      b_down [E, H]

Gated experts split the up projection into gate and up halves: ``concat`` puts
the gate in the first ``I`` columns (``chunk(2)``), ``interleaved`` alternates
gate and up columns (``[..., ::2]`` and ``[..., 1::2]``, GPT-OSS).
"""

from __future__ import annotations

import dataclasses
import functools

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_softcap")
#: activations with constants of their own (read from the model, never guessed): gated only
PARAMETRIC = ("swiglu_oai", "swiglu_softcap")
GATE_LAYOUTS = ("concat", "interleaved")
#: where a plain gated activation is bounded by ``limit`` (GLM-5-Next's and HY-V4's ``swiglu_limit``:
#: ``act(gate.clamp(max=limit)) * up.clamp(-limit, limit)``; Step-3.7's ``swiglu_limits``:
#: ``act(gate).clamp(max=limit) * up.clamp(-limit, limit)``)
CLAMPS = ("none", "before", "after")
#: weight quantization forms: "none" (weights in the activation dtype), "fp8_block" (e4m3 weights, one scale per
#: ``block_n x block_k`` block, W8A8 with dynamic per-token activation quantization; :mod:`moe_compile.quant.fp8`)
QUANT_FORMS = ("none", "fp8_block")


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """How one block's experts compute ``down(act(up(x)))``."""

    activation: str = "silu"  # one of ACTIVATIONS; "relu2" is relu(x)**2; see below for the parametric ones
    gated: bool = True  # act(gate) * up, else act(up)
    gate_layout: str = "concat"  # one of GATE_LAYOUTS (ignored when not gated)
    transposed: bool = False  # weights stored [E, in, out] instead of [E, out, in]
    alpha: float = 1.702  # swiglu_oai (GPT-OSS's clamped SwiGLU): glu = gate * sigmoid(alpha * gate)
    limit: float = 7.0  # swiglu_oai or clamp != "none": gate clamped above, up clamped to [-limit, limit]
    #: a non-parametric gated activation bounded by ``limit``: "before" clamps the gate before the activation,
    #: "after" clamps the activated gate; the up half is clamped to [-limit, limit] in both (see CLAMPS)
    clamp: str = "none"
    # swiglu_softcap (Inkling 2's softcapped SwiGLU), computed in fp32 whatever the weights' dtype:
    #   cap(gate, gate_softcap) * sigmoid(gate) * cap(up, up_softcap),   cap(x, c) = tanh(x / c) * c
    gate_softcap: float = 4.0
    up_softcap: float = 25.0
    #: the routing weight scales the expert's *input* (``expert(w * x)``, Llama 4) instead of its output
    scale_input: bool = False
    # [fp8] the experts' weight quantization (QUANT_FORMS); with "fp8_block" the op is moe_compile::moe_fp8 and
    # takes the scales too: one per block_n x block_k block of each weight, in scale_dtype (dequantized = q * s)
    quant: str = "none"
    block_n: int = 0
    block_k: int = 0
    scale_dtype: str = "-"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.gate_layout not in GATE_LAYOUTS:
            raise ValueError(f"unknown gate layout {self.gate_layout!r}; expected one of {GATE_LAYOUTS}")
        if self.activation in PARAMETRIC and not self.gated:
            raise ValueError(f"{self.activation} is a gated activation")
        if self.clamp not in CLAMPS:
            raise ValueError(f"unknown clamp {self.clamp!r}; expected one of {CLAMPS}")
        if self.clamp != "none" and (not self.gated or self.activation in PARAMETRIC):
            raise ValueError(f"clamp={self.clamp!r} bounds a plain gated activation, not {self.describe_plain()}")
        if not (self.gate_softcap > 0 and self.up_softcap > 0):
            raise ValueError(f"softcaps must be positive, got {self.gate_softcap} and {self.up_softcap}")
        if self.quant not in QUANT_FORMS:
            raise ValueError(f"unknown quantization {self.quant!r}; expected one of {QUANT_FORMS}")
        if self.quant == "fp8_block":
            self._check_fp8_block()

    def _check_fp8_block(self) -> None:
        """The constraints of ``quant="fp8_block"`` (ValueError); the arithmetic is :mod:`moe_compile.quant.fp8`."""
        if self.block_n <= 0 or self.block_k <= 0:
            raise ValueError(f"fp8_block needs a positive block, got {self.block_n}x{self.block_k}")
        if self.scale_dtype != "float32":
            raise ValueError(
                f"fp8_block scales must be float32 in the op, got {self.scale_dtype}; convert them with "
                "moe_compile.quant.fp8.scales_to_float32"
            )
        if self.transposed:
            raise ValueError(
                "fp8_block weights are [E, out, in] (transposed=False): transposed fp8 experts unsupported"
            )
        if self.gated and self.gate_layout != "concat":
            raise ValueError("fp8_block gated experts need the concat gate/up layout: interleaved rows straddle blocks")

    def encode(self) -> str:
        """A compact, stable string, e.g. ``activation=silu;gated=1;gate_layout=concat;...``.

        Floats are written with ``repr`` (the shortest string that reads back as the same
        double), so :meth:`decode` returns an equal spec.
        """
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            text = int(value) if isinstance(value, bool) else repr(value) if isinstance(value, float) else value
            parts.append(f"{f.name}={text}")
        return ";".join(parts)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> ExpertSpec:
        kwargs: dict[str, object] = {}
        types = {f.name: f.type for f in dataclasses.fields(ExpertSpec)}
        for item in text.split(";"):
            key, _, value = item.partition("=")
            if key not in types:
                raise ValueError(f"unknown ExpertSpec field {key!r} in {text!r}")
            kind = types[key]
            convert = {"bool": lambda v: bool(int(v)), "float": float, "int": int}.get(kind, str)
            kwargs[key] = convert(value)
        return ExpertSpec(**kwargs)  # type: ignore[arg-type]

    def describe(self) -> str:
        """Human-readable activation, e.g. ``SiLU-gated`` or ``clamped SwiGLU (alpha=1.702, limit=7)``."""
        scaled = ", routing weight scales the input" if self.scale_input else ""
        if self.activation == "swiglu_oai":
            return f"clamped SwiGLU (alpha={self.alpha:g}, limit={self.limit:g}){scaled}"
        if self.activation == "swiglu_softcap":
            return f"softcapped SwiGLU (gate cap={self.gate_softcap:g}, up cap={self.up_softcap:g}){scaled}"
        clamped = "" if self.clamp == "none" else f", clamped at {self.limit:g} {self.clamp} the activation"
        return self.describe_plain() + clamped + scaled

    def describe_plain(self) -> str:
        """The activation's name and gating alone, e.g. ``SiLU-gated``."""
        if self.activation in PARAMETRIC:
            return self.activation
        names = {"silu": "SiLU", "gelu": "GELU", "gelu_tanh": "GELU-tanh", "relu": "ReLU", "relu2": "ReLU²"}
        name = names[self.activation]
        return f"{name}-gated" if self.gated else f"{name} (non-gated)"

    def describe_quant(self) -> str:
        """``-`` or, e.g., ``fp8 e4m3 W8A8, 128x128 weight blocks, float32 scales``."""
        if self.quant == "none":
            return "-"
        return f"fp8 e4m3 W8A8, {self.block_n}x{self.block_k} weight blocks, {self.scale_dtype} scales"
