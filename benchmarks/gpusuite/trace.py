"""Overlap from a profiler trace: the share of expert-copy time that overlaps compute (:func:`copy_overlap`)."""

from __future__ import annotations

from typing import Any

#: CPU ops that count as compute in a CPU trace (a GPU trace uses the compute stream's kernels)
CPU_COMPUTE = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::linear"}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two unions of disjoint sorted intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def copy_overlap(events: list[dict]) -> dict[str, Any]:
    """How much expert-copy time overlaps compute, from Chrome-trace events (torch.profiler's export).

    GPU trace: copies are host-to-device memcpys (``cat == "gpu_memcpy"``, ``HtoD`` in the name); compute is the
    kernels of the compute stream (the stream with the most kernel time). Copies on other streams are the
    prefetches (``ahead``); copies on the compute stream are on demand and by construction overlap nothing there.
    CPU trace (no GPU events): copies are ``aten::copy_`` ops, compute the matmul ops, lanes are threads.
    Times in microseconds; fractions of the copy time (None when there was none).
    """
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    kernels = [e for e in complete if e.get("cat") == "kernel"]
    gpu = bool(kernels)
    if gpu:

        def lane(e: dict) -> Any:
            return (e.get("args") or {}).get("stream", e.get("tid"))

        compute_events = kernels
        copies = [e for e in complete if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    else:

        def lane(e: dict) -> Any:
            return (e.get("pid"), e.get("tid"))

        cpu_ops = [e for e in complete if e.get("cat") == "cpu_op"]
        compute_events = [e for e in cpu_ops if e.get("name") in CPU_COMPUTE]
        copies = [e for e in cpu_ops if e.get("name") == "aten::copy_"]
    busy: dict[Any, float] = {}
    for e in compute_events:
        busy[lane(e)] = busy.get(lane(e), 0.0) + float(e["dur"])
    compute_lane = max(busy, key=busy.get) if busy else None

    def span(e):
        return (float(e["ts"]), float(e["ts"]) + float(e["dur"]))

    compute = _union([span(e) for e in compute_events if lane(e) == compute_lane])
    ahead = _union([span(e) for e in copies if lane(e) != compute_lane])
    on_demand = _union([span(e) for e in copies if lane(e) == compute_lane])
    overlapped = _intersection(ahead, compute)
    copy_us = _length(ahead) + _length(on_demand)
    return {
        "trace_kind": "gpu" if gpu else "cpu",
        "compute_lane": str(compute_lane),
        "compute_us": _length(compute),
        "copy_us": copy_us,
        "copy_ahead_us": _length(ahead),
        "copy_on_demand_us": _length(on_demand),
        "overlapped_us": overlapped,
        "copy_overlap_fraction": overlapped / copy_us if copy_us else None,
        "ahead_overlap_fraction": overlapped / _length(ahead) if ahead else None,
        "copy_events": len(copies),
    }
