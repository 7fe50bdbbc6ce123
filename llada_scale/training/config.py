"""Typed run configuration: one YAML recipe per job, overridden by ``key.sub=value`` arguments.

A recipe has the sections ``model``, ``data``, ``objective``, ``optim`` and ``train`` (plus ``run_name``,
``run_dir``, ``seed``, ``tokenizer``). Strings may use ``${VAR}`` / ``${VAR:-default}`` environment
variables; ``LLADA_DATA`` defaults to ``../shared/data`` next to the repository.

Every value is checked against its field's type before anything runs (:func:`load_config`): a bool field takes
a YAML bool (``true``/``false``; the string ``"false"`` is refused), an int field an integer (``1e4`` is
10000, ``2.5`` is refused), a number field a number; a ``${VAR}`` value of a non-string field is expanded and
then read as YAML (``${CAUSAL:-false}`` is the bool false). Ranges and choices are checked too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llada_scale.data import DEFAULT_DATA
from llada_scale.data.mixture import normalize_sources
from llada_scale.model.transformer import PRESETS, ModelConfig
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.training.lora import LoRAConfig



class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says which key and how to fix it."""


@dataclass
class DataConfig:
    """Where the shards are and how batches are cut.

    train_shards / val_shards: directories written by ``tools/build_shards.py`` (``val_shards`` defaults to
    ``train_shards``; its ``val`` split is used). seq_len: tokens per packed row. Locations may be local paths,
    ``pipe:`` commands or fsspec URLs (:mod:`llada_scale.data.remote`); ``train_shards`` may be a weighted
    mixture, a list of ``{path, weight[, name]}`` (:mod:`llada_scale.data.mixture`; ``val_shards`` must then be set).
    """

    train_shards: str | list = ""
    val_shards: str = ""
    seq_len: int = 256
    num_workers: int = 1


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (see :mod:`llada_scale.training.schedule`)."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying
    grad_clip: float = 1.0


@dataclass
class TrainLoopConfig:
    """Batch sizes (sequences), step counts, checkpointing, logging.

    global_batch_size = micro_batch_size x gradient accumulation steps x data-parallel size (world size /
    sequence_parallel_size; checked at start).
    resume: ``auto`` (latest complete checkpoint in run_dir, if any), ``none``, or a checkpoint tag directory.
    init_from: a checkpoint tag directory (ours, any ZeRO stage) or consolidated ``.safetensors`` whose
    weights initialise the model (AR -> diffusion); the mask-token rows are added when missing.
    """

    global_batch_size: int = 32
    micro_batch_size: int = 8
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    resume: str = "auto"
    init_from: str = ""
    wandb: str = "auto"  # auto (offline without WANDB_API_KEY) | online | offline | off
    wandb_project: str = "llada_scale"
    peak_flops: float = 0.0  # per device, FLOP/s, for MFU; 0 = datasheet bf16 peak of known GPUs, none on CPU
    num_samples: int = 2  # generated samples printed at each validation
    sample_tokens: int = 32
    sample_block_length: int = 0  # diffusion samples: semi-autoregressive block length (0 = one block)
    nonfinite: str = "skip"  # skip | stop: what to do when the loss or the gradients are NaN/inf
    # Bound on micro batches with a non-finite loss in a row, and on optimizer steps skipped for non-finite
    # gradients in a row (DeepSpeed's overflow skips; at ZeRO-0 a NaN/inf grad norm): then the run saves its last
    # good state and stops with exit status 2 (training/guards.py).
    max_consecutive_skips: int = 10
    # Loss spikes: a micro batch whose loss (largest over ranks) exceeds spike_factor x the running mean
    # (EMA, decay 0.99) after spike_warmup steps is skipped on every rank or stops the run (spike_action).
    # 0 = off. 20 spikes in a row stop the run (the loss level itself changed). See Trainer._is_spike.
    spike_factor: float = 0.0
    spike_action: str = "skip"  # skip | stop
    spike_warmup: int = 100
    stop_at_step: int = 0  # >0: checkpoint and exit at this step as if preempted (split a run across jobs; tests)
    # Early stopping on the validation loss (needs val_every > 0): stop, save and exit 0 after this many
    # validations in a row without an improvement of more than early_stop_min_delta over the best. 0 = off.
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    # Memory and speed (llada_scale.training.parallelize): recompute decoder layers in the backward
    # (none | full | selective = every activation_checkpointing_every-th layer), torch.compile each layer
    # (auto = on for CUDA | true | false).
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    compile: str | bool = "auto"
    # Ulysses sequence parallelism (llada_scale.training.sequence_parallel): ranks per row, 1 = off; data
    # parallel size = world / sequence_parallel_size (checked at start with the heads and seq_len it must divide)
    sequence_parallel_size: int = 1
    # Expert parallelism of MoE models (llada_scale.training.expert_parallel, DeepSpeed AutoEP): ranks that split
    # every MoE layer's routed experts, 1 = off; must divide the world size and model.num_experts
    expert_parallel_size: int = 1
    # ZeRO-3 only: build the model partitioned (deepspeed.zero.Init) and stream init_from into the partitions, so
    # no rank holds the whole model (llada_scale.training.zero_init); false = every rank builds it in full first.
    zero3_init: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train.lora.rank > 0: LoRA (llada_scale.training.lora)


@dataclass
class RunConfig:
    """A whole recipe."""

    run_name: str = "run"
    run_dir: str = ""
    seed: int = 0
    tokenizer: str = "${LLADA_DATA}/tokenizer/minimind"
    model_preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``LLADA_DATA`` defaults to ``../shared/data``.

    Raises ConfigError for an unset variable without a default.
    """

    def sub(m):
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if name == "LLADA_DATA":
            return DEFAULT_DATA
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (used in {value!r})")

    return _ENV.sub(sub, value)


def _number(v: str):
    """A number written as text (YAML 1.1 reads ``1e-3`` and ``1e4`` without a dot as strings), or None."""
    try:
        return float(v)
    except ValueError:
        return None


def _coerce(v: Any, typ: str, key: str):
    """``v`` as a value of the dataclass field type ``typ`` (its annotation text), or ConfigError."""
    if isinstance(v, str) and typ != "str" and "${" in v:  # an environment value for a non-string field
        v = yaml.safe_load(expand_env(v))
    optional = typ.endswith(" | None")
    base = typ[:-len(" | None")] if optional else typ
    if v is None and optional:
        return None
    if base == "str":
        if isinstance(v, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            return "on" if v else "off"
        if isinstance(v, (int, float)):
            return str(v)
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, not {v!r}")
        return expand_env(v)
    if base == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false (a YAML bool, unquoted), not {v!r}")
        return v
    if base in ("int", "float"):
        n = _number(v) if isinstance(v, str) else v
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != n or n in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be a{'n integer' if base == 'int' else ' number'}, not {v!r}")
        if base == "float":
            return float(n)
        if n != int(n):
            raise ConfigError(f"{key} must be an integer, not {v!r}")
        return int(n)
    if base.startswith("tuple[float, float]"):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ConfigError(f"{key} must be a list of two numbers, e.g. [0.9, 0.95], not {v!r}")
        return tuple(_coerce(x, "float", f"{key}[{i}]") for i, x in enumerate(v))
    if base == "dict" and not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, not {v!r}")
    return v


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, not {values!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    prefix = "" if where == "the top level" else f"{where}."
    kwargs = {k: _coerce(v, names[k].type, f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


# (section, key, test, what it must be): checked by load_config after the types
_RULES = [
    ("data", "seq_len", lambda v: v >= 1, ">= 1"),
    ("data", "num_workers", lambda v: v >= 0, ">= 0"),
    ("optim", "lr", lambda v: v > 0, "> 0"),
    ("optim", "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim", "betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim", "eps", lambda v: v > 0, "> 0"),
    ("optim", "schedule", lambda v: v in ("wsd", "cosine", "constant"), "one of wsd, cosine, constant"),
    ("optim", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim", "decay_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim", "grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train", "global_batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "max_steps", lambda v: v >= 1, ">= 1"),
    ("train", "log_every", lambda v: v >= 1, ">= 1"),
    ("train", "val_every", lambda v: v >= 0, ">= 0 (0 = no validation)"),
    ("train", "val_batches", lambda v: v >= 1, ">= 1"),
    ("train", "save_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train", "keep_last", lambda v: v >= 0, ">= 0 (0 = keep all)"),
    ("train", "wandb", lambda v: v in ("auto", "online", "offline", "off"), "one of auto, online, offline, off"),
    ("train", "peak_flops", lambda v: v >= 0, ">= 0"),
    ("train", "num_samples", lambda v: v >= 0, ">= 0"),
    ("train", "sample_tokens", lambda v: v >= 1, ">= 1"),
    ("train", "sample_block_length", lambda v: v >= 0, ">= 0"),
    ("train", "nonfinite", lambda v: v in ("skip", "stop"), "one of skip, stop"),
    ("train", "max_consecutive_skips", lambda v: v >= 1, ">= 1"),
    ("train", "spike_factor", lambda v: v == 0 or v > 1, "0 (off) or > 1"),
    ("train", "spike_action", lambda v: v in ("skip", "stop"), "one of skip, stop"),
    ("train", "spike_warmup", lambda v: v >= 0, ">= 0"),
    ("train", "stop_at_step", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train", "early_stop_patience", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train", "early_stop_min_delta", lambda v: v >= 0, ">= 0"),
    ("train", "sequence_parallel_size", lambda v: v >= 1, ">= 1 (1 = off)"),
    ("train", "expert_parallel_size", lambda v: v >= 1, ">= 1 (1 = off)"),
]


def validate(cfg: "RunConfig") -> None:
    """Ranges, choices and cross-field rules of a typed recipe (:data:`_RULES` and the ones below).

    Raises:
        ConfigError: naming the key, the value and what it must be.
    """
    for section, key, ok, what in _RULES:
        v = getattr(getattr(cfg, section), key)
        if not ok(v):
            raise ConfigError(f"{section}.{key} must be {what}, not {v!r}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's max_seq_len="
                          f"{cfg.model.max_seq_len} (preset {cfg.model_preset}); lower data.seq_len or raise "
                          "model.max_seq_len")
    if cfg.train.early_stop_patience and not cfg.train.val_every:
        raise ConfigError("train.early_stop_patience needs validation: set train.val_every > 0")
def _build_train(values: dict) -> TrainLoopConfig:
    values = dict(values)
    lora = values.pop("lora", None) or {}
    if not isinstance(lora, dict):
        raise ConfigError(f"train.lora must be a section (rank, alpha, dropout, target_modules), not {lora!r}")
    train = _build(TrainLoopConfig, values, "train")
    train.lora = _build(LoRAConfig, lora, "train.lora")
    return train


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> ``(['optim', 'lr'], 0.0003)`` (value parsed as YAML). Raises ConfigError."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value != "" else ""


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply ``overrides`` and return a validated :class:`RunConfig`.

    The model section may name ``preset`` (see :data:`llada_scale.model.transformer.PRESETS`); other model keys override
    the preset. Raises ConfigError (missing file, bad YAML, unknown keys, invalid values).
    """
    raw: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, objective:, optim:, train:), "
                              f"not a {type(raw).__name__}")
    for ov in overrides:
        keys, value = parse_override(ov)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = value
    sections = {"model", "data", "objective", "optim", "train"}
    for name in sections:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"section {name} must be a mapping of keys to values, not {raw[name]!r}")
    top = {k: v for k, v in raw.items() if k not in sections}
    model_raw = dict(raw.get("model") or {})
    model_cls, presets = _model_kind(model_raw.get("model_type"))
    preset = model_raw.pop("preset", top.pop("model_preset", "tiny" if model_cls is ModelConfig else "none"))
    if preset not in presets and not (preset == "none" and model_cls is not ModelConfig):
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(presets)}")
    model = _build(model_cls, {**presets.get(preset, {}), **model_raw}, "model")
    cfg = _build(RunConfig, top, "the top level")
    cfg.model_preset = preset
    cfg.model = model
    cfg.data = _build(DataConfig, raw.get("data") or {}, "data")
    cfg.objective = _build(ObjectiveConfig, raw.get("objective") or {}, "objective")
    cfg.optim = _build(OptimConfig, raw.get("optim") or {}, "optim")
    cfg.train = _build_train(raw.get("train") or {})
    cfg.tokenizer = expand_env(cfg.tokenizer)
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / cfg.run_name)
    try:  # a location string (environment expanded), or a list of weighted sources
        shards = normalize_sources(cfg.data.train_shards)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.data.train_shards = expand_env(shards) if isinstance(shards, str) else \
        [{**s, "path": expand_env(s["path"])} for s in shards]
    if not cfg.data.val_shards and isinstance(cfg.data.train_shards, str):  # a mixture: preflight asks for it
        cfg.data.val_shards = cfg.data.train_shards
    validate(cfg)
    return cfg


def _model_kind(model_type) -> tuple[type, dict]:
    """(config class, presets) of a ``model.model_type`` (absent: the dense ModelConfig; ``llada2_moe``: LLaDA2's
    MoE config, whose presets are :data:`llada_scale.model.llada2_moe.LLADA2_PRESETS`, default none)."""
    from llada_scale.model.llada2_moe import LLADA2_PRESETS
    from llada_scale.model.registry import config_class

    try:
        cls = config_class(model_type)
    except ValueError as e:
        raise ConfigError(f"model.model_type: {e}") from None
    return cls, (PRESETS if cls is ModelConfig else LLADA2_PRESETS)


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output (as stored in checkpoints)."""
    d = dict(d)
    model = _build(_model_kind(d["model"].get("model_type"))[0], d.pop("model"), "model")
    parts = {k: d.pop(k) for k in ("data", "objective", "optim", "train")}
    cfg = _build(RunConfig, d, "the top level")
    cfg.model = model
    cfg.data = _build(DataConfig, parts["data"], "data")
    cfg.objective = _build(ObjectiveConfig, parts["objective"], "objective")
    cfg.optim = _build(OptimConfig, parts["optim"], "optim")
    cfg.train = _build_train(parts["train"])
    return cfg
