"""Read model weights from any checkpoint this project produces or imports, and rebuild the model.

Three on-disk layouts are understood by :func:`load_model_state`:

* **DeepSpeed tag directory** ``runs/<name>/checkpoints/<tag>/`` written by ``engine.save_checkpoint`` at any
  ZeRO stage (0-3) and any data-parallel world size, plus our ``llada_scale.json`` metadata file
  (``{"step", "config": RunConfig.to_dict(), "tokenizer": identity, "zero_stage", "world_size"}``).
  Stages 1-3 are merged with DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
  (exact fp32 master weights); stage 0 reads ``mp_rank_00_model_states.pt`` (with bf16 the fp32 master
  copies kept by DeepSpeed's bf16 optimizer wrapper are used when present, so the result is exact too).
  Checkpoints of expert-parallel runs are merged by :mod:`llada_scale.checkpoint.autoep`.
  The checkpoints directory itself (holding ``latest``) or the run directory may be given instead of a tag.
* **Consolidated safetensors** (written by :func:`llada_scale.checkpoint.files.save_safetensors` / ``tools/convert_checkpoint.py
  consolidate``): a directory with ``config.json`` (``{"format": "llada_scale", "model": ModelConfig dict,
  ...}``) and ``model.safetensors`` or HF-style shards ``model-0000i-of-0000n.safetensors`` +
  ``model.safetensors.index.json``; or a single ``.safetensors`` file (its metadata carries the config).
* **Hugging Face Llama-family directory** (``config.json`` with ``model_type`` + safetensors or
  ``pytorch_model.bin``), e.g. the output of ``convert_checkpoint.py export-hf``. Key names are the same
  as ours (our modules follow ``LlamaForCausalLM``); the config is mapped by :func:`llada_scale.checkpoint.hf.model_config_from_hf`.

Importing this module has no side effects (DeepSpeed is imported lazily, only for ZeRO checkpoints).
Loading uses ``torch.load(weights_only=False)`` for DeepSpeed files (they pickle Python objects): only
load checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
from typing import Any

import torch

from llada_scale.checkpoint import autoep
from llada_scale.checkpoint.files import (CONFIG_FILE, FORMAT, META_FILE, SAFE_INDEX, SAFE_SINGLE, CheckpointError,
                                          dtype_name, parse_dtype, read_json, read_safetensors,
                                          safetensors_files)
from llada_scale.checkpoint.hf import load_pytorch_bin, model_config_from_hf
from llada_scale.checkpoint.integrity import verify_source

__all__ = ["resolve_checkpoint", "load_model_state", "build_model_from_checkpoint", "model_config_from_meta",
           "tokenizer_path_from_meta", "check_state_dict", "expected_shapes", "consolidated_meta"]

_STRIP_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


# ---------------------------------------------------------------------------------------------- helpers


def _normalize_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # truncated / corrupt file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------- resolve
def resolve_checkpoint(path: str) -> tuple[str, str]:
    """Classify ``path`` and return ``(kind, resolved_path)``.

    kind is ``"deepspeed"`` (a tag directory), ``"safetensors"`` (our consolidated directory),
    ``"safetensors_file"`` (one ``.safetensors`` file) or ``"hf"`` (a Hugging Face model directory).
    A checkpoints directory with a ``latest`` file, or a run directory with ``checkpoints/latest``, resolves
    to the latest tag.

    Raises:
        CheckpointError: the path does not exist or holds none of these layouts.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors_file", path
        raise CheckpointError(f"{path} is a file but not a .safetensors file; pass a DeepSpeed tag directory, "
                              "a consolidated directory or a .safetensors file")
    names = set(os.listdir(path))
    if "mp_rank_00_model_states.pt" in names or "zero_pp_rank_0_mp_rank_00_model_states.pt" in names:
        return "deepspeed", path
    if CONFIG_FILE in names:
        cfg = read_json(os.path.join(path, CONFIG_FILE))
        has_weights = SAFE_SINGLE in names or SAFE_INDEX in names or "pytorch_model.bin" in names \
            or "pytorch_model.bin.index.json" in names
        if not has_weights:
            raise CheckpointError(f"{path} has config.json but no {SAFE_SINGLE}, {SAFE_INDEX} or pytorch_model.bin")
        return ("safetensors" if cfg.get("format") == FORMAT else "hf"), path
    for latest in (os.path.join(path, "latest"), os.path.join(path, "checkpoints", "latest")):
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
            tag_dir = os.path.join(os.path.dirname(latest), tag)
            if not tag or not os.path.isdir(tag_dir):
                raise CheckpointError(f"{latest} names tag {tag!r} but {tag_dir} does not exist")
            return resolve_checkpoint(tag_dir)
    raise CheckpointError(f"{path} is not a checkpoint: expected a DeepSpeed tag directory "
                          "(mp_rank_00_model_states.pt / zero_pp_rank_*_model_states.pt), a directory with "
                          f"{CONFIG_FILE} + safetensors, a .safetensors file, or a directory with a 'latest' file")


# ---------------------------------------------------------------------------------------------- deepspeed
@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence DeepSpeed's prints (zero_to_fp32 prints to stdout; its tqdm bars go to stderr unless
    ``progress``) while loading. Errors still surface as exceptions."""
    with contextlib.redirect_stdout(io.StringIO()):
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield


def _load_deepspeed(tag_dir: str, progress: bool) -> tuple[dict, dict]:
    meta_path = os.path.join(tag_dir, META_FILE)
    raw_meta = read_json(meta_path) if os.path.isfile(meta_path) else {}
    optim_files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    zero3_model = os.path.isfile(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    info: dict[str, Any] = {}
    if autoep.is_autoep(tag_dir, raw_meta):  # expert parallelism: merged through a universal checkpoint
        sd = autoep.load_state(tag_dir)
        info.update(dtypes={"float32"}, zero_stage=raw_meta.get("zero_stage"), world_size=raw_meta.get("world_size"))
    elif optim_files or zero3_model:
        if not optim_files:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 model states but no *_optim_states.pt files (incomplete save?)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        parent, tag = os.path.split(tag_dir.rstrip(os.sep))
        try:
            with _quiet(progress):
                lazy = get_fp32_state_dict_from_zero_checkpoint(parent, tag, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"cannot merge ZeRO checkpoint {tag_dir}: {e}") from None
        sd = {}
        from tqdm.auto import tqdm

        seen: dict[int, str] = {}
        for name, t in tqdm(lazy.items(), desc="merging ZeRO shards", unit="tensor", disable=not progress,
                            leave=False):
            if id(t) in seen:  # shared parameter: DeepSpeed maps it to the same object
                sd[name] = sd[seen[id(t)]]
                continue
            seen[id(t)] = name
            t = t.contiguous()
            info.setdefault("dtypes", set()).add(dtype_name(t.dtype))
            sd[name] = t.float().clone()
        del lazy
        info["zero_stage"] = raw_meta.get("zero_stage")
        info["world_size"] = raw_meta.get("world_size", len(optim_files))
        if info["zero_stage"] is None:
            info["zero_stage"] = 3 if zero3_model else None
    else:
        states = _torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{tag_dir}/mp_rank_00_model_states.pt has no 'module' state dict")
        buffers = set(states.get("buffer_names") or ())
        sd = {k: v for k, v in module.items()}
        # bf16 at stage 0: the fp32 master copies live in optimizer["fp32_groups"] in parameter order.
        opt = states.get("optimizer")
        masters = opt.get("fp32_groups") if isinstance(opt, dict) else None
        if masters and any(v.dtype != torch.float32 for v in sd.values() if torch.is_tensor(v)):
            flat = [t for g in masters for t in (g if isinstance(g, (list, tuple)) else [g])]
            params = [k for k in module if k not in buffers]
            if len(flat) == len(params) and all(tuple(flat[i].shape) == tuple(module[k].shape)
                                                for i, k in enumerate(params)):
                for i, k in enumerate(params):
                    sd[k] = flat[i]
        info["dtypes"] = {dtype_name(v.dtype) for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()}
        sd = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in sd.items()}
        info["zero_stage"] = raw_meta.get("zero_stage", 0)
        info["world_size"] = raw_meta.get("world_size", states.get("dp_world_size"))
    sd = _normalize_keys(sd)
    config = raw_meta.get("config") if isinstance(raw_meta.get("config"), dict) else None
    model = config.get("model") if config else raw_meta.get("model")
    meta = {
        "format": "deepspeed", "path": tag_dir, "has_metadata": bool(raw_meta), "step": raw_meta.get("step"),
        "config": config, "model": model, "tokenizer": raw_meta.get("tokenizer"), **info,
        "dtypes": sorted(info.get("dtypes", ())),
    }
    return sd, meta


# ---------------------------------------------------------------------------------------------- safetensors


def _load_safetensors_dir(path: str, kind: str, progress: bool) -> tuple[dict, dict]:
    if kind == "safetensors_file":
        sd, header = read_safetensors([path], progress)
        cfg_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
        if FORMAT in header:
            try:
                cfg = json.loads(header[FORMAT])
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata entry {FORMAT!r} is not valid JSON") from None
        elif os.path.isfile(cfg_path):
            cfg = read_json(cfg_path)
        else:
            cfg = {}
        root = os.path.dirname(path)
    else:
        root = path
        cfg = read_json(os.path.join(path, CONFIG_FILE))
        files = safetensors_files(path)
        if files:
            sd, _ = read_safetensors(files, progress)
        elif kind == "hf":
            sd = load_pytorch_bin(path)
        else:
            raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}")
    sd = _normalize_keys(sd)
    meta = _meta_from_config(cfg, path, root, kind)
    if meta["format"] == "hf" and meta["model"]["tie_embeddings"]:
        sd.pop("lm_head.weight", None)
    meta["dtypes"] = sorted({dtype_name(v.dtype) for k, v in sd.items()
                             if v.is_floating_point() and not k.endswith("rotary_emb.inv_freq")})  # a buffer
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return sd, meta


def _meta_from_config(cfg: dict, path: str, root: str, kind: str) -> dict:
    """The metadata dict of :func:`load_model_state` from a consolidated or HF ``config.json`` (``cfg``)."""
    if cfg.get("format") == FORMAT or kind != "hf" and "model" in cfg:
        meta = {"format": "safetensors", "path": path, "has_metadata": "model" in cfg, "step": cfg.get("step"),
                "config": cfg.get("run_config"), "model": cfg.get("model"), "tokenizer": cfg.get("tokenizer"),
                "zero_stage": cfg.get("source", {}).get("zero_stage"),
                "world_size": cfg.get("source", {}).get("world_size")}
    elif "model_type" in cfg or "hidden_size" in cfg:
        model = model_config_from_hf(cfg, os.path.join(root, CONFIG_FILE))
        meta = {"format": "hf", "path": path, "has_metadata": True, "step": None, "config": None, "model": model,
                "tokenizer": None, "zero_stage": None, "world_size": None}
    else:
        meta = {"format": "safetensors", "path": path, "has_metadata": False, "step": None, "config": None,
                "model": None, "tokenizer": None, "zero_stage": None, "world_size": None}
    for tok in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(root, tok)):
            meta["tokenizer_dir"] = root
            break
    return meta


def consolidated_meta(path: str) -> dict:
    """The metadata :func:`load_model_state` returns for the consolidated directory ``path`` (resolved), read
    from its ``config.json`` alone: for callers that stream the weights themselves."""
    return _meta_from_config(read_json(os.path.join(path, CONFIG_FILE)), path, path, "safetensors")


# ---------------------------------------------------------------------------------------------- public API
def load_model_state(path: str, *, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load the model weights of any supported checkpoint as an fp32 state dict plus metadata.

    Args:
        path: DeepSpeed tag directory (any ZeRO stage 0-3, any world size; or its ``checkpoints`` / run
            directory, resolved through ``latest``), consolidated safetensors directory or file, or a
            Hugging Face Llama-family directory. See the module docstring.
        progress: show tqdm bars while merging / reading shards.

    Returns:
        ``(state_dict, meta)``. state_dict maps our key names (HF Llama names, ``module.``/``_orig_mod.``
        prefixes stripped) to float32 CPU tensors (contiguous, unshared). meta has keys ``format``
        (``"deepspeed"|"safetensors"|"hf"``), ``path`` (resolved), ``has_metadata`` (bool), ``step``
        (int|None), ``config`` (RunConfig dict|None), ``model`` (ModelConfig dict|None), ``tokenizer``
        (tokenizer identity dict|None), ``zero_stage`` and ``world_size`` (int|None), ``dtypes`` (sorted short
        names of the floating dtypes the checkpoint stores, before the fp32 upcast, e.g. ``["bf16"]``; ZeRO
        merges give their fp32 master weights: ``["fp32"]``), and ``tokenizer_dir`` when the checkpoint
        directory carries tokenizer files.

    Raises:
        CheckpointError: missing path, unknown layout, incomplete ZeRO shard set, corrupt files, a file that
            does not match its recorded SHA-256 (:func:`llada_scale.checkpoint.integrity.verify_source`).

    DeepSpeed merging follows ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
    (arguments: parent directory and tag). Safe to call on every rank of a distributed job (pure file I/O,
    no collectives).
    """
    kind, resolved = resolve_checkpoint(path)
    verify_source(kind, resolved)
    if kind == "deepspeed":
        return _load_deepspeed(resolved, progress)
    return _load_safetensors_dir(resolved, kind, progress)


def model_config_from_meta(meta: dict, source: str = "checkpoint"):
    """Build a :class:`llada_scale.model.transformer.ModelConfig` from ``meta["model"]`` (unknown keys are dropped).

    Raises:
        CheckpointError: no model config recorded (e.g. a DeepSpeed tag without ``llada_scale.json``) or
            invalid values.
    """
    mc = meta.get("model")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{source} has no model config: a DeepSpeed tag needs {META_FILE} "
                              f"(written by the trainer), a consolidated directory needs {CONFIG_FILE}; "
                              "cannot tell the model shape")
    from llada_scale.model.registry import config_from_dict

    try:
        return config_from_dict(mc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config ({e})") from None


def build_model_from_checkpoint(path: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                                progress: bool = True, **overrides):
    """Rebuild the :class:`llada_scale.model.transformer.Transformer` stored in ``path`` with its weights loaded.

    Args:
        path: anything :func:`load_model_state` accepts.
        dtype: cast the weights (``"bf16"``/``"fp32"``/torch dtype); default float32.
        device: where to put the model.
        overrides: ModelConfig fields to replace (e.g. ``attention_backend="sdpa"``; not shapes).

    Returns:
        The model in eval mode, with ``model.checkpoint_meta`` set to the metadata dict.

    Raises:
        CheckpointError: missing metadata (no ``llada_scale.json`` / ``config.json``) or weights that do not
            fit the recorded config (the message names missing/unexpected keys and shape mismatches).
    """
    from llada_scale.model.registry import build_model
    from llada_scale.model.transformer import load_weights

    sd, meta = load_model_state(path, progress=progress)
    cfg = model_config_from_meta(meta, meta["path"])
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model = build_model(cfg)
    try:
        load_weights(model, sd, source=f"checkpoint {meta['path']}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    dt = parse_dtype(dtype)
    if dt is not None:
        model = model.to(dt)
    model.checkpoint_meta = meta
    return model.to(device).eval()


def expected_shapes(model_config) -> dict[str, tuple]:
    """Parameter name -> shape of ``Transformer(model_config)``, built on the ``meta`` device (no memory, even for
    large configs)."""
    from llada_scale.model.registry import build_model

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(model_config).state_dict().items()}


def check_state_dict(state_dict: dict, model_config, source: str = "checkpoint") -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of ``Transformer(model_config)``
    (:func:`expected_shapes`).

    Raises:
        CheckpointError: one line naming missing / unexpected keys and shape mismatches (first 4 of each),
            e.g. ``... model.layers.0.mlp.up_proj.weight: checkpoint [704, 256] vs config [384, 128]``.
    """
    from llada_scale.model.transformer import state_dict_mismatch

    problems = state_dict_mismatch(expected_shapes(model_config), state_dict, source, target="config")
    if problems:
        raise CheckpointError(f"{source} does not fit its model config ({problems})")


def tokenizer_path_from_meta(meta: dict) -> str | None:
    """Where to load the checkpoint's tokenizer from: the copy inside a consolidated directory, else the
    identity's recorded ``path`` (if it still exists), else None."""
    if meta.get("tokenizer_dir"):
        return meta["tokenizer_dir"]
    tok = meta.get("tokenizer") or {}
    p = tok.get("path") if isinstance(tok, dict) else None
    if p and os.path.exists(p):
        return p
    cfg = meta.get("config") or {}
    p = cfg.get("tokenizer") if isinstance(cfg, dict) else None
    if isinstance(p, str) and "${" not in p and os.path.exists(p):
        return p
    return None


