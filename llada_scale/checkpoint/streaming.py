"""Shard-by-shard weight conversion with every check done before the first byte is written, and staged output
directories (a conversion either leaves a complete output directory or none).

:func:`scan_weights` reads only the headers of a checkpoint's weight files (safetensors: the JSON header;
``pytorch_model*.bin``: a memory-mapped ``torch.load``) and returns where every tensor is, its shape and dtype.
:func:`stream_convert` renames, checks and re-types the tensors and writes HF-style shards, reading one input
tensor at a time and holding at most one output shard in memory: peak RAM ~ ``max_shard_size`` + the largest
tensor (+ page cache of the memory-mapped input, which the OS can drop). :func:`staged_output` builds the output
in a sibling temporary directory, records every file's SHA-256 in its ``SHA256SUMS`` and renames it into place
at the end; ``--force`` never deletes a file of another format (:func:`staged_output`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from llada_scale.checkpoint.integrity import SUMS_FILE, read_sums, verify_source, write_sums
from llada_scale.checkpoint.files import (SAFE_INDEX, SAFE_SINGLE, CheckpointError, atomic_save_file,
                                          atomic_write_text, parse_dtype, parse_size, read_json)

__all__ = ["TensorInfo", "scan_weights", "read_tensors", "stream_convert", "check_output_dir", "staged_output"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: ``file`` (absolute path), ``shape``, ``dtype``."""

    file: str
    shape: tuple
    dtype: torch.dtype


def _weight_files(dirpath: str) -> list[str]:
    """The weight files a directory's index names (each must exist), or its single weight file."""
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(dirpath, index)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no weight_map")
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(dirpath, f))]
            if missing:
                raise CheckpointError(f"{index_path} names shard(s) that are missing: {missing[:4]}; download "
                                      "every shard of the checkpoint")
            return [os.path.join(dirpath, f) for f in files]
        if os.path.isfile(os.path.join(dirpath, single)):
            return [os.path.join(dirpath, single)]
    raise CheckpointError(f"{dirpath} has no {SAFE_SINGLE}, {SAFE_INDEX}, pytorch_model.bin or its index")


def _torch_load(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return sd


def scan_weights(dirpath: str) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in a directory's weight files, without reading the data.

    Raises:
        CheckpointError: no weight files, a shard named by the index that is missing, an unreadable file, a
            tensor in two files, a file that does not match the SHA-256 the directory records
            (:func:`llada_scale.checkpoint.integrity.verify_source`).
    """
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    files = _weight_files(dirpath)
    verify_source("dir", dirpath)
    for f in files:
        if f.endswith(".safetensors"):
            try:
                with safe_open(f, framework="pt", device="cpu") as fh:
                    items = [(k, tuple(fh.get_slice(k).get_shape()), _ST_DTYPES.get(fh.get_slice(k).get_dtype()))
                             for k in fh.keys()]
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read {f}: {type(e).__name__}: {e}") from None
        else:
            items = [(k, tuple(v.shape), v.dtype) for k, v in _torch_load(f).items() if torch.is_tensor(v)]
        for k, shape, dtype in items:
            if k in out:
                raise CheckpointError(f"tensor {k} appears in both {out[k].file} and {f}")
            out[k] = TensorInfo(f, shape, dtype)
    return out


def _read_file(path: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as fh:
            for k in keys:
                yield k, fh.get_tensor(k)
    else:
        sd = _torch_load(path)
        for k in keys:
            yield k, sd[k]


def read_tensors(tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every entry of ``tensors``, one file open at a time, one tensor in memory."""
    by_file: dict[str, list[str]] = {}
    for k, info in tensors.items():
        by_file.setdefault(info.file, []).append(k)
    for path, keys in by_file.items():
        yield from _read_file(path, keys)


def stream_convert(tensors: dict[str, TensorInfo], rename: Callable[[str], str | None], expected: dict[str, tuple],
                   out_dir: str, *, dtype: str | torch.dtype | None, max_shard_size: str | int = "5GB",
                   metadata: dict[str, str] | None = None, progress: bool = True, source: str = "checkpoint",
                   target: str = "config") -> list[str]:
    """Write the tensors of a checkpoint under new names as safetensors shards in ``out_dir``.

    Args:
        tensors: from :func:`scan_weights`.
        rename: source name -> output name, or None to drop the tensor (e.g. ``rotary_emb.inv_freq``).
        expected: output name -> shape; every output tensor must be here with this shape and every entry must
            be produced (checked from the headers before anything is read or written).
        dtype: cast floating tensors (None keeps each tensor's dtype).
        max_shard_size: bytes per output file; HF-style ``model-0000i-of-0000n.safetensors`` +
            ``model.safetensors.index.json`` above it, else one ``model.safetensors``.
        metadata: safetensors header entries (``{"format": "pt"}`` is always set).

    Returns:
        The output file names. Input files are read in order, one tensor at a time; an output shard is written
        (temporary name, then rename) as soon as it is complete.

    Raises:
        CheckpointError: one line naming missing, unexpected or misshapen tensors (first 4 of each).
    """
    from tqdm.auto import tqdm

    from llada_scale.model.transformer import state_dict_mismatch

    dt = parse_dtype(dtype)
    names = {k: rename(k) for k in tensors}
    mapped = {names[k]: k for k in tensors if names[k] is not None}
    if len(mapped) != sum(v is not None for v in names.values()):
        raise CheckpointError(f"{source}: two tensors map to the same name")
    shapes = {dst: torch.empty(tensors[src].shape, device="meta") for dst, src in mapped.items()}
    problems = state_dict_mismatch(expected, shapes, source, target)
    if problems:
        raise CheckpointError(f"{source} does not fit its {target} ({problems})")
    order = [k for k in tensors if names[k] is not None]  # input-file order: each file is opened once

    def nbytes(k):
        info = tensors[k]
        out_dtype = dt if dt is not None and info.dtype.is_floating_point else info.dtype
        return math.prod(info.shape) * torch.empty((), dtype=out_dtype).element_size()

    limit = parse_size(max_shard_size)
    plan: list[list[str]] = [[]]
    size = total = 0
    for k in order:
        b = nbytes(k)
        if plan[-1] and size + b > limit:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += b
        total += b
    n = len(plan)
    files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {k: i for i, keys in enumerate(plan) for k in keys}
    header = {**(metadata or {}), "format": "pt"}
    bar = tqdm(total=len(order), desc=f"writing {out_dir}", unit="tensor", disable=not progress, leave=False)
    buffer: dict[str, torch.Tensor] = {}
    current = 0
    for k, t in read_tensors({k: tensors[k] for k in order}):
        if dt is not None and t.is_floating_point():
            t = t.to(dt)
        buffer[names[k]] = t.contiguous()
        bar.update(1)
        if len(buffer) == len(plan[current]):
            atomic_save_file(buffer, os.path.join(out_dir, files[current]), header)
            buffer, current = {}, current + 1
    bar.close()
    assert not buffer and current == n, "shard plan and input order disagree"
    if n > 1:
        weight_map = {names[k]: files[shard_of[k]] for k in order}
        atomic_write_text(os.path.join(out_dir, SAFE_INDEX),
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                                     sort_keys=True))
    return files


_OURS = ("model*.safetensors", SAFE_INDEX, SUMS_FILE)  # stale files of our format, replaced by --force


def _wrote_before(out_dir: str) -> bool:
    """True when ``out_dir`` holds a ``SHA256SUMS`` that lists every other file in it (a directory a converter
    wrote and nobody added to since): ``--force`` may then replace it as a whole."""
    try:
        listed = set(read_sums(os.path.join(out_dir, SUMS_FILE)))
    except (OSError, CheckpointError):
        return False
    present = {os.path.relpath(os.path.join(d, f), out_dir) for d, _, fs in os.walk(out_dir) for f in fs}
    return present - {SUMS_FILE} <= listed


def _is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.jsonl"))


def check_output_dir(out_dir: str, force: bool, inputs: tuple = ()) -> None:
    """Refuse an output that would lose data.

    Raises:
        CheckpointError: ``out_dir`` is a file; a non-empty directory without ``force``; a training run
            directory (``checkpoints/`` or ``metrics.jsonl``) or one that contains one; a path that is, or
            contains, one of ``inputs``.
    """
    out = os.path.realpath(out_dir)
    if os.path.isfile(out_dir):
        raise CheckpointError(f"output {out_dir} is a file; give a directory")
    for src in inputs:
        if not src:
            continue
        src = os.path.realpath(os.fspath(src))
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"output {out_dir} is or contains the input {src}; write somewhere else")
    if os.path.isdir(out) and (_is_run_dir(out) or any(_is_run_dir(os.path.join(out, d)) for d in os.listdir(out)
                                                       if os.path.isdir(os.path.join(out, d)))):
        raise CheckpointError(f"output {out_dir} is or contains a training run directory (checkpoints/ or "
                              "metrics.jsonl); write the output somewhere else")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise CheckpointError(f"output directory {out_dir} is not empty; pass --force to replace the files of "
                              "the format written there (other files are kept)")


def _remove_stale(parent: str, name: str) -> None:
    """Remove ``.<name>.tmp-<host>-<pid>-*`` / ``.old-`` siblings left by a killed run of a converter on this
    host (its process is gone); directories of a running process or another host are left alone."""

    def pid_running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    host = socket.gethostname()
    for d in os.listdir(parent):
        for kind in (".tmp-", ".old-"):
            prefix = f".{name}{kind}{host}-"
            if d.startswith(prefix):
                pid = d[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not pid_running(int(pid)):
                    shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def _merge_into(tmp: str, out_dir: str) -> None:
    """Move the files of ``tmp`` into the existing foreign directory ``out_dir``: our format's stale files
    there (``model*.safetensors``, the index, ``SHA256SUMS``) and the files of the same names are replaced,
    everything else is kept."""
    import fnmatch

    for f in os.listdir(out_dir):
        if any(fnmatch.fnmatch(f, pat) for pat in _OURS) and os.path.isfile(os.path.join(out_dir, f)) \
                and not os.path.exists(os.path.join(tmp, f)):
            os.unlink(os.path.join(out_dir, f))
    for d, _, fs in os.walk(tmp):
        rel = os.path.relpath(d, tmp)
        os.makedirs(os.path.join(out_dir, rel), exist_ok=True)
        for f in sorted(fs, key=lambda f: f == SUMS_FILE):  # the manifest last
            os.replace(os.path.join(d, f), os.path.join(out_dir, rel, f))
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out_dir: str, force: bool, inputs: tuple = ()) -> Iterator[str]:
    """Yield a temporary sibling directory of ``out_dir`` to write into; on success it becomes ``out_dir``.

    Before the rename, ``SHA256SUMS`` (every file's SHA-256, :mod:`llada_scale.checkpoint.integrity`) is written
    into it. On any exception the temporary directory is deleted and ``out_dir`` is left as it was; temporary
    directories of killed runs (``.<name>.tmp-<host>-<pid>-*``) are removed by the next run. With ``force``, an
    existing ``out_dir`` that this tool wrote before (its ``SHA256SUMS`` lists every file in it) is replaced
    as a whole; any other non-empty ``out_dir`` keeps its files, except the files of our format (weights,
    index, manifest and the names written now), which are replaced.

    Raises:
        CheckpointError: see :func:`check_output_dir`.
    """
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, force, inputs)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        write_sums(tmp)
        if os.path.isdir(out_dir) and os.listdir(out_dir) and not _wrote_before(out_dir):
            _merge_into(tmp, out_dir)
            return
        old = None
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{socket.gethostname()}-{os.getpid()}-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
