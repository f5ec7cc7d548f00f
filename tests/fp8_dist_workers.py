"""Workers of the multi-rank fp8 tests (run by ``dist_workers.spawn`` in gloo groups)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_aep_worker(rank: int, world_size: int, overrides: dict) -> dict:
    """A tiny fp8 Qwen3-MoE under AEP against the same model on this rank alone; gathered bytes vs bf16's."""
    import moe_compile
    from moe_compile.testing import zoo
    from moe_compile.testing.fp8 import quantize_model

    out = {}
    model = zoo.build("qwen3_moe", dtype=torch.bfloat16, seed=0, overrides=overrides)  # same weights on every rank
    fp8, _ = quantize_model(model)
    moe_compile.prepare(fp8)
    batch = zoo.make_inputs(model, batch=2, seq=5 + rank, seed=100 + rank)  # each rank its own requests
    for name, m in (("fp8", fp8), ("bf16", model)):
        torch._dynamo.reset()
        with torch.no_grad():
            expected = zoo.logits(m, batch)  # single rank, eager (fp8: the torch W8A8 emulation)
            compiled = torch.compile(m, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
            with moe_compile.backend.collect_reports() as report:
                got = zoo.logits(compiled, batch)
        out[name] = {
            "error": rel_err(got, expected),
            "equal": bool(torch.equal(got, expected)),
            "blocks": [(b.path, b.quantization) for b in report.blocks],
            "gather_bytes": [b.schedule.get("gather_bytes") for b in report.blocks],
            "skipped": [(s.where, s.reason) for s in report.skipped],
        }
    torch._dynamo.reset()  # EP: the AllToAll runtime has no fp8 path; the blocks stay replicated, named in the report
    fp8, _ = quantize_model(zoo.build("qwen3_moe", dtype=torch.bfloat16, seed=0, overrides=overrides))  # AEP released
    moe_compile.prepare(fp8)
    with torch.no_grad():
        expected = zoo.logits(fp8, batch)
        compiled = torch.compile(fp8, backend="moe_prefill", options={"parallel": "ep", "inductor": False})
        with moe_compile.backend.collect_reports() as report:
            got = zoo.logits(compiled, batch)
    out["ep"] = {"equal": bool(torch.equal(got, expected)), "skipped": [s.reason for s in report.skipped]}
    return out


def _checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read whole with safetensors itself (not moe_compile's reader)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _expected_rows(stored: dict, experts: str, prepared: str, start: int, stop: int) -> torch.Tensor:
    """The rows ``[start, stop)`` of a prepared fp8 expert tensor (``w_up``, ``w_up_scale``, ...), built from the
    stored tensors: a stacked one sliced, or the per-expert ones of those experts stacked (gate rows, then up)."""
    role = {"w_up": "gate_up_proj", "w_down": "down_proj"}[prepared.removesuffix("_scale")]
    scale = prepared.endswith("_scale")
    stacked = f"{experts}.{role}" + ("_scale_inv" if scale else "")
    if stacked in stored:
        return stored[stacked][start:stop]
    projections = ("gate_proj", "up_proj") if role == "gate_up_proj" else ("down_proj",)
    suffix = "weight_scale_inv" if scale else "weight"
    return torch.stack(
        [torch.cat([stored[f"{experts}.{e}.{p}.{suffix}"] for p in projections]) for e in range(start, stop)]
    )


def fp8_sharded_load_worker(rank: int, world_size: int, paths: list[str]) -> list[dict]:
    """Per fp8 checkpoint: the rank's sharded load against the stored tensors (bytes, scales, what was read),
    then its AEP compile against the eager logits of a whole load on this rank's own batch."""
    import moe_compile
    from moe_compile.loading.checkpoint import Checkpoint
    from moe_compile.quant.loading import load_fp8_model
    from moe_compile.quant.prepare_fp8 import FP8StackedExperts
    from moe_compile.runtime import shards
    from moe_compile.testing import zoo

    out = []
    for path in paths:
        facts: dict = {}
        whole = load_fp8_model(path)
        batch = zoo.make_inputs(whole, batch=2, seq=5 + rank, seed=100 + rank)  # each rank its own requests
        with torch.no_grad():
            expected = zoo.logits(whole, batch)
        del whole
        reads: list[tuple[str, int | None, int | None]] = []
        read = Checkpoint.read

        def recording(self, key, start=None, stop=None, _read=read, _reads=reads):
            _reads.append((key, start, stop))
            return _read(self, key, start, stop)

        Checkpoint.read = recording
        try:
            model = load_fp8_model(path, parallel="aep")
        finally:
            Checkpoint.read = read
        stored = _checkpoint_tensors(path)
        mismatched, kept, full_storage, shard_shapes = [], 0, 0, set()
        for name, module in model.named_modules():
            if not isinstance(module, FP8StackedExperts):
                continue
            E = module.num_experts
            start, stop = shards.expert_range(E, world_size, rank)
            for attr in ("w_up", "w_down", "w_up_scale", "w_down_scale"):
                param = getattr(module, attr)
                full_storage += param.untyped_storage().nbytes()
                (shard,) = shards.registered(param)
                shard_shapes.add((tuple(shard.shape), tuple(param.shape)))
                want = _expected_rows(stored, name, attr, start, stop)
                same = shard.dtype == want.dtype and torch.equal(shard.view(torch.uint8), want.view(torch.uint8))
                if not same:
                    mismatched.append(f"{name}.{attr}")
                kept += shard.nbytes
        expert_keys = [k for k in stored if ".experts." in k]
        facts["stored_expert_bytes"] = sum(stored[k].nbytes for k in expert_keys)
        facts["stored_fp8_dtypes"] = sorted({str(stored[k].dtype) for k in expert_keys})
        facts.update(mismatched=mismatched, kept_bytes=kept, full_storage_bytes=full_storage)
        facts["shard_shapes"] = sorted(shard_shapes)
        facts["info"] = model.moe_compile_load
        facts["expert_reads"] = [r for r in reads if ".experts." in r[0]]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moe_prefill", options={"parallel": "aep", "inductor": False})
        with torch.no_grad(), moe_compile.backend.collect_reports() as report:
            got = zoo.logits(compiled, batch)
        facts["equal"] = bool(torch.equal(got, expected))
        facts["error"] = rel_err(got.float(), expected.float())
        facts["blocks"] = [b.quantization for b in report.blocks]
        facts["skipped"] = [(s.where, s.reason) for s in report.skipped]
        facts["released_bytes"] = report.released_bytes
        out.append(facts)
    return out


def fp8_load_error_worker(rank: int, world_size: int, path: str) -> str:
    """The error this rank raises loading ``path`` with ``parallel="aep"``."""
    import torch.distributed as dist

    from moe_compile.quant.loading import load_fp8_model

    try:
        load_fp8_model(path, parallel="aep")
    except ValueError as exc:
        dist.barrier()  # every rank got here: none waits on a failed peer
        return f"{type(exc).__name__}: {exc}"
    return "loaded"
