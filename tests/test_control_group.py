"""runtime.dist.control_group: the default group unless a gloo group was made beside it (one process, gloo)."""

import socket

import torch.distributed as dist

from moe_compile.runtime.dist import control_group, init_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_control_group_is_the_default_group_on_gloo_and_a_gloo_group_beside_it_when_asked(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    try:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        init_distributed(backend="gloo", timeout_s=30)  # gloo: no second group
        assert control_group() is dist.group.WORLD
        dist.destroy_process_group()
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        init_distributed(backend="gloo", timeout_s=30, control=True)  # what NCCL gets without asking
        group = control_group()
        assert group is not dist.group.WORLD and dist.get_backend(group) == "gloo"
        box = ["plan"]
        dist.broadcast_object_list(box, src=0, group=group)
        assert box == ["plan"]
        dist.destroy_process_group()
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        init_distributed(backend="gloo", timeout_s=30)  # a new default group: the old control group is not reused
        assert control_group() is dist.group.WORLD
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
