"""init_distributed picks a visible GPU (issue 21, finding 12): SLURM may bind each task to one GPU
(``CUDA_VISIBLE_DEVICES`` of one id, ``device_count() == 1``) while ``LOCAL_RANK`` counts the node's tasks."""

import torch
import torch.distributed as dist

from llada_scale.training import engine


def test_set_device_wraps_local_rank_to_visible_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no process group is started
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert engine.init_distributed() == (3, 3, 4)
    assert chosen == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # all four GPUs visible: LOCAL_RANK itself
    engine.init_distributed()
    assert chosen == [0, 3]
