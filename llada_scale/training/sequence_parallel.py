"""Ulysses sequence parallelism (``train.sequence_parallel_size``), built on DeepSpeed and applied from outside
the model, as :mod:`llada_scale.training.parallelize` applies checkpointing and compile.

Layout (Jacobs et al. 2023, "DeepSpeed Ulysses"): the ranks form groups of SP consecutive ranks (DeepSpeed's
``deepspeed.runtime.sequence_parallel.parallel_state_sp`` builds them; it is the ``mpu`` handed to
``deepspeed.initialize``). Every rank of a group reads the same rows (the loader and the noise generator run on
the *data-parallel* rank ``rank // SP`` of ``world / SP``), and each holds the contiguous slice
``[r * S/SP, (r+1) * S/SP)`` of every model input of S positions (S = L, or 2L for block diffusion's
``[x_t ; x_0]``). In each attention, DeepSpeed's :class:`deepspeed.sequence.layer.DistributedAttention` trades
the sequence split for a head split by all-to-all (q, k, v: [B, S/SP, H, D] -> [B, S, H/SP, D]), attention runs
over the whole sequence with the *full sequence's* mask (document, causal, bidirectional or block diffusion:
built once per forward for S x S, never a causal assumption), and a second all-to-all returns [B, S/SP, H, D].

The objectives run unchanged on full rows: the noise (t, masks, the random-length cut, CFG drops) is drawn for the
full row with the same generator on every rank of a group, labels are made on the full row (the AR shift only for
AR, nothing for diffusion), and :class:`SequenceParallelModel` slices the inputs, runs the engine and all-gathers
the per-token cross-entropy [B, S/SP] -> [B, S] across the group (:class:`GatherSequence`: the gradient of a
rank's own slice only). Every rank therefore computes the SP = 1 loss of its rows (sum of per-token losses and
counts over the whole row), and the sum over the group of the parameter gradients (each rank's tokens, plus the
attention terms the all-to-all's backward returns to their owners) is the SP = 1 gradient. DeepSpeed, given the
``mpu``, reduces gradients over all ranks and divides by world / SP at ZeRO-0/1/2, i.e. it sums over the SP
group and averages over data parallelism: the update is the SP = 1 update (ZeRO-3 divides by the world size,
which :func:`grad_scale` makes up for). Why DeepSpeed's ALST wrappers (``UlyssesSPAttentionHF``,
``UlyssesSPDataLoaderAdapter``) are not used: docs/LOG.md 2026-12-07 (they assume HF model classes, a causal mask
and label shifting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llada_scale.model import attention
from llada_scale.model.llada2_moe import LLaDA2Attention
from llada_scale.model.moe import Router
from llada_scale.model.transformer import Attention
from llada_scale.training.engine import TrainError

log = logging.getLogger("llada_scale")


def check(cfg, world_size: int) -> None:
    """Refuse, before step 1, a sequence-parallel layout this model, row length or world cannot split.

    Rules: SP >= 1; SP divides ``model.num_heads`` and ``model.num_kv_heads`` (each
    rank attends over H/SP query heads and the Hkv/SP key/value heads they read); SP divides ``data.seq_len``
    (then it divides 2L too); SP divides the world size; the global batch is a multiple of micro batch x (world / SP).

    Raises:
        TrainError: one line naming the key, the values and the fix.
    """
    sp, m = cfg.train.sequence_parallel_size, cfg.model
    key = f"train.sequence_parallel_size={sp}"
    if sp < 1:
        raise TrainError(f"{key} must be >= 1 (1 = off)")
    for name, heads in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.num_kv_heads)):
        if heads % sp:
            raise TrainError(f"{key} does not divide {name}={heads}: Ulysses splits the attention heads across the "
                             f"sequence-parallel ranks; use a divisor of {heads}")
    if cfg.data.seq_len % sp:
        raise TrainError(f"{key} does not divide data.seq_len={cfg.data.seq_len}: every rank holds seq_len / SP "
                         f"tokens of each row; use a seq_len that is a multiple of {sp}")
    if world_size % sp:
        raise TrainError(f"{key} does not divide the world size {world_size}; use a divisor of the number of ranks")
    dp, t = world_size // sp, cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise TrainError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
                         f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / {key}); set it to a "
                         f"multiple of {t.micro_batch_size * dp}")


@dataclass
class Plan:
    """Who this rank is under sequence parallelism. With ``size`` 1 every field describes plain data parallelism
    (``group`` and ``mpu`` None)."""

    size: int = 1
    rank: int = 0  # rank within the sequence-parallel group
    dp_rank: int = 0  # which rows this rank reads: rank // size
    dp_size: int = 1  # world // size
    group: object = None
    mpu: object = None
    grad_scale: float = 1.0  # the loss is multiplied by this before the backward (:func:`grad_scale`)
    enabled: bool = field(default=True, repr=False)  # off: installed attentions run unsplit (generation)

    @contextlib.contextmanager
    def disabled(self):
        """Run the model unsplit inside the block (e.g. generating samples: each rank decodes on its own)."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old

    def scale_stats(self, stats: dict) -> dict:
        """Divide every summable stat by SP: each rank of a group computed the whole rows' stats, so the
        cross-rank sums (tokens, FLOPs, checksums) would count them SP times; every ratio the logger forms
        (loss_sum / loss_count, t-bucket CE / count) is unchanged."""
        return stats if self.size == 1 else {k: v / self.size for k, v in stats.items()}


def setup(cfg, rank: int, world_size: int) -> Plan:
    """Check the layout (:func:`check`) and, for SP > 1, build DeepSpeed's sequence-parallel and
    sequence-data-parallel groups (``parallel_state_sp.initialize_sequence_parallel``: groups of SP consecutive
    ranks). Collective when SP > 1 (``new_group``). Raises TrainError (see :func:`check`)."""
    check(cfg, world_size)
    sp = cfg.train.sequence_parallel_size
    if sp == 1:
        return Plan(1, 0, rank, world_size)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is not None:  # a second Trainer in this process (tests)
        mpu._release_sequence_parallel_groups()
    mpu.initialize_sequence_parallel(sp)
    if rank == 0:
        log.info(f"sequence parallel: {sp} ranks per row (Ulysses all-to-all), data parallel {world_size // sp}")
    return Plan(sp, mpu.get_sequence_parallel_rank(), rank // sp, world_size // sp, mpu.get_sequence_parallel_group(),
                mpu)


def grad_scale(ds_cfg: dict, plan: Plan) -> float:
    """Factor on the loss before the backward that makes DeepSpeed's gradient reduction sum over the SP group and
    average over data parallelism, for the DeepSpeed config ``ds_cfg`` (after the trainer filled it in).

    DeepSpeed 0.19.8 (and 0.16.5 in the mirror) is not consistent about it: ZeRO-0 (engine all-reduce), ZeRO-1/2
    and ZeRO-3's contiguous-bucket path divide the sum over all ranks by world / SP (SP-aware), but ZeRO-3's
    default reduce-scatter path (``__avg_scatter_grads``) divides by the world size, i.e. averages over SP too
    (measured: half the SP = 1 gradient norm at SP = 2; hamishivi/tmax#9 traced the same in 0.18.4). So ZeRO-3
    gets SP, the others 1. ZeRO-3 with ``reduce_scatter: false`` picks the path per bucket (by bucket size), which
    no single factor fixes, and is refused.

    Raises:
        TrainError: ZeRO-3 with ``zero_optimization.reduce_scatter: false`` under SP > 1.
    """
    zero = ds_cfg.get("zero_optimization") or {}
    if plan.size == 1 or zero.get("stage", 0) != 3:
        return 1.0
    if zero.get("reduce_scatter", True) is False:
        raise TrainError("train.sequence_parallel_size > 1 at ZeRO-3 needs zero_optimization.reduce_scatter: true "
                         "(DeepSpeed's default): with false, DeepSpeed scales the gradients of some buckets for "
                         "sequence parallelism and not others")
    return float(plan.size)


def train_config(train_cfg):
    """``train_cfg`` with ``compile: auto`` resolved to off under SP > 1 (compiling a decoder layer around
    DeepSpeed's all-to-all autograd function is untested here: no GPU was available); ``true`` is kept."""
    if train_cfg.sequence_parallel_size > 1 and train_cfg.compile == "auto":
        return dataclasses.replace(train_cfg, compile=False)
    return train_cfg


def _local_attention(q, k, v, mask):
    """:func:`llada_scale.model.attention.attend` on DeepSpeed's [B, S, H, D] layout."""
    return attention.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


def _ulysses_forward(self, x, cos, sin, mask):
    # Attention.forward with the head exchange around the attention call; x: [B, S/SP, d], cos/sin of the local
    # positions, mask: the full S x S mask (or None / CAUSAL)
    plan = self.__dict__["_sp_plan"]
    if not plan.enabled:
        return type(self).forward(self, x, cos, sin, mask)
    q, k, v = self.qkv(x, cos, sin)  # [B, H, S/SP, D], RoPE applied with the global positions
    out = self.__dict__["_sp_attention"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, mask)
    return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


def _sp_sequence_aux_loss(self, scores, topk_idx, seq_shape):
    # Router.sequence_aux_loss of the whole row from this rank's S/SP tokens: the expert counts f_e (no gradient)
    # are summed over the group; P_e is linear in the tokens, so each rank returns its tokens' share and the
    # group's sum (what the summed gradients see) is the SP = 1 loss
    plan = self.__dict__["_sp_plan"]
    if not plan.enabled:
        return type(self).sequence_aux_loss(self, scores, topk_idx, seq_shape)
    b, t = seq_shape
    e, full = scores.shape[1], t * plan.size
    counts = torch.zeros(b, e, device=scores.device).scatter_add_(
        1, topk_idx.view(b, t * self.top_k), torch.ones(b, t * self.top_k, device=scores.device))
    dist.all_reduce(counts, group=plan.group)
    f = counts * (e / (self.top_k * full))
    p = (scores / scores.sum(-1, keepdim=True)).view(b, t, e).sum(1) / full
    return (f * p).sum(-1).mean()


def install(model: torch.nn.Module, plan: Plan) -> int:
    """Bind the Ulysses attention to every :class:`llada_scale.model.transformer.Attention` and
    :class:`llada_scale.model.llada2_moe.LLaDA2Attention` of ``model`` (any wrapping, LoRA included); returns how
    many. No-op for SP = 1. The module tree and parameter names do not change (the DeepSpeed wrapper is kept
    outside ``_modules``), so checkpoints are the same with any SP. Both classes have the same
    ``qkv(x, cos, sin)`` -> q, k, v [B, heads, S/SP, D] (fused QKV, QK norm and partial rotary included for
    LLaDA2) and ``o_proj``, so one forward serves both; cos/sin are of this rank's positions (the
    ``position_ids`` slice :class:`SequenceParallelModel` passes).

    MoE routers (:class:`llada_scale.model.moe.Router`) route per token and need nothing, except the
    sequence-wise aux loss, whose expert counts are over the whole row: it is rebound to sum them over the
    group (:func:`_sp_sequence_aux_loss`), so the group's summed gradient is the SP = 1 one. The load statistics
    are per-rank counts of the rank's own tokens; the slices partition the rows, so their all-reduce over all
    ranks (:mod:`llada_scale.training.moe_balance`) is the SP = 1 count."""
    if plan.size == 1:
        return 0
    from deepspeed.sequence.layer import DistributedAttention

    n = 0
    for module in model.modules():
        if isinstance(module, Router):
            module.__dict__["_sp_plan"] = plan
            module.sequence_aux_loss = types.MethodType(_sp_sequence_aux_loss, module)
        if isinstance(module, (Attention, LLaDA2Attention)):
            module.__dict__["_sp_plan"] = plan
            module.__dict__["_sp_attention"] = DistributedAttention(_local_attention, plan.group, scatter_idx=2,
                                                                    gather_idx=1)
            module.forward = types.MethodType(_ulysses_forward, module)
            n += 1
    return n


class GatherSequence(torch.autograd.Function):
    """All-gather [B, S/SP, ...] slices along dim 1 into [B, S, ...] (rank order); the backward keeps the
    gradient of this rank's own slice (every rank computes the same loss from the gathered tensor, so the
    gradient of the other slices is their owners' to propagate)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.slice = (rank * x.shape[1], (rank + 1) * x.shape[1])
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.slice
        return grad[:, a:b], None, None, None


class SequenceParallelModel:
    """The model callable the objectives see under SP: full rows in, full per-token outputs out.

    ``__call__(input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None)`` with [B, S]
    inputs (S a multiple of SP) builds the S x S mask when none is given (the model config's ``causal`` and
    ``attention_backend``, :func:`llada_scale.model.attention.build_mask`), runs ``engine`` on this rank's slice
    of ``input_ids``, ``position_ids`` and ``labels`` with that mask, and returns the gathered output: float32
    [B, S] cross-entropy with ``labels``, [B, S, V] logits without. ``config`` is the model's config (what
    :func:`llada_scale.model.block_attention.block_diffusion_logits` reads the mask backend from).

    Raises:
        ValueError: S not a multiple of SP.
    """

    def __init__(self, engine, plan: Plan, config):
        self.engine, self.plan, self.config = engine, plan, config

    def __call__(self, input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None):
        b, s = input_ids.shape
        sp, r = self.plan.size, self.plan.rank
        if s % sp:
            raise ValueError(f"a model input of {s} positions cannot be split over sequence_parallel_size={sp}")
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if attention_mask is None:
            attention_mask = attention.build_mask(document_ids, self.config.causal, s, s, b, input_ids.device,
                                                  self.config.attention_backend)
        n = s // sp
        part = slice(r * n, (r + 1) * n)
        out = self.engine(input_ids[:, part], position_ids=position_ids[:, part], attention_mask=attention_mask,
                          labels=None if labels is None else labels[:, part])
        return GatherSequence.apply(out, self.plan.group, r, sp)


def model_for_loss(engine, plan: Plan, config):
    """What the trainer hands the objectives: ``engine`` itself for SP = 1, else a :class:`SequenceParallelModel`."""
    return engine if plan.size == 1 else SequenceParallelModel(engine, plan, config)


def check_resume(meta: dict, plan: Plan, world_size: int, where) -> None:
    """Refuse to resume across a change of the sequence-parallel layout (checkpoint metadata ``meta``): the
    loader and noise states are per data-parallel rank, and resharding them under SP is not implemented.

    Raises:
        TrainError: naming both layouts and the fix.
    """
    old_sp = ((meta.get("config") or {}).get("train") or {}).get("sequence_parallel_size", 1)
    old_world = meta.get("world_size", world_size)
    if (old_sp > 1 or plan.size > 1) and (old_sp, old_world) != (plan.size, world_size):
        raise TrainError(f"checkpoint {where} was written with train.sequence_parallel_size={old_sp} on {old_world} "
                         f"ranks, this run has {plan.size} on {world_size}; resume with the same layout (changing "
                         "it under sequence parallelism is not supported), or start from it with train.init_from")


__all__ = ["check", "Plan", "setup", "grad_scale", "train_config", "install", "GatherSequence", "SequenceParallelModel",
           "model_for_loss", "check_resume"]
