"""Which backbone a model config describes, and building it: the dense Llama-style
:class:`~llada_scale.model.transformer.Transformer` (``ModelConfig``, the default) or the LLaDA2.x
mixture-of-experts :class:`~llada_scale.model.llada2_moe.LLaDA2MoeModel` (``model_type: llada2_moe``).

The trainer, checkpoint readers and samplers build models only through :func:`build_model` and read recorded
configs through :func:`config_from_dict`, so a backbone is chosen by the ``model_type`` key of the recipe's
``model`` section or of a checkpoint's recorded model config.
"""

from __future__ import annotations

import dataclasses

from llada_scale.model.llada2_moe import LLADA2_PRESETS, MODEL_TYPE, LLaDA2Config, LLaDA2MoeModel
from llada_scale.model.transformer import ModelConfig, Transformer

__all__ = ["config_class", "config_from_dict", "build_model", "is_moe"]


def config_class(model_type: str | None):
    """The config dataclass of ``model_type`` (None / absent = the dense ModelConfig).

    Raises:
        ValueError: an unknown model_type (the message lists the known ones).
    """
    if model_type in (None, "llama", "dense"):
        return ModelConfig
    if model_type == MODEL_TYPE:
        return LLaDA2Config
    raise ValueError(f"unknown model_type {model_type!r}; known: 'llama' (dense, the default) and {MODEL_TYPE!r}")


def config_from_dict(d: dict, drop_unknown: bool = True):
    """A model config built from a dict (a checkpoint's recorded config or a recipe's ``model`` section after
    typing); ``drop_unknown`` drops keys the config class does not have (older / newer checkpoints).

    Raises:
        ValueError: unknown model_type or invalid values.
    """
    cls = config_class(d.get("model_type"))
    known = {f.name for f in dataclasses.fields(cls)}
    if cls is ModelConfig:
        d = {k: v for k, v in d.items() if k != "model_type"}
    return cls(**({k: v for k, v in d.items() if k in known} if drop_unknown else d))


def llada2_preset(name: str, **overrides) -> LLaDA2Config:
    """:class:`LLaDA2Config` of a named LLaDA2 shape (``llada2-mini``) with overrides.

    Raises:
        ValueError: unknown preset name.
    """
    if name not in LLADA2_PRESETS:
        raise ValueError(f"unknown LLaDA2 preset {name!r}; choose one of {sorted(LLADA2_PRESETS)}")
    return LLaDA2Config(**{**LLADA2_PRESETS[name], **overrides})


def build_model(cfg, init_weights: bool = True):
    """The backbone module for ``cfg``; ``init_weights=False`` skips the random initialisation (the caller runs
    the model's ``init_weights(materialize=...)`` itself, e.g. on ZeRO-3 partitions, or loads weights)."""
    cls = LLaDA2MoeModel if isinstance(cfg, LLaDA2Config) else Transformer
    return cls(cfg, init_weights=init_weights)


def is_moe(cfg) -> bool:
    """Whether ``cfg`` describes a mixture-of-experts backbone."""
    return isinstance(cfg, LLaDA2Config)
