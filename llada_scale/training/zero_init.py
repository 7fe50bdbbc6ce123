"""ZeRO-3 start-up without a full model per rank: the model is built partitioned under ``deepspeed.zero.Init``
and ``train.init_from`` is streamed tensor by tensor into the partitions.

Host memory per rank at start-up is then O(parameters / world_size + the largest tensor) instead of the whole
model (LLaDA-8B in fp32: 32 GB per rank, 8 ranks a node): every module's parameters exist in full only inside
their own constructor (DeepSpeed partitions them when it returns), and each ``init_from`` tensor is read by
rank 0 alone, copied into the gathered parameter (``GatheredParameters(p, modifier_rank=0)``) and scattered
back to the partitions before the next one is read. Fresh runs initialise each parameter the same way
(the backbone's ``init_weights`` under the same gather), drawing the same numbers as the unpartitioned path.
Both backbones of :func:`llada_scale.model.registry.build_model` (dense and the LLaDA2 MoE) build this way,
with or without Ulysses sequence parallelism (see :func:`build_partitioned` for the process group); buffers (the MoE routers' float32 ``expert_bias``) are not partitioned: every rank holds them in full and
``init_from`` broadcasts them from rank 0.
Measurements and the 8B table: docs/LOG.md (2026-12-07, issue 19; under sequence parallelism 2026-12-08).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from llada_scale.model.registry import build_model
from llada_scale.model.transformer import resize_vocab, state_dict_mismatch
from llada_scale.training.engine import _VOCAB_ROWS, TrainError

log = logging.getLogger("llada_scale")

__all__ = ["enabled", "build_partitioned", "numel", "full_shapes", "load_init_weights_partitioned"]


def enabled(zero_stage: int, train_cfg) -> bool:
    """Whether this run builds its model partitioned: ZeRO-3, ``train.zero3_init`` on, and no LoRA (peft wraps
    a whole model; LoRA keeps the unpartitioned start-up)."""
    return zero_stage == 3 and bool(getattr(train_cfg, "zero3_init", True)) and not train_cfg.lora.enabled


def _gathered(params: list):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def build_partitioned(model_cfg, ds_cfg: dict, seed: int, random_init: bool, mpu=None) -> torch.nn.Module:
    """``build_model(model_cfg)`` (dense Transformer or LLaDA2 MoE) with ZeRO-3 partitioned parameters
    (``deepspeed.zero.Init`` with the run's DeepSpeed config: its bf16 and ``offload_param`` settings apply).

    ``random_init``: initialise every parameter exactly as the unpartitioned ``torch.manual_seed(seed);
    build_model(cfg)`` does (one gathered parameter at a time); False when the weights are loaded next
    (``init_from`` or a resumed checkpoint), which skips that work.

    ``mpu``: the sequence-parallel plan's mpu (DeepSpeed's ``parallel_state_sp``; None without SP), the one
    ``deepspeed.initialize`` gets. zero.Init builds its own ``DeepSpeedConfig``, whose batch check needs it to
    count world / SP data-parallel ranks (``train_batch_size`` = micro x accumulation x world / SP); without it
    the check fails. The parameters are partitioned over ``mpu.get_sequence_data_parallel_group()`` (all
    ranks: data x sequence parallel), the group DeepSpeed 0.19's engine hands the ZeRO-3 optimizer under an SP
    mpu (``engine.seq_data_parallel_group``, gradients reduce-scattered over it), so each rank holds 1 / world
    of every parameter, as without SP. (Unpartitioned start-up under SP: the engine's own conversion partitions
    over the world group, the same ranks.)

    Raises:
        TrainError: the partition group is not the one the engine will use (a DeepSpeed change).
    """
    import deepspeed

    group = None if mpu is None else mpu.get_sequence_data_parallel_group()
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, mpu=mpu, data_parallel_group=group):
        model = build_model(model_cfg, init_weights=False)
    ranks = {dist.get_world_size(p.ds_process_group) for p in model.parameters()}
    if ranks != {dist.get_world_size(group)}:  # group None: the world group
        raise TrainError(f"deepspeed.zero.Init partitioned the parameters over {sorted(ranks)} ranks, expected "
                         f"{dist.get_world_size(group)}; set train.zero3_init=false")
    if random_init:
        model.init_weights(materialize=_gathered)
    if dist.get_rank() == 0:
        log.info(f"ZeRO-3 start-up: model built partitioned under deepspeed.zero.Init over {ranks.pop()} ranks"
                 + ("" if mpu is None else f" (sequence parallel {mpu.get_sequence_parallel_world_size()})"))
    return model


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, partitioned (``ds_numel``) or not."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Parameter name -> full shape (``ds_shape`` for a partitioned parameter)."""
    return {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in model.named_parameters()}


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffer name -> buffer, for the buffers that ``model.state_dict()`` holds (not partitioned by ZeRO-3)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _same_everywhere(problem: str | None) -> str | None:
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def load_init_weights_partitioned(model: torch.nn.Module, path: str) -> None:
    """Initialise a partitioned ``model`` from ``train.init_from``; collective (every rank calls it).

    A consolidated directory (safetensors, what import-llada / import-hf / convert-checkpoint write) is checked
    from its headers on every rank, then read by rank 0 one tensor at a time: host memory stays at the local
    partitions plus one tensor on rank 0, and the partitions alone on the other ranks. Any other source (a
    DeepSpeed checkpoint directory, an HF directory with ``.bin`` files) is consolidated in full on rank 0 only
    (:func:`llada_scale.checkpoint.load_model_state`) and scattered the same way. Rows are added to the
    embedding/head when the source vocabulary is smaller (the new rows get the mean of the old ones, as
    :func:`resize_vocab` does), exactly as the unpartitioned path. Buffers (LLaDA2's float32 ``expert_bias``)
    are copied on rank 0 in their own dtype and broadcast to the other ranks.

    Raises:
        TrainError: the source cannot be read or does not fit the model (the same line on every rank).
    """
    from llada_scale.checkpoint import load_model_state, resolve_checkpoint
    from llada_scale.checkpoint.streaming import read_tensors, scan_weights

    rank = dist.get_rank()
    state = None
    params = dict(model.named_parameters())
    buffers = persistent_buffers(model)
    expected = {**full_shapes(model), **{k: tuple(b.shape) for k, b in buffers.items()}}
    vocab = model.config.vocab_size
    try:
        kind, resolved = resolve_checkpoint(path)
        tensors = scan_weights(resolved) if kind == "safetensors" else None
    except (ValueError, FileNotFoundError, OSError) as e:
        raise TrainError(f"train.init_from={path}: {e}") from None
    if tensors is not None:
        shapes = {k: torch.empty((expected[k][0], *t.shape[1:]) if k in _VOCAB_ROWS and k in expected else t.shape,
                                 device="meta") for k, t in tensors.items()}
        problem = state_dict_mismatch(expected, shapes, f"init_from checkpoint {path}")
        first = {}
        for info in tensors.values():
            first.setdefault(info.file, len(first))
        order = sorted(tensors, key=lambda k: first[tensors[k].file])  # read_tensors' order: file by file
        source = read_tensors({k: tensors[k] for k in order}) if rank == 0 and not problem else None
    else:
        problem = None
        if rank == 0:
            try:
                state = resize_vocab(load_model_state(path)[0], vocab)
                problem = state_dict_mismatch(expected, state, f"init_from checkpoint {path}")
            except (ValueError, FileNotFoundError, OSError) as e:
                problem = f"cannot read it: {e}"
        problem = _same_everywhere(problem)
        order = [*params, *buffers]
        source = ((k, state[k]) for k in order) if rank == 0 and not problem else None
    if problem:
        raise TrainError(f"init_from checkpoint {path} does not fit the model ({problem}); check the model "
                         "preset/overrides match the checkpoint's config")
    for name in order:
        if name in buffers:
            buf = buffers[name]
            if rank == 0:
                key, t = next(source)
                assert key == name, (key, name)
                buf.copy_(t.to(buf.dtype))
            dist.broadcast(buf, src=0)
            continue
        p = params[name]
        with _gathered([p]):
            if rank == 0:
                key, t = next(source)
                assert key == name, (key, name)
                if name in _VOCAB_ROWS:
                    t = resize_vocab({name: t}, vocab)[name]
                p.data.copy_(t.to(p.dtype))
    del state
