"""moe_compile: a torch.compile backend for prefill-only serving of MoE models.

::

    import moe_compile
    fast = torch.compile(model, backend="moe_prefill", options={...})
    print(moe_compile.explain(model, input_ids))

See README.md and docs/architecture.md.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers the moe_compile::moe custom op)
from .backend import BACKEND_NAME, last_report, moe_prefill_backend, register
from .explain import explain
from .options import Options
from .prepare import prepare, prepare_report
from .report import BlockReport, Report, Skipped
from .routing_stats import RoutingStats, RoutingStatsError, collect_routing_stats
from .spec import ExpertSpec

__version__ = "0.1.0"
__all__ = [
    "BACKEND_NAME",
    "BlockReport",
    "ExpertSpec",
    "Options",
    "Report",
    "RoutingStats",
    "RoutingStatsError",
    "Skipped",
    "collect_routing_stats",
    "explain",
    "last_report",
    "moe_prefill_backend",
    "prepare",
    "prepare_report",
]

register()
