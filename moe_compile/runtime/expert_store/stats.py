"""What an expert store's fetches brought into its device buffers, per layer, summed over calls."""

from __future__ import annotations

import dataclasses

__all__ = ["LayerStats"]


@dataclasses.dataclass
class LayerStats:
    """What one MoE layer's fetches brought into the device buffer, summed over calls."""

    layer: int
    path: str
    expert_bytes: int  # bytes of one expert (all its tensors)
    kind: str = "offload"  # the source's name, for the report line
    calls: int = 0
    bytes_ahead: int = 0  # brought by offload_prefetch
    bytes_ahead_used: int = 0  # of those, experts the router then picked
    bytes_on_demand: int = 0  # brought by moe_offload: not resident when the layer's MoE ran
    bytes_on_demand_used: int = 0  # of those, experts this router picked (less under RanksSource: other ranks' too)
    bytes_padding: int = 0  # RanksSource: padding rows of uneven gathers (moved, never resident)
    transfers: int = 0  # copies (HostSource: one per weight role and fetch) or collectives (RanksSource) issued
    fetches: int = 0  # fetches that moved something (ahead or on demand)

    @property
    def bytes_needed(self) -> int:
        """Bytes of the experts the router picked (each once per call)."""
        return self.bytes_ahead_used + self.bytes_on_demand_used

    @property
    def share_ahead(self) -> float:
        """Share of the needed bytes that were already on the device when the layer's MoE ran."""
        return self.bytes_ahead_used / self.bytes_needed if self.bytes_needed else 0.0

    def __str__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:.2f} MiB" if n >= 2**20 or not n else f"{n / 2**10:.1f} KiB"

        padding = f", padding {mib(self.bytes_padding)}" if self.bytes_padding else ""
        return (
            f"{self.kind} layer {self.layer} ({self.path}): ahead {mib(self.bytes_ahead)} "
            f"(used {mib(self.bytes_ahead_used)}), on demand {mib(self.bytes_on_demand)}{padding}, "
            f"{self.share_ahead:.0%} of needed bytes ahead, {self.calls} call(s), "
            f"{self.transfers} transfer(s) in {self.fetches} fetch(es)"
        )
