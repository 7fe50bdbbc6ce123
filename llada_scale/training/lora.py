"""LoRA fine-tuning through ``peft`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
eq. 3: h = W0 x + (alpha / r) B A x, B initialised to zero so training starts at the base model).

``train.lora.rank > 0`` injects adapters into the named projections of :class:`Transformer` with
``peft.inject_adapter_in_model`` (the model stays our class: same forward, masks and samplers), which freezes
every other parameter. Only the adapters reach the optimizer and the checkpoints (DeepSpeed
``exclude_frozen_parameters``); the frozen base comes from ``train.init_from`` again on resume and at merge
time. :func:`merge_lora_checkpoint` (``convert_checkpoint.py merge-lora``) writes W0 + (alpha / r) B A as an
ordinary consolidated checkpoint. Works at any ZeRO stage (adapters are ordinary trainable parameters).

Because the base is read again, a LoRA checkpoint records which base it was trained on (``lora_base`` in its
metadata: the base's path, model config and a SHA-256 over its weights, :func:`base_identity`); resuming and
merging on another base (e.g. ``train.init_from`` now holding another model of the same shape) is refused
(:func:`check_base`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LoRAConfig", "apply_lora", "is_lora_key", "merge_lora", "merge_lora_checkpoint", "base_identity",
           "check_base"]

_ADAPTER = "default"  # peft's adapter name
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # our HF-Llama names
# LLaDA2 MoE: the fused attention projection and "experts", the stacked routed-expert weights [E, out, in] of every
# MoE layer (peft's target_parameters: one low-rank update per expert); the router is never adapted
MOE_TARGETS = ("qkv_proj", "experts")
EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """``train.lora``: rank (0 = off), alpha (scale alpha / rank), dropout on the adapter input, and the
    projection names to adapt (our HF-Llama names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; for
    LLaDA2 MoE models also qkv_proj and experts, the latter needing dropout 0)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(PROJECTIONS))

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"train.lora needs rank >= 0, alpha > 0 and 0 <= dropout < 1 (got rank={self.rank}, "
                             f"alpha={self.alpha}, dropout={self.dropout})")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        known = set(PROJECTIONS) | set(MOE_TARGETS)
        if "lm_head" in self.target_modules:  # the head runs from its weight in chunks (model/head.py), which
            # would bypass an adapter silently
            raise ValueError("train.lora.target_modules cannot include lm_head: the output head is computed from "
                             "its weight matrix (chunked loss), so an adapter there would never be used; adapt "
                             f"the projections {sorted(known)}")
        bad = sorted(set(self.target_modules) - known)
        if bad or not self.target_modules:
            raise ValueError(f"train.lora.target_modules {bad or '[]'} are not projections of the model; choose "
                             f"from {sorted(known)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def is_lora_key(name: str) -> bool:
    """True for the parameter names of adapters (``...q_proj.lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.

    Base parameters of adapted modules move to ``<module>.base_layer.weight`` (peft's naming); adapter parameters
    are ``<module>.lora_A.default.weight`` [rank, in] and ``<module>.lora_B.default.weight`` [out, rank] (zeros).

    Raises:
        ValueError: ``cfg.rank`` is 0.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not cfg.enabled:
        raise ValueError("apply_lora needs train.lora.rank > 0")
    modules = [t for t in cfg.target_modules if t != "experts"]
    params = []
    if "experts" in cfg.target_modules:
        if not getattr(model, "moe_layers", lambda: [])():
            raise ValueError("train.lora.target_modules has 'experts' but the model has no MoE layers")
        if cfg.dropout:
            raise ValueError("train.lora.dropout must be 0 when adapting 'experts' (peft adapts those weights "
                             "directly, where input dropout cannot apply)")
        params = [f"experts.{p}" for p in EXPERT_PARAMS]
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=modules or None, target_parameters=params or None, bias="none")
    model = inject_adapter_in_model(peft_cfg, model, adapter_name=_ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_key(name))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 + alpha / r B A, peft's ``merge``) and put the plain
    ``nn.Linear`` back, so ``model.state_dict()`` has the base names again. In place; returns ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    names = {name for name, _ in targets}
    for name, module in targets:
        module.merge(safe_merge=True)
    for name, module in targets:  # peft nests one wrapper per adapted parameter: replace the outermost only
        if any(name.startswith(other + ".") for other in names):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def base_identity(model: nn.Module, path: str) -> dict:
    """``{"path", "model", "sha256"}`` of the base weights loaded into ``model`` (before the adapters): the
    model config and a SHA-256 over every tensor's name, shape, dtype and bytes in name order. Costs one pass over
    the weights (about 1 GB/s per core)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data)
    return {"path": str(path), "model": model.config.to_dict() if hasattr(model, "config") else None,
            "sha256": h.hexdigest()}


def check_base(saved: dict | None, current: dict, checkpoint: str) -> None:
    """Refuse a base whose weights are not those the LoRA ``checkpoint`` was trained on.

    ``saved`` is the checkpoint's ``lora_base`` (None for checkpoints written before it was recorded: accepted).

    Raises:
        ValueError: naming both bases; the caller wraps it in its error type.
    """
    if not isinstance(saved, dict) or not saved.get("sha256") or saved["sha256"] == current["sha256"]:
        return
    raise ValueError(f"the LoRA checkpoint {checkpoint} was trained on the base {saved.get('path')} (weights SHA-256 "
                     f"{saved['sha256'][:12]}...), but the base given now, {current['path']}, has other weights "
                     f"({current['sha256'][:12]}...); use the base it was trained on")


def merge_lora_checkpoint(checkpoint: str, out_dir: str, *, base: str | None = None, dtype: str = "auto",
                          max_shard_size: str = "5GB", force: bool = False, quiet: bool = False,
                          tokenizer: str | None = None) -> None:
    """Merge the adapters of a LoRA run's checkpoint into its base model and write a consolidated checkpoint.

    Args:
        checkpoint: a LoRA run's DeepSpeed tag / run / checkpoints directory (or a consolidated copy of it);
            its metadata gives the model shape, ``train.lora`` and ``train.init_from``.
        base: the base weights (default: the run's ``train.init_from``).
        dtype: ``"auto"`` (default) keeps the stored dtype of base and adapters together: fp32 when they differ
            (a bf16 base with the fp32 adapters of a training checkpoint), so the merged update is not rounded
            away; ``"bf16"|"fp32"|"fp16"`` casts.

    Raises:
        CheckpointError: not a LoRA checkpoint, no base known, base or adapter tensors that do not fit.
    """
    from llada_scale.checkpoint import CheckpointError, checkpointer, load_model_state, model_config_from_meta
    from llada_scale.checkpoint.convert import _copy_tokenizer, write_consolidated
    from llada_scale.checkpoint.streaming import check_output_dir, staged_output
    from llada_scale.model.registry import build_model
    from llada_scale.model.transformer import load_weights, resize_vocab

    check_output_dir(out_dir, force, (checkpoint, base))
    adapters, meta = load_model_state(checkpoint, progress=not quiet)
    run = meta.get("config") or {}
    lcfg = (run.get("train") or {}).get("lora") or {}
    if not lcfg.get("rank") or not any(is_lora_key(k) for k in adapters):
        raise CheckpointError(f"{meta['path']} is not a LoRA checkpoint (no train.lora.rank / adapter weights); "
                              "consolidate it instead")
    base = base or (run.get("train") or {}).get("init_from")
    if not base:
        raise CheckpointError(f"{meta['path']} records no train.init_from; pass --base with the base weights")
    mc = model_config_from_meta(meta, meta["path"])
    base_sd, base_meta = load_model_state(base, progress=not quiet)
    model = build_model(mc)
    try:
        load_weights(model, resize_vocab(base_sd, mc.vocab_size), source=f"base {base}")
        if meta["format"] == "deepspeed":
            check_base(checkpointer.read_meta(meta["path"]).get("lora_base"), base_identity(model, base),
                       meta["path"])
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = apply_lora(model, LoRAConfig(**{k: v for k, v in lcfg.items()
                                            if k in {f.name for f in dataclasses.fields(LoRAConfig)}}))
    own = {k for k in model.state_dict() if is_lora_key(k)}
    got = {k for k in adapters if is_lora_key(k)}
    if own != got:
        raise CheckpointError(f"adapters of {meta['path']} do not fit train.lora (missing {sorted(own - got)[:4]}, "
                              f"unexpected {sorted(got - own)[:4]})")
    buffers = {n for n, _ in model.named_buffers()} & set(adapters)  # e.g. MoE expert biases moved in training
    model.load_state_dict({k: adapters[k] for k in got | buffers}, strict=False)
    merged = merge_lora(model).state_dict()
    with staged_output(out_dir, force, inputs=(checkpoint, base)) as tmp:
        tok = _copy_tokenizer(meta, tmp, tokenizer)
        write_consolidated(merged, mc, tmp, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tok,
                           step=meta.get("step"), run_config=run,
                           source={"path": meta["path"], "kind": meta["format"], "base": base_meta["path"],
                                   "converted": "merge-lora"}, progress=not quiet,
                           source_dtypes=[*meta["dtypes"], *base_meta["dtypes"]])
