"""On-disk pieces shared by the checkpoint package: the error type and file names, atomic writes, sizes and
dtypes, sharded safetensors (read and write) and tokenizer file copies.

Every writer here puts a file under a temporary name in the target directory and moves it into place with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile

import torch

__all__ = ["CheckpointError", "META_FILE", "CONFIG_FILE", "FORMAT", "SAFE_SINGLE", "SAFE_INDEX", "parse_size",
           "parse_dtype", "dtype_name", "resolve_dtype", "atomic_write_text", "read_json", "safetensors_files",
           "read_safetensors", "atomic_save_file", "save_safetensors", "copy_tokenizer_files"]


META_FILE = "llada_scale.json"


CONFIG_FILE = "config.json"


FORMAT = "llada_scale"


SAFE_SINGLE = "model.safetensors"


SAFE_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the path and what is wrong."""


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


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the short name the converters print and record (``fp32``, ``bf16``, ``fp16``, ``fp64``...)."""
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    return short.get(dtype, str(dtype).replace("torch.", ""))


def resolve_dtype(requested: str | torch.dtype | None, source_dtypes) -> tuple[torch.dtype, str]:
    """The dtype a converter writes, and the words saying where it came from.

    Args:
        requested: ``--dtype``: ``"auto"`` (or None) keeps the source's dtype, as transformers'
            ``torch_dtype="auto"`` does; ``"bf16"|"fp32"|"fp16"`` (or a torch dtype) casts to it.
        source_dtypes: the dtypes of the floating tensors as the source stores them (torch dtypes or their
            :func:`dtype_name`; any iterable).

    Returns:
        ``(dtype, origin)``, e.g. ``(torch.float32, "fp32 (source dtype; --dtype auto)")``. With ``auto``: the
        source's one dtype; a source that mixes dtypes (e.g. bf16 weights with fp32 norms) -> fp32, which holds
        bf16 and fp16 values exactly, so nothing is rounded; an fp64 source -> fp32 (the widest dtype our formats
        write: rounded, and the origin says so); no floating tensors -> fp32.

    Raises:
        CheckpointError: an unknown name.
    """
    found = sorted({d if isinstance(d, str) else dtype_name(d) for d in source_dtypes
                    if isinstance(d, str) or d is not None and d.is_floating_point})
    seen = "+".join(found) or "none"
    if requested is not None and str(requested).lower() != "auto":
        dt = parse_dtype(requested)
        return dt, f"{dtype_name(dt)} (--dtype {dtype_name(dt)}; source {seen})"
    if len(found) == 1 and found[0] in ("fp32", "bf16", "fp16"):
        return parse_dtype(found[0]), f"{found[0]} (source dtype; --dtype auto)"
    if not found:
        why = "no floating tensors in the source"
    elif "fp64" in found:
        why = f"source {seen}: fp64 rounded to fp32, the widest dtype written"
    else:
        why = f"source mixes {seen}: the widest, nothing rounded"
    return torch.float32, f"fp32 ({why}; --dtype auto)"


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


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def safetensors_files(dirpath: str) -> list[str]:
    index = os.path.join(dirpath, SAFE_INDEX)
    if os.path.isfile(index):
        idx = read_json(index)
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


def read_safetensors(files: list[str], progress: bool) -> tuple[dict, dict]:
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


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` to a temporary name next to ``path``, then ``os.replace``."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError, not OSError
            if "os error 28" in str(e) or "StorageFull" in str(e) or "No space left" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", path) from None
            raise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        atomic_save_file(shard, os.path.join(out_dir, name), header)
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


def tokenizer_dir(src: str) -> str:
    """The directory of a tokenizer given as a directory or as one of its files (a bare file name included: its
    directory is the working directory, not "")."""
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def copy_tokenizer_files(src: str, out_dir: str) -> list[str]:
    """Copy tokenizer files (tokenizer.json, tokenizer_config.json, *.model, special_tokens_map.json,
    chat_template.jinja) from ``src`` (a directory or a tokenizer file, whose directory is used) into
    ``out_dir`` atomically. Returns the copied file names; [] when ``src`` does not exist.
    """
    d = tokenizer_dir(src)
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
