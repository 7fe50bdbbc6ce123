"""Expert parallelism for LLaDA2's MoE layers on DeepSpeed's expert-parallel process groups.

Each rank of an expert-parallel group of size P keeps E / P of every layer's routed experts (rank r: experts
r E/P .. (r+1) E/P - 1); attention, dense layers, routers and shared experts stay replicated. The router runs
locally on every rank (:mod:`llada_scale.model.moe`, unchanged: float32 sigmoid scores, selection bias,
group-limited top-k), the (token, expert) pairs it sorted by expert go to the rank holding the expert, dropless:

1. the per-expert pair counts are exchanged (one ``all_to_all_single`` of E integers),
2. the pairs' hidden states are exchanged with uneven splits (``torch.distributed.nn.functional.
   all_to_all_single``, differentiable: its backward is the reverse exchange),
3. the received rows are regrouped by local expert, run through the same grouped SwiGLU as without
   parallelism (:func:`llada_scale.model.moe.grouped_swiglu`), put back in arrival order and sent back.

Why not DeepSpeed's ``deepspeed.moe.layer.MoE``: its gate (``TopKGate``) is a softmax top-1/top-2 gate with a
capacity factor (tokens dropped or padded to equal splits), and it has no selection bias and no group-limited
top-k; AutoEP swaps in its own router for known HF architectures. LLaDA2's router cannot be expressed in either,
so only the dispatch is built here, on the process groups DeepSpeed creates
(``deepspeed.utils.groups._create_expert_and_data_parallel``, named ``ep_size_P``), which is also where DeepSpeed's
MoE-aware ZeRO would reduce expert gradients (over the expert-data-parallel group).

Gradients: an expert's gradient on its owner already sums the contributions of the tokens of every rank of the
expert-parallel group; replicated parameters need the usual data-parallel average. :func:`sync_gradients` does
both for a plain data-parallel loop (the parity tests use it): replicated gradients are averaged over the world,
expert gradients summed over the expert-data-parallel group and divided by the world size.

Not done here: wiring into the DeepSpeed engine (MoE parameter groups, per-expert checkpoint files, resume and
EP-size changes through universal checkpoints); see docs/LOG.md (2026-12-07, issue 17).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llada_scale.model.moe import Experts, MoEBlock, grouped_swiglu

__all__ = ["expert_parallel_groups", "ExpertParallelExperts", "shard_experts", "sync_gradients"]


def expert_parallel_groups(ep_size: int):
    """``(ep_group, expert_data_parallel_group)`` of this rank from DeepSpeed's groups (created when missing).

    Raises:
        ValueError: the world size is not a multiple of ``ep_size``.
    """
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"expert parallel size {ep_size} must divide the world size {world}")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a layer's routed experts; ``forward(x_sorted [M, hidden], counts [E])`` (rows sorted
    by global expert id, as :class:`~llada_scale.model.moe.MoEBlock` passes them) returns their outputs in the same
    order, computed on the experts' owners. Parameters ``gate_proj``/``up_proj`` [E/P, I, hidden] and
    ``down_proj`` [E/P, hidden, I] carry DeepSpeed's MoE marks (``allreduce=False``, ``group_name``)."""

    def __init__(self, full: Experts, group, ep_size: int, ep_rank: int):
        super().__init__()
        e = full.gate_proj.shape[0]
        if e % ep_size:
            raise ValueError(f"{e} experts do not split over expert parallel size {ep_size}")
        self.num_experts, self.ep_size, self.ep_rank, self.group = e, ep_size, ep_rank, group
        local = slice(ep_rank * e // ep_size, (ep_rank + 1) * e // ep_size)
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = nn.Parameter(getattr(full, name).detach()[local].clone())
            p.allreduce, p.group_name = False, f"ep_size_{ep_size}"
            setattr(self, name, p)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        p, el = self.ep_size, self.num_experts // self.ep_size
        send = counts.view(p, el)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[s, l]: rows from rank s for l
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = all_to_all_single(x_sorted.new_empty(sum(out_splits), x_sorted.shape[1]), x_sorted,
                                   out_splits, in_splits, group=self.group)
        # arrival order is (source rank, local expert); the experts need (local expert, source rank)
        starts = torch.cumsum(torch.cat([recv.new_zeros(1), recv.reshape(-1)]), 0)[:-1].view(p, el)
        order = torch.cat([torch.arange(int(starts[s, l]), int(starts[s, l] + recv[s, l]), device=x_sorted.device)
                           for l in range(el) for s in range(p)]) if recv.sum() else recv.new_zeros(0)
        out = grouped_swiglu(x_recv.index_select(0, order), recv.sum(0), self.gate_proj, self.up_proj, self.down_proj)
        back = out.new_zeros(out.shape).index_copy(0, order, out)
        return all_to_all_single(x_sorted.new_empty(x_sorted.shape), back, in_splits, out_splits, group=self.group)


def shard_experts(model: nn.Module, ep_size: int) -> list[int]:
    """Replace every MoE layer's routed experts of ``model`` (before DeepSpeed wraps it) by this rank's slice;
    returns the layer indices. ``ep_size`` 1 changes nothing."""
    if ep_size == 1:
        return []
    group, _ = expert_parallel_groups(ep_size)
    rank = dist.get_rank(group)
    done = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, group, ep_size, rank)
            done.append(i)
    return done


def sync_gradients(model: nn.Module, ep_size: int) -> None:
    """Data-parallel gradient averaging with expert parallelism (for loops without a DeepSpeed engine):
    replicated parameters averaged over the world; expert slices summed over the expert-data-parallel group (each
    copy's gradient already sums its expert-parallel group's tokens) and divided by the world size."""
    world = dist.get_world_size()
    edp = expert_parallel_groups(ep_size)[1] if ep_size > 1 else None
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "allreduce", True) is False:  # sum over the expert-data-parallel copies, then / world
            if dist.get_world_size(edp) > 1:
                dist.all_reduce(p.grad, group=edp)
            p.grad.div_(world)
        else:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
