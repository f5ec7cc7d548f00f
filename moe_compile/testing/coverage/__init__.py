"""Which mixture-of-experts families of the installed transformers the backend covers.

Enumerates the families from transformers' own registry (``CONFIG_MAPPING_NAMES``), not
from a fixed list: a model type is a MoE family when its default config (or a config nested
in it, e.g. ``text_config``) carries an expert count, i.e. an attribute named like
``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` / ``moe_num_experts``
(:func:`expert_count_keys`). For each family a tiny config is built (the zoo's, where
:mod:`moe_compile.testing.zoo` has the family; otherwise the default config shrunk
generically by :func:`tiny_config`), the model class the family registers is built with
random weights in fp32, and the backend is run against eager:

- ``moe_compile.explain`` on the inputs: the blocks found and the ones skipped (with reasons);
- ``torch.compile(backend="moe_prefill")`` (eager execution of the rewritten graph, no
  Inductor) against the eager model at two sequence lengths.

Each family gets one :class:`Row`; its ``status`` is one of

- ``exact``: every expert module of the tiny model was found as a block, rewritten, and the
  compiled outputs equal eager's (relative error below :data:`TOLERANCE`);
- ``skipped``: the backend saw the block(s) and left them (or some) alone, saying why;
- ``missed``: fewer blocks than the model has expert modules and no reason given;
- ``inexact``: compiled differs from eager (a wrong result: never acceptable);
- ``not-built``: the tiny model could not be built or run; the reason says why.

:data:`KNOWN_GAPS` lists the families that are not ``exact`` today, with their status and
the precise cause (documented in ``docs/coverage.md``); ``tests/test_coverage.py`` fails on
any other family that is not exact, on a known gap whose status or reason changed (fixed:
remove it from the list), and names a family that a new transformers release added.
``moe-compile coverage`` prints the table.

The package, by section: :mod:`.families`, :mod:`.configs`, :mod:`.family` (one family), :mod:`.sweep`
and :mod:`.gaps` (known gaps, JSON, docs); every name is re-exported here.
"""

from __future__ import annotations

from .common import quiet as _quiet
from .configs import TINY_EXPERTS, TINY_OVERRIDES, tiny_config
from .families import expert_count_keys, family_entry, moe_families
from .family import (
    HEADER,
    SEQ_LENS,
    STATUSES,
    TOLERANCE,
    Row,
    _build_model,
    _inputs,
    _model_class,
    _output,
    check_family,
)
from .gaps import KNOWN_GAPS, Gap, check_rows, documented_rows, gaps_table, read_json, update_docs, write_json
from .sweep import check_one, format_table, run_coverage, summary

__all__ = [
    "HEADER",
    "KNOWN_GAPS",
    "SEQ_LENS",
    "STATUSES",
    "TINY_EXPERTS",
    "TINY_OVERRIDES",
    "TOLERANCE",
    "Gap",
    "Row",
    "check_family",
    "check_one",
    "check_rows",
    "documented_rows",
    "expert_count_keys",
    "family_entry",
    "format_table",
    "gaps_table",
    "moe_families",
    "read_json",
    "run_coverage",
    "summary",
    "tiny_config",
    "update_docs",
    "write_json",
]
# the helpers tests reuse (building a family's tiny model, its inputs, quiet logs)
_HELPERS = (_quiet, _build_model, _inputs, _model_class, _output)
