"""Read model weights from any checkpoint this project produces, and write consolidated safetensors.

Three on-disk layouts are understood by :func:`load_model_state`:

* **DeepSpeed tag directory** ``runs/<name>/checkpoints/<tag>/`` written by ``engine.save_checkpoint`` at any
  ZeRO stage (0-3) and any data-parallel world size, plus our ``llada_scale.json`` metadata file
  (``{"step", "config": RunConfig.to_dict(), "tokenizer": identity, "zero_stage", "world_size"}``).
  Stages 1-3 are merged with DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
  (exact fp32 master weights); stage 0 reads ``mp_rank_00_model_states.pt`` (with bf16 the fp32 master
  copies kept by DeepSpeed's bf16 optimizer wrapper are used when present, so the result is exact too).
  The checkpoints directory itself (holding ``latest``) or the run directory may be given instead of a tag.
* **Consolidated safetensors** (written by :func:`save_safetensors` / ``tools/convert_checkpoint.py
  consolidate``): a directory with ``config.json`` (``{"format": "llada_scale", "model": ModelConfig dict,
  ...}``) and ``model.safetensors`` or HF-style shards ``model-0000i-of-0000n.safetensors`` +
  ``model.safetensors.index.json``; or a single ``.safetensors`` file (its metadata carries the config).
* **Hugging Face Llama-family directory** (``config.json`` with ``model_type`` + safetensors or
  ``pytorch_model.bin``), e.g. the output of ``convert_checkpoint.py export-hf``. Key names are the same
  as ours (our modules follow ``LlamaForCausalLM``); the config is mapped by :func:`model_config_from_hf`.

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
import math
import os
import re
import shutil
import tempfile
from typing import Any

import torch

__all__ = [
    "CheckpointError", "META_FILE", "CONFIG_FILE", "FORMAT", "resolve_checkpoint", "load_model_state",
    "save_safetensors", "build_model_from_checkpoint", "model_config_from_meta", "model_config_from_hf",
    "hf_config_from_model_config", "parse_size", "parse_dtype", "atomic_write_text", "tokenizer_path_from_meta",
    "copy_tokenizer_files", "check_state_dict",
]

META_FILE = "llada_scale.json"
CONFIG_FILE = "config.json"
FORMAT = "llada_scale"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_STRIP_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the path and what is wrong."""


# ---------------------------------------------------------------------------------------------- helpers
def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1.5GiB"`` / ``"123"`` -> bytes (int). GB = 10**9, GiB = 2**30.

    Raises:
        CheckpointError: unparseable text or a non-positive size.
    """
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise CheckpointError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise CheckpointError(f"size must be positive, got {text!r}")
    return n


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"|"fp32"|"fp16"`` (or a torch float dtype, or None = keep) -> torch dtype.

    Raises:
        CheckpointError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose bf16, fp32 or fp16")
    return _DTYPES[str(dtype).lower()]


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


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
        cfg = _read_json(os.path.join(path, CONFIG_FILE))
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
    raw_meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
    optim_files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    zero3_model = os.path.isfile(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    info: dict[str, Any] = {}
    if optim_files or zero3_model:
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
            sd[name] = t.contiguous().float().clone()
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
        sd = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in sd.items()}
        info["zero_stage"] = raw_meta.get("zero_stage", 0)
        info["world_size"] = raw_meta.get("world_size", states.get("dp_world_size"))
    sd = _normalize_keys(sd)
    config = raw_meta.get("config") if isinstance(raw_meta.get("config"), dict) else None
    model = config.get("model") if config else raw_meta.get("model")
    meta = {
        "format": "deepspeed", "path": tag_dir, "has_metadata": bool(raw_meta), "step": raw_meta.get("step"),
        "config": config, "model": model, "tokenizer": raw_meta.get("tokenizer"), **info,
    }
    return sd, meta


# ---------------------------------------------------------------------------------------------- safetensors
def _safetensors_files(dirpath: str) -> list[str]:
    index = os.path.join(dirpath, SAFE_INDEX)
    if os.path.isfile(index):
        idx = _read_json(index)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(dirpath, f))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {missing[:4]}")
        return [os.path.join(dirpath, f) for f in files]
    single = os.path.join(dirpath, SAFE_SINGLE)
    if os.path.isfile(single):
        return [single]
    return []


def _read_safetensors(files: list[str], progress: bool) -> tuple[dict, dict]:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    sd, header_meta = {}, {}
    for f in tqdm(files, desc="reading shards", unit="file", disable=not progress or len(files) < 2, leave=False):
        try:
            with safe_open(f, framework="pt", device="cpu") as fh:
                header_meta.update(fh.metadata() or {})
                for k in fh.keys():
                    if k in sd:
                        raise CheckpointError(f"tensor {k} appears in more than one shard ({f})")
                    sd[k] = fh.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {type(e).__name__}: {e}") from None
    return sd, header_meta


def _load_pytorch_bin(dirpath: str) -> dict:
    index = os.path.join(dirpath, "pytorch_model.bin.index.json")
    files = sorted(set(_read_json(index)["weight_map"].values())) if os.path.isfile(index) else ["pytorch_model.bin"]
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(os.path.join(dirpath, f), map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(dirpath, f)}: {type(e).__name__}: {e}") from None
    return sd


def model_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Map a Hugging Face Llama-family ``config.json`` dict to a :class:`ModelConfig` dict.

    Supported ``model_type``: llama, mistral (no sliding window), qwen3 (QK-norm; head_dim must equal
    hidden_size / num_attention_heads). Reads ``llada_scale`` / ``mask_token_id`` written by ``export-hf`` to
    restore diffusion models (``causal=False``).

    Raises:
        CheckpointError: a feature our backbone cannot represent (biases, rope scaling other than YaRN or YaRN
            options we do not implement, non-SiLU activation, head_dim != hidden/heads, sliding windows, MoE),
            naming the key.
    """
    mt = hf.get("model_type", "llama")
    if mt not in ("llama", "mistral", "qwen3"):
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported (llama, mistral, qwen3 are)")
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads "
                              f"({hf['hidden_size'] // heads}); our backbone ties them")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported (our projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu/SwiGLU)")
    rope_params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope_params.items() if k != "rope_theta"}
                                         if rope_params.get("rope_type", "default") != "default" else None)
    if mt in ("mistral", "qwen3") and hf.get("sliding_window") and hf.get("use_sliding_window", mt == "mistral"):
        raise CheckpointError(f"{source}: sliding-window attention is not supported")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise CheckpointError(f"{source}: mixture-of-experts models are not supported")
    extra = hf.get("llada_scale") if isinstance(hf.get("llada_scale"), dict) else {}
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None  # plain RoPE spelled out
    rope_scaling = (_rope_scaling_from_hf(hf, scaling, float(theta), hf["hidden_size"] // heads, source)
                    if scaling else None)
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "intermediate_size": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(theta),
        "rope_scaling": rope_scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "causal": bool(extra.get("causal", True)),
        "qk_norm": mt == "qwen3",
        "norm_weight": True,
        "mask_token_id": hf.get("mask_token_id", extra.get("mask_token_id")),
    }


def yarn_hf_mismatch(head_dim: int, theta: float, rope_scaling: dict) -> str | None:
    """Why HF ``_compute_yarn_parameters`` would compute other frequencies than our (minimind-convention)
    :func:`llada_scale.model.rope_inv_freq` for this YaRN config, or None when the two agree.

    They differ only in clamping the upper ramp bound: minimind to ``head_dim // 2 - 1``, HF to ``head_dim - 1``
    (see :func:`llada_scale.model.yarn_correction_range`); both agree when
    ``low <= ceil(d(beta_slow)) <= head_dim // 2 - 1``.
    """
    orig = rope_scaling["original_max_position_embeddings"]

    def index(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(index(rope_scaling["beta_fast"])), 0)
    high = math.ceil(index(rope_scaling["beta_slow"]))
    if low <= high <= head_dim // 2 - 1:
        return None
    return (f"YaRN ramp bounds low={low}, high={high} fall outside [low, head_dim/2-1={head_dim // 2 - 1}], where "
            "HF transformers (high clamped to head_dim-1) and minimind/llada_scale (clamped to head_dim/2-1) "
            "compute different rotary frequencies")


def _rope_scaling_from_hf(hf: dict, scaling: dict, theta: float, head_dim: int, source: str) -> dict:
    """HF ``rope_scaling`` / ``rope_parameters`` (yarn) -> ``ModelConfig.rope_scaling`` with HF's defaults made
    explicit (``attention_factor`` = 0.1 ln(factor) + 1 or the mscale ratio when absent, as HF computes)."""
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope_scaling {scaling!r} is not a dict")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (plain RoPE and yarn are)")
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "partial_rotary_factor"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise CheckpointError(f"{source}: rope_scaling key(s) {unknown} are not supported")
    if scaling.get("truncate", True) is not True:
        raise CheckpointError(f"{source}: rope_scaling truncate=false is not supported (YaRN with integer ramp "
                              "bounds only)")
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    orig = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                  hf.get("max_position_embeddings")))
    factor = scaling.get("factor")
    if factor is None and orig:
        factor = hf.get("max_position_embeddings", orig) / orig
    attn = scaling.get("attention_factor")
    if attn is None and factor is not None:  # HF's default: get_mscale(factor[, mscale]) ratio
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    from llada_scale.model import normalize_rope_scaling

    try:
        out = normalize_rope_scaling({"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                                      "beta_fast": scaling.get("beta_fast") or 32.0,
                                      "beta_slow": scaling.get("beta_slow") or 1.0, "attention_factor": attn})
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    why = yarn_hf_mismatch(head_dim, theta, out)
    if why:
        raise CheckpointError(f"{source}: {why}; this YaRN config cannot be imported exactly")
    return out


def hf_config_from_model_config(mc: dict, torch_dtype: str = "float32") -> dict:
    """Map a :class:`ModelConfig` dict to a Hugging Face ``LlamaForCausalLM`` ``config.json`` dict.

    Diffusion models (``causal=False``) additionally record ``mask_token_id`` and
    ``"llada_scale": {"causal": false, "mask_token_id": N}``; HF's Llama ignores them (see docs/EVAL.md for
    loading such a model with the causal mask removed).

    YaRN ``rope_scaling`` is written as ``rope_scaling`` (transformers 4.x) and ``rope_parameters`` (5.x) with
    ``rope_type: "yarn"`` and every parameter explicit (``attention_factor`` too: HF's default differs).

    Raises:
        CheckpointError: ``qk_norm=True`` or ``norm_weight=False`` (HF Llama cannot represent them), or a YaRN
            config for which HF computes different frequencies (:func:`yarn_hf_mismatch`).
    """
    if mc.get("qk_norm"):
        raise CheckpointError("this model uses QK-norm (qk_norm=true), which HF LlamaForCausalLM cannot represent; "
                              "keep it in the consolidated safetensors format")
    if not mc.get("norm_weight", True):
        raise CheckpointError("this model uses weightless RMSNorm (norm_weight=false), which HF LlamaForCausalLM "
                              "cannot represent; keep it in the consolidated safetensors format")
    rope_scaling = None
    if mc.get("rope_scaling"):
        rs = mc["rope_scaling"]
        why = yarn_hf_mismatch(mc["hidden_size"] // mc["num_heads"], mc["rope_theta"], rs)
        if why:
            raise CheckpointError(f"{why}; keep this model in the consolidated safetensors format")
        rope_scaling = {"rope_type": "yarn", **{k: rs[k] for k in ("factor", "original_max_position_embeddings",
                                                                   "beta_fast", "beta_slow", "attention_factor")}}
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": mc["vocab_size"],
        "hidden_size": mc["hidden_size"],
        "intermediate_size": mc["intermediate_size"],
        "num_hidden_layers": mc["num_layers"],
        "num_attention_heads": mc["num_heads"],
        "num_key_value_heads": mc["num_kv_heads"],
        "head_dim": mc["hidden_size"] // mc["num_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": mc["max_seq_len"],
        "rms_norm_eps": mc["norm_eps"],
        "rope_theta": mc["rope_theta"],
        "rope_scaling": rope_scaling,
        "rope_parameters": {**(rope_scaling or {"rope_type": "default"}), "rope_theta": mc["rope_theta"]},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(mc["tie_embeddings"]),
        "initializer_range": mc.get("init_std", 0.02),
        "torch_dtype": torch_dtype,
        "use_cache": bool(mc.get("causal", True)),
    }
    if not mc.get("causal", True):
        out["mask_token_id"] = mc.get("mask_token_id")
        out["llada_scale"] = {"causal": False, "mask_token_id": mc.get("mask_token_id")}
    return out


def _load_safetensors_dir(path: str, kind: str, progress: bool) -> tuple[dict, dict]:
    if kind == "safetensors_file":
        sd, header = _read_safetensors([path], progress)
        cfg_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
        if FORMAT in header:
            try:
                cfg = json.loads(header[FORMAT])
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata entry {FORMAT!r} is not valid JSON") from None
        elif os.path.isfile(cfg_path):
            cfg = _read_json(cfg_path)
        else:
            cfg = {}
        root = os.path.dirname(path)
    else:
        root = path
        cfg = _read_json(os.path.join(path, CONFIG_FILE))
        files = _safetensors_files(path)
        if files:
            sd, _ = _read_safetensors(files, progress)
        elif kind == "hf":
            sd = _load_pytorch_bin(path)
        else:
            raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX}")
    sd = _normalize_keys(sd)
    if cfg.get("format") == FORMAT or kind != "hf" and "model" in cfg:
        meta = {"format": "safetensors", "path": path, "has_metadata": "model" in cfg, "step": cfg.get("step"),
                "config": cfg.get("run_config"), "model": cfg.get("model"), "tokenizer": cfg.get("tokenizer"),
                "zero_stage": cfg.get("source", {}).get("zero_stage"),
                "world_size": cfg.get("source", {}).get("world_size")}
    elif "model_type" in cfg or "hidden_size" in cfg:
        model = model_config_from_hf(cfg, os.path.join(root, CONFIG_FILE))
        if model["tie_embeddings"]:
            sd.pop("lm_head.weight", None)
        meta = {"format": "hf", "path": path, "has_metadata": True, "step": None, "config": None, "model": model,
                "tokenizer": None, "zero_stage": None, "world_size": None}
    else:
        meta = {"format": "safetensors", "path": path, "has_metadata": False, "step": None, "config": None,
                "model": None, "tokenizer": None, "zero_stage": None, "world_size": None}
    for tok in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(root, tok)):
            meta["tokenizer_dir"] = root
            break
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return sd, meta


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
        (tokenizer identity dict|None), ``zero_stage`` and ``world_size`` (int|None), and ``tokenizer_dir``
        when the checkpoint directory carries tokenizer files.

    Raises:
        CheckpointError: missing path, unknown layout, incomplete ZeRO shard set, corrupt files.

    DeepSpeed merging follows ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
    (arguments: parent directory and tag). Safe to call on every rank of a distributed job (pure file I/O,
    no collectives).
    """
    kind, resolved = resolve_checkpoint(path)
    if kind == "deepspeed":
        return _load_deepspeed(resolved, progress)
    return _load_safetensors_dir(resolved, kind, progress)


def model_config_from_meta(meta: dict, source: str = "checkpoint"):
    """Build a :class:`llada_scale.model.ModelConfig` from ``meta["model"]`` (unknown keys are dropped).

    Raises:
        CheckpointError: no model config recorded (e.g. a DeepSpeed tag without ``llada_scale.json``) or
            invalid values.
    """
    from llada_scale.model import ModelConfig

    mc = meta.get("model")
    if not isinstance(mc, dict):
        raise CheckpointError(f"{source} has no model config: a DeepSpeed tag needs {META_FILE} "
                              f"(written by the trainer), a consolidated directory needs {CONFIG_FILE}; "
                              "cannot tell the model shape")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in mc.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config ({e})") from None


def build_model_from_checkpoint(path: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                                progress: bool = True, **overrides):
    """Rebuild the :class:`llada_scale.model.Transformer` stored in ``path`` with its weights loaded.

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
    from llada_scale.model import Transformer, load_weights

    sd, meta = load_model_state(path, progress=progress)
    cfg = model_config_from_meta(meta, meta["path"])
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model = Transformer(cfg)
    try:
        load_weights(model, sd, source=f"checkpoint {meta['path']}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    dt = parse_dtype(dtype)
    if dt is not None:
        model = model.to(dt)
    model.checkpoint_meta = meta
    return model.to(device).eval()


def check_state_dict(state_dict: dict, model_config, source: str = "checkpoint") -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of ``Transformer(model_config)``.

    The model is built on the ``meta`` device, so this costs no memory even for large configs.

    Raises:
        CheckpointError: one line naming missing / unexpected keys and shape mismatches (first 4 of each),
            e.g. ``... model.layers.0.mlp.up_proj.weight: checkpoint [704, 256] vs config [384, 128]``.
    """
    from llada_scale.model import Transformer, state_dict_mismatch

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in Transformer(model_config).state_dict().items()}
    problems = state_dict_mismatch(own, state_dict, source, target="config")
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


def save_safetensors(state_dict: dict[str, torch.Tensor], out_dir: str, config_dict: dict | None,
                     max_shard_bytes: int | str = "5GB", dtype: str | torch.dtype | None = "bf16", *,
                     progress: bool = True, metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state_dict`` as safetensors into ``out_dir`` (+ ``config.json``), sharded above a threshold.

    Args:
        state_dict: name -> tensor (any device/dtype). Tied/shared tensors are written once per name (cloned).
        out_dir: created if missing. Existing ``model*.safetensors`` files there that are not part of this
            save are removed afterwards (so no stale shards remain).
        config_dict: JSON-serialisable dict written to ``config.json`` (None = do not write one). For our
            format pass ``{"format": "llada_scale", "model": ModelConfig dict, ...}``; it is also stored in
            each file's safetensors metadata under ``"llada_scale"`` when it has that format.
        max_shard_bytes: bytes (or text like ``"5GB"``) per file; total above it -> HF-style shards
            ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (``{"metadata":
            {"total_size"}, "weight_map"}``), else one ``model.safetensors``.
        dtype: cast floating tensors (``"bf16"|"fp32"|"fp16"``, torch dtype or None = keep).
        progress: tqdm bar over tensors.
        metadata: extra str->str safetensors header entries.

    Returns:
        The written weight file names (relative to ``out_dir``).

    Every file goes to a temporary name first and is moved into place with ``os.replace``; ``config.json``
    is written last, so a reader never sees a config without its weights.

    Raises:
        CheckpointError: bad size/dtype, non-tensor values.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    limit = parse_size(max_shard_bytes)
    dt = parse_dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"state dict entry {k} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu()
        if dt is not None and t.is_floating_point():
            t = t.to(dt)
        tensors[k] = t.contiguous()
    # Break storage sharing (safetensors refuses shared tensors) by cloning every tensor once.
    seen_ptrs: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_ptrs or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[k] = t.clone()
        seen_ptrs.add(tensors[k].untyped_storage().data_ptr())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        total += nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    header = dict(metadata or {})
    header["format"] = "pt"
    if config_dict is not None and config_dict.get("format") == FORMAT:
        header[FORMAT] = json.dumps(config_dict)
    n = len(shards)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    bar = tqdm(total=len(tensors), desc=f"writing {out_dir}", unit="tensor", disable=not progress, leave=False)
    for name, shard in zip(names, shards):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + name + "-", dir=out_dir)
        os.close(fd)
        try:
            save_file(shard, tmp, metadata=header)
            os.replace(tmp, os.path.join(out_dir, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        bar.update(len(shard))
    bar.close()
    index_path = os.path.join(out_dir, SAFE_INDEX)
    if n > 1:
        weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
        atomic_write_text(index_path, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
    elif os.path.exists(index_path):
        os.unlink(index_path)
    for old in glob.glob(os.path.join(out_dir, "model*.safetensors")):
        if os.path.basename(old) not in names:
            os.unlink(old)
    if config_dict is not None:
        atomic_write_text(os.path.join(out_dir, CONFIG_FILE), json.dumps(config_dict, indent=2, sort_keys=True))
    return names


def copy_tokenizer_files(src: str, out_dir: str) -> list[str]:
    """Copy tokenizer files (tokenizer.json, tokenizer_config.json, *.model, special_tokens_map.json,
    chat_template.jinja) from ``src`` (a directory or a tokenizer file, whose directory is used) into
    ``out_dir`` atomically. Returns the copied file names; [] when ``src`` does not exist.
    """
    d = src if os.path.isdir(src) else os.path.dirname(src)
    if not os.path.isdir(d):
        return []
    wanted = [f for f in sorted(os.listdir(d))
              if f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
              or f.endswith(".model")]
    if os.path.isfile(src) and os.path.basename(src) not in wanted:
        wanted.append(os.path.basename(src))
    out = []
    for f in wanted:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + f + "-", dir=out_dir)
        os.close(fd)
        shutil.copyfile(os.path.join(d, f), tmp)
        os.replace(tmp, os.path.join(out_dir, f))
        out.append(f)
    return out
