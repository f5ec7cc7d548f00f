"""The GPU suite's parts, one module per section of ``benchmarks/gpu_suite.py`` (the command)."""

from __future__ import annotations
