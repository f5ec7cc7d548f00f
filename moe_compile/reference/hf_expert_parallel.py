"""Hugging Face's own expert parallelism (``AllToAllEP``), made traceable: what ``moe_compile.prepare`` does to it.

transformers (5.x, ``transformers.distributed``) runs an experts module expert-parallel by
replacing its ``forward`` with a closure over an ``EPImplementation``; ``AllToAllEP`` sorts the
pairs by expert, exchanges per-expert counts with a *non-functional* ``all_to_all_single``,
reads the split sizes back with ``.tolist()``, dispatches with ``all_to_all_single_autograd``,
runs the experts on local ids, combines and takes the weighted sum. Under Dynamo that
forward breaks into about ten graphs per MoE layer (DTensor parameters swapped for their
local shards, the host read, ``setitem``), and the split sizes are baked into the graphs as
constants, so no single graph holds a dispatch -> experts -> combine pattern.

:func:`make_traceable` replaces such a module by
:class:`moe_compile.reference.ExpertParallelExperts` holding the same local shards (plain
tensors) on the same ranks: the same dispatch, local experts and combine, written with
functional collectives, which trace into one graph (:func:`.expert_parallel.traceable`).
It is replaced only after two checks on random inputs: the local experts equal the HF
experts' own forward on local ids (no collective), and the whole block equals HF's
``AllToAllEP`` forward (collective: every rank must call :func:`moe_compile.prepare` at the
same point, as it must load the model).

:func:`apply_hf_expert_parallel` applies HF's expert parallelism to a built model the way
``from_pretrained(..., distributed_config=DistributedConfig(ep_size=W, ...))`` does
(``apply_expert_parallelism`` with the model's ``ep_plan``), without the FSDP2 of the dense
weights that ``from_pretrained`` adds when ``fsdp_size > 1``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import verify
from ..spec import ACTIVATIONS, ExpertSpec
from .expert_parallel import ExpertParallelExperts


def _ep_module():
    """transformers' expert-parallel module, or None when the installed release has none."""
    try:
        from transformers.distributed import expert_parallel
    except ImportError:
        return None
    return expert_parallel if hasattr(expert_parallel, "AllToAllEP") else None


def apply_hf_expert_parallel(model: nn.Module, ep_implementation: str = "all_to_all") -> nn.Module:
    """Shard ``model``'s experts over torch.distributed's world with HF's own EP (in place); returns ``model``."""
    ep = _ep_module()
    if ep is None:
        raise RuntimeError("this transformers release has no transformers.distributed.expert_parallel.AllToAllEP")
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    W = dist.get_world_size()
    config = DistributedConfig(ep_size=W, fsdp_size=W, ep_implementation=ep_implementation)
    _, meshes = initialize_distributed_mesh(config)
    model.config.distributed_config = config
    _, ep_plan, _ = model._resolve_parallel_plans(config)
    return ep.apply_expert_parallelism(model, meshes.get_mesh("ep"), meshes.get_mesh("tp"), ep_plan, ep_implementation)


def all_to_all_implementation(module: nn.Module):
    """The ``AllToAllEP`` behind an HF expert-parallel experts module's forward, or None."""
    ep = _ep_module()
    forward = module.__dict__.get("forward")
    if ep is None or forward is None or not getattr(forward, "__closure__", None):
        return None
    for cell in forward.__closure__:
        value = cell.cell_contents
        if isinstance(value, ep.AutoEP) and value.megamoe is None:
            value = value.all_to_all  # what AutoEP runs at inference when the ranks hold different batches
        if isinstance(value, ep.AllToAllEP):
            return value
    return None


def make_traceable(module: nn.Module, implementation) -> ExpertParallelExperts | str:
    """:class:`ExpertParallelExperts` equal to ``module``'s HF AllToAll forward, or why not."""
    if implementation.tp_mesh.size() != 1:
        return "tensor parallelism inside the expert group (tp_size > 1) is not handled"
    group = implementation.ep_mesh.get_group()
    if dist.get_process_group_ranks(group) != list(range(dist.get_world_size())):
        return "the expert-parallel group is not the whole world in rank order"
    local = {}
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        p = getattr(module, name, None)
        local[name] = p.to_local().detach() if hasattr(p, "to_local") else (p.detach() if p is not None else None)
    if local["gate_up_proj"] is None or local["down_proj"] is None:
        return "the experts module has no gate_up_proj/down_proj expert weights"
    transposed = bool(getattr(module, "is_transposed", False))
    if not getattr(module, "has_gate", True):
        return "non-gated experts are not handled"
    gen = torch.Generator().manual_seed(0)
    for act in ACTIVATIONS:
        for layout in ("concat", "interleaved"):
            constants = _swiglu_constants(module, act)
            spec = ExpertSpec(activation=act, gate_layout=layout, transposed=transposed, **constants)
            candidate = ExpertParallelExperts(
                local["gate_up_proj"], local["down_proj"], local["gate_up_proj_bias"], local["down_proj_bias"],
                spec, group=dist.group.WORLD,
            )  # fmt: skip
            if _same_local_experts(module, implementation, candidate, gen):
                # NOTE: collective: every rank runs both forwards on random inputs
                if _same_block(module, candidate):
                    return candidate
                return "the block's AllToAll forward differs from the reference dispatch/combine on random inputs"
    return "no canonical expert form (activation, gate layout) reproduces the local experts"


def _swiglu_constants(module: nn.Module, act: str) -> dict:
    if act == "swiglu_softcap":  # Inkling2SoftcappedSwiGLU keeps its caps in Inkling2Softcap modules
        act_fn = getattr(module, "act_fn", None)
        caps = [getattr(getattr(act_fn, name, None), "softcap", None) for name in ("gate_softcap", "up_softcap")]
        if not all(isinstance(c, (int, float)) and c > 0 for c in caps):
            return {}
        return {"gate_softcap": float(caps[0]), "up_softcap": float(caps[1])}
    if act != "swiglu_oai":
        return {}
    return {
        "alpha": float(getattr(module, "alpha", ExpertSpec.alpha)),
        "limit": float(getattr(module, "limit", ExpertSpec.limit)),
    }


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return verify.close(a, b)


@torch.no_grad()
def _same_local_experts(module: nn.Module, implementation, candidate: ExpertParallelExperts, gen) -> bool:
    """The local experts alone, one expert per row with random weights: HF's forward vs the candidate's."""
    from transformers.distributed.parallel_utils import _use_local_dtensor_params

    from .expert_parallel import batched_experts

    w = candidate.w_up
    R, E_r, H = 11, w.shape[0], w.shape[1] if candidate.spec.transposed else w.shape[2]
    x = torch.randn(R, H, generator=gen).to(w.device, w.dtype)
    ids = torch.randint(0, E_r, (R, 1), generator=gen).to(w.device)
    weights = torch.rand(R, 1, generator=gen).to(w.device, w.dtype)
    with _use_local_dtensor_params(module):
        expected = implementation.experts_forward(x, ids, weights)
    c = candidate
    got = batched_experts(x, ids, weights, c.w_up, c.w_down, c.b_up, c.b_down, c.spec)
    return _close(got, expected)


@torch.no_grad()
def _same_block(module: nn.Module, candidate: ExpertParallelExperts) -> bool:
    """HF's AllToAll forward vs the candidate's, on random tokens that differ per rank (collective)."""
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    w = candidate.w_up
    E, H = w.shape[0] * candidate.world_size, w.shape[1] if candidate.spec.transposed else w.shape[2]
    T, K = 7 + dist.get_rank(), min(2, E)
    x = torch.randn(T, H, generator=gen).to(w.device, w.dtype)
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :K].to(w.device)
    weights = torch.rand(T, K, generator=gen).to(w.device, w.dtype)
    expected = module(x, ids, weights)
    return _close(candidate(x, ids, weights), expected)
