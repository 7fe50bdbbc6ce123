"""How the trainer fits a model on its devices, applied from outside the model (as torchtitan's ``parallelize``):
activation checkpointing and ``torch.compile`` per decoder layer, and the ZeRO-3 registration of the head weight.

The model module stays free of all of it: :class:`llada_scale.model.transformer.Transformer` is plain PyTorch,
and this module rewires its decoder layers in place. Parameter names never change (no wrapper modules), so
checkpoints, HF export and ZeRO partition maps are the same with or without these features, and a run may
resume with another ``train.activation_checkpointing`` or ``train.compile``.

Recipe keys (``train`` section, :class:`llada_scale.training.config.TrainLoopConfig`):

* ``activation_checkpointing``: ``none`` | ``full`` (every decoder layer) | ``selective`` (every k-th layer,
  k = ``activation_checkpointing_every``, starting with layer 0). A checkpointed layer keeps only its input for
  the backward and recomputes the rest (``torch.utils.checkpoint``, non-reentrant: it composes with
  ``torch.compile`` and with DeepSpeed ZeRO-1/2/3).
* ``compile``: ``auto`` (on for CUDA at ZeRO-0/1/2) | ``true`` | ``false``: ``torch.compile`` each decoder layer separately
  (identical layers share one compiled graph; the embedding, masks, head and loss stay eager). Shapes are static
  (:func:`llada_scale.objectives.losses.random_length_keep`), so a run compiles once per phase.
"""

from __future__ import annotations

import logging
import types

import torch
from torch.utils.checkpoint import checkpoint

from llada_scale.model.attention import cuda_paths
from llada_scale.model.transformer import Transformer
from llada_scale.training.config import ConfigError

log = logging.getLogger("llada_scale")

AC_MODES = ("none", "full", "selective")


def checkpointed_layers(num_layers: int, mode: str, every: int = 2) -> list[int]:
    """Indices of the decoder layers that ``mode`` recomputes in the backward.

    ``none`` -> [], ``full`` -> all, ``selective`` -> 0, every, 2*every, ... Raises ConfigError for a bad
    mode or ``every < 1``.
    """
    if mode not in AC_MODES:
        raise ConfigError(f"train.activation_checkpointing must be one of {AC_MODES}, not {mode!r}")
    if every < 1:
        raise ConfigError(f"train.activation_checkpointing_every must be >= 1, not {every}")
    if mode == "none":
        return []
    return list(range(0, num_layers, 1 if mode == "full" else every))


def _checkpointed_forward(self, *args, **kwargs):
    # the class's forward, recomputed in the backward; no dropout in the model, so no RNG state to replay
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def apply_activation_checkpointing(model: Transformer, mode: str, every: int = 2) -> list[int]:
    """Make the chosen decoder layers recompute their activations in the backward; returns their indices.

    Binds a checkpointing ``forward`` to each chosen layer instance (module tree and parameter names
    unchanged; a deep copy of the model rebinds it to the copy).
    """
    chosen = checkpointed_layers(len(model.model.layers), mode, every)
    for i in chosen:
        layer = model.model.layers[i]
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return chosen


def resolve_compile(value, device: torch.device, zero_stage: int = 0) -> bool:
    """``train.compile`` -> bool. ``auto`` is on for CUDA devices at ZeRO stages 0-2 and off elsewhere (on CPU too
    with ``LLADA_COMPILE_ON_CPU=1``, :func:`llada_scale.model.attention.cuda_paths`): on CPU the
    inductor backend works (the tests use it) but compiles for minutes on small machines, and under ZeRO-3
    DeepSpeed's parameter hooks run inside every layer, so dynamo traces them, recompiles per submodule and
    falls back to eager after ``recompile_limit`` (measured, docs/LOG.md 2026-12-03). ``true`` compiles anyway
    (with a warning under ZeRO-3). Raises ConfigError for other values."""
    if value == "auto":
        return cuda_paths(device) and zero_stage < 3
    if isinstance(value, str) and value.lower() in ("true", "false", "on", "off"):
        value = value.lower() in ("true", "on")
    if not isinstance(value, bool):
        raise ConfigError(f"train.compile must be auto, true or false, not {value!r}")
    if value and zero_stage == 3:
        log.warning("train.compile=true under ZeRO-3: DeepSpeed's parameter hooks make torch.compile recompile per "
                    "submodule and fall back to eager; expect no speed-up (use ZeRO-1/2 to compile)")
    return value


def apply_compile(model: Transformer, backend: str = "inductor") -> None:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``: names unchanged), static shapes.

    All layers share one code object (``Module._call_impl``), whose cache holds one entry per (input shape,
    train/eval, checkpointed or not): a block-diffusion run with selective checkpointing needs 2 x 2 x 2 = 8,
    dynamo's default ``recompile_limit``, so the limit is raised to 32 (past it dynamo silently runs eager).
    Sets dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (process-wide, like the limit).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # a checkpointed layer is traced as one checkpoint operator, in which dynamo refuses attribute side effects
    # (graph break: the whole layer ran eager) unless told that they need not be replayed in the recompute; the
    # MoE router statistics are such side effects and must NOT be replayed (llada_scale.model.moe.recomputing)
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in model.model.layers:
        layer.compile(dynamic=False, backend=backend)


def register_zero3_head(model: Transformer) -> None:
    """Tell ZeRO-3 that the head weight is used by the Transformer's own forward (the chunked loss and the
    final projection read it directly, and a tied head is the embedding's weight), so that it is gathered in
    every forward and backward of the model (``deepspeed.zero.register_external_parameter``)."""
    import deepspeed

    deepspeed.zero.register_external_parameter(model, model.output_weight())


def parallelize(model: Transformer, train_cfg, device: torch.device, zero_stage: int) -> dict:
    """Apply the ``train`` section's activation checkpointing and compile to ``model`` (before DeepSpeed wraps
    it) and the ZeRO-3 head registration; returns ``{"activation_checkpointing": [layer indices],
    "compile": bool}`` for the start-up log line. Raises ConfigError for bad values."""
    layers = apply_activation_checkpointing(model, train_cfg.activation_checkpointing,
                                            train_cfg.activation_checkpointing_every)
    compiled = resolve_compile(train_cfg.compile, device, zero_stage)
    if compiled:
        apply_compile(model)
    if zero_stage == 3:
        register_zero3_head(model)
    return {"activation_checkpointing": layers, "compile": compiled}


__all__ = ["AC_MODES", "checkpointed_layers", "apply_activation_checkpointing", "resolve_compile", "apply_compile",
           "register_zero3_head", "parallelize"]
