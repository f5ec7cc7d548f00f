"""The families that are not exact today, with the cause (:data:`KNOWN_GAPS`), the check of a sweep against
them (:func:`check_rows`), the sweep's JSON, and the docs' tables (:func:`update_docs`).
"""

from __future__ import annotations

import dataclasses
import re

from .configs import TINY_EXPERTS
from .family import HEADER, Row
from .sweep import format_table, summary


@dataclasses.dataclass(frozen=True)
class Gap:
    status: str  # the row's status today
    reason: str  # a substring of the row's reason (what the backend or the build says)
    cause: str  # why, from the family's modeling code (docs/coverage.md)


#: families that are not detected-and-exact today, with the reason the row must give
KNOWN_GAPS: dict[str, Gap] = {
    # --- skipped: the expert-loop families `prepare` rewrites; what it must leave alone, with the reason ---
    "jetmoe": Gap(
        "skipped",
        "mixture of attention (`map`/`reduce`)",
        "the MLP MoE (`JetMoeMoE`: top-2 of the logits, a `split(expert_size)` loop, an output bias) is routed "
        "by `prepare` and found; the attention is a MoE too (`JetMoeMoA`: each expert's query projection in "
        "`map`, then attention, then its output projection in `reduce`), which the canonical op (an MLP per "
        "expert) cannot express; its `expert_size.tolist()` graph breaks make Dynamo run a whole frame eagerly "
        "(at fp32 layer 1, MLP included: 1 of the 2 MLP blocks found)",
    ),
    "vitpose_backbone": Gap(
        "skipped",
        "single nn.Linear layers, not MLPs",
        "no router: `VitPoseNaiveMoe` picks one expert per image from the `dataset_index` input (a mask "
        "`indices == i` over a dense loop of E single `nn.Linear`), and the expert output is concatenated (`cat`) "
        "after a shared `fc2`'s, not summed: outside the canonical op; `prepare` names it",
    ),
    "doge": Gap(
        "skipped",
        "experts stored as table rows",
        "retrieval experts: rows of two `nn.Embedding(E, H)` tables picked by product-key top-k, i.e. rank-1 "
        "experts `w * up_e * act(down_e . x)` (I = 1); the canonical op could compute them (non-gated, I = 1), "
        "but the detector starts from expert weights `[E, ., .]` reaching a matmul, and `prepare` has no "
        "rewrite for this module: the backend says so and leaves it",
    ),
    # --- skipped with a reason ---
    "ergo": Gap(
        "skipped",
        "ops the canonical activations do not contain: mean, new_ones, rsqrt",
        "each (token, expert) route is its own row, then an RMSNorm whose scale is the expert's own "
        "(`ErgoExpertNorm`: `weight[expert_ids]`), then the routing weight: a norm between the experts and the "
        "weighted sum, with a per-expert scale, which neither the canonical op nor `PostNormExperts` (one norm "
        "shared by every expert, MuseSpark) expresses; the backend names the norm's ops and leaves the block",
    ),
    # --- not built: the generic tiny config or the family's inputs do not fit ---
    "diffusion_gemma_text": Gap(
        "not-built",
        "no model class registered",
        "a text sub-config with no model class of its own (covered by `diffusion_gemma`)",
    ),
    "dots3_note": Gap(
        "not-built",
        "validate_architecture",
        "the tiny config fails the family's validation (per-layer `indexed_attention` config must be "
        "homogeneous); needs a hand-written tiny config",
    ),
    "dots3_note_text": Gap("not-built", "validate_architecture", "as `dots3_note`"),
    "dots3_note_vision_encoder": Gap(
        "not-built",
        f"no module with {TINY_EXPERTS} experts",
        "vision MoE layers are named by index in `per_layer_config` (layers 25-39): "
        "the two-layer tiny config keeps none; and the encoder needs `grid_thw` inputs",
    ),
    "ernie4_5_vl_moe": Gap(
        "not-built",
        "expanded size of the tensor",
        "text and vision experts share one expert list (`moe_num_experts` per modality); the "
        "generic shrink breaks their split; needs a hand-written tiny config",
    ),
    "ernie4_5_vl_moe_text": Gap("not-built", "expanded size of the tensor", "as `ernie4_5_vl_moe`"),
    "nemo_speechlm": Gap("not-built", "audio_hidden_size", "generic tiny config: nested audio sizes must agree"),
    "nemotron_h_omni": Gap("not-built", "no model class registered", "no model class in the auto mappings"),
    "qwen3_omni_moe": Gap(
        "not-built",
        "no model class registered",
        "no model class in the auto mappings (its MoE thinker, `qwen3_omni_moe_thinker`, is covered)",
    ),
    "qwen3_omni_moe_text": Gap("not-built", "no model class registered", "as `qwen3_omni_moe`"),
    "qwen3_omni_moe_talker_text": Gap("not-built", "no model class registered", "as `qwen3_omni_moe`"),
    "vitpose": Gap(
        "not-built",
        "no model class registered",
        "no model class in the auto mappings (its MoE backbone is `vitpose_backbone`)",
    ),
}


def check_rows(rows: list[Row]) -> list[str]:
    """What is wrong with a coverage table: a family neither exact nor a known gap, or a known gap that changed."""
    problems = []
    for row in rows:
        gap = KNOWN_GAPS.get(row.family)
        if row.status == "inexact":
            problems.append(f"{row.family}: INEXACT: {row.reason}")
        elif gap is None and row.status != "exact":
            problems.append(f"{row.family}: {row.status} and not a known gap: {row.reason or '(no reason given)'}")
        elif gap is not None and row.status == "exact":
            problems.append(f"{row.family}: now detected and exact: remove it from KNOWN_GAPS and docs/coverage.md")
        elif gap is not None and (row.status != gap.status or gap.reason not in row.reason):
            problems.append(f"{row.family}: expected {gap.status} ({gap.reason!r}), got {row.status}: {row.reason}")
        elif row.status == "not-built" and not row.reason:
            problems.append(f"{row.family}: not built, no reason given")
    return problems


def write_json(rows: list[Row], path: str) -> None:
    import json

    import transformers

    data = {"transformers": transformers.__version__, "rows": [dataclasses.asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def read_json(path: str) -> list[Row]:
    import json

    with open(path) as f:
        return [Row(**r) for r in json.load(f)["rows"]]


def _section(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name} -->)(.*?)(<!-- /{name} -->)", re.DOTALL)


def gaps_table() -> str:
    """The known gaps as a markdown table (docs/coverage.md carries it)."""
    lines = ["| family | status today | cause |", "|---|---|---|"]
    for family, gap in sorted(KNOWN_GAPS.items()):
        lines.append(f"| `{family}` | {'**missed**' if gap.status == 'missed' else gap.status} | {gap.cause} |")
    return "\n".join(lines)


def update_docs(rows: list[Row], readme: str = "README.md", doc: str = "docs/coverage.md") -> list[str]:
    """Write the summary sentence into ``readme``, the gaps and the table into ``doc`` (between marks)."""
    changed = []
    table = summary(rows) + "\n\n" + format_table(rows, markdown=True)
    for path, sections in ((readme, {"coverage": summary(rows)}), (doc, {"gaps": gaps_table(), "coverage": table})):
        with open(path) as f:
            old = f.read()
        new = old
        for name, text in sections.items():
            pattern = _section(name)
            if not pattern.search(new):
                raise ValueError(f"{path} has no <!-- {name} --> ... <!-- /{name} --> section to update")
            new = pattern.sub(lambda m, text=text: f"{m.group(1)}\n{text}\n{m.group(3)}", new)
        if new != old:
            with open(path, "w") as f:
                f.write(new)
            changed.append(path)
    return changed


def documented_rows(doc: str = "docs/coverage.md") -> tuple[str, dict[str, dict[str, str]]]:
    """What :func:`update_docs` last wrote into ``doc``: the transformers version of the sweep and, per family,
    its cells by :data:`~.family.HEADER` name (``status``, ``blocks/expert modules``, ...).

    The per-family tests check each family against its row, so that the table (and README's sentence, made
    from the same rows) stays what the installed transformers gives.
    """
    with open(doc) as f:
        match = _section("coverage").search(f.read())
    if match is None:
        raise ValueError(f"{doc} has no <!-- coverage --> ... <!-- /coverage --> section")
    sentence, *lines = match.group(2).strip().splitlines()
    version = re.search(r"transformers (\S+):", sentence)
    if version is None:
        raise ValueError(f"{doc}: the coverage section does not start with summary()'s sentence: {sentence!r}")
    rows = {}
    for line in lines:
        if not line.startswith("| ") or line.startswith(("| family ", "|---")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[cells[0]] = dict(zip(HEADER, cells, strict=True))
    return version.group(1), rows
