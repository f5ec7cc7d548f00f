"""Reference modules moe_compile ships for comparison (not used by the backend's passes)."""

from .expert_parallel import ExpertParallelExperts, ExpertParallelLM, ExpertParallelMoE

__all__ = ["ExpertParallelExperts", "ExpertParallelMoE", "ExpertParallelLM"]
