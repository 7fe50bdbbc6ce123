"""Training checkpoints on top of DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

Layout of a run directory::

    runs/<name>/checkpoints/latest            # text: tag of the newest complete checkpoint
    runs/<name>/checkpoints/step00000100/     # DeepSpeed tag directory (model, ZeRO optimizer shards)
    runs/<name>/checkpoints/step00000100/llada_scale.json   # our metadata, written last

A checkpoint is written under ``<tag>.tmp``; only after every rank has finished does rank 0 write
``llada_scale.json`` into it, rename it to ``<tag>`` and update ``latest``. A directory without the metadata
file is therefore never complete, and a crash mid-save never becomes the latest checkpoint. The metadata also
lists every file of the checkpoint with its size (``files``) and its SHA-256 (``sha256``, computed from the bytes
on disk before the rename that publishes the checkpoint), so that a checkpoint damaged afterwards (a file deleted,
truncated or with a flipped byte) is recognised before DeepSpeed tries to load it (:func:`damage`), and resuming
falls back to the previous intact one (:func:`find_usable`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch.distributed as dist

from llada_scale.checkpoint import integrity
from llada_scale.checkpoint.files import META_FILE, CheckpointError, atomic_write_text

_TAG = re.compile(r"^step(\d{8})$")
log = logging.getLogger("llada_scale")


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step ``step``: ``step00000100``."""
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    """True when ``tag_dir`` holds the metadata file written last by :func:`save`."""
    return (tag_dir / META_FILE).is_file()


def list_complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete tag directories under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda p: int(_TAG.match(p.name).group(1)))


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under ``ckpt_dir`` (``latest`` if it names a complete one), or None."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag_dir = ckpt_dir / latest.read_text().strip()
        if is_complete(tag_dir):
            return tag_dir
    done = list_complete(ckpt_dir)
    return done[-1] if done else None


def damage(tag_dir: str | Path, verify: bool | None = None) -> str | None:
    """Why the complete checkpoint ``tag_dir`` cannot be loaded, or None when it looks loadable.

    Checks: the metadata is readable; every file it lists (``files``: relative path -> bytes, written by
    :func:`save`) exists with that size; without that list (older checkpoints), a ``*model_states.pt`` file
    exists; every ``.pt`` file opens as a zip archive (``torch.save``'s format; a truncated file has no central
    directory); and, with ``verify`` (default: unless ``LLADA_SCALE_VERIFY=0``), every file matches its
    SHA-256 (``sha256``, checkpoints written before digests were recorded have none): this reads the whole
    checkpoint once (:func:`llada_scale.checkpoint.integrity.check_digests`).
    """
    tag_dir = Path(tag_dir)
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as e:
        return str(e)
    files = meta.get("files")
    if isinstance(files, dict):
        for rel, size in files.items():
            f = tag_dir / rel
            if not f.is_file():
                return f"{f} is missing"
            if (actual := f.stat().st_size) != size:
                return f"{f} has {actual} bytes, {size} were written (truncated or replaced)"
    elif not any(tag_dir.rglob("*model_states.pt")):
        return f"{tag_dir} holds no *model_states.pt file"
    for f in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{f} is not a readable torch file ({e})"
    digests = meta.get("sha256")
    if isinstance(digests, dict) and (integrity.verification_enabled() if verify is None else verify):
        return integrity.check_digests(str(tag_dir), digests, str(tag_dir / META_FILE))
    return None


def find_usable(ckpt_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``ckpt_dir`` that :func:`damage` finds loadable.

    Returns ``(tag_dir or None, problems)`` where ``problems`` lists the newer checkpoints skipped and why
    (``"PATH: reason"``), for the caller to report.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = find_latest(ckpt_dir)
    candidates = ([latest] if latest else []) + [p for p in reversed(list_complete(ckpt_dir)) if p != latest]
    problems = []
    for tag_dir in candidates:
        why = damage(tag_dir)
        if why is None:
            return tag_dir, problems
        problems.append(f"{tag_dir}: {why}")
    return None, problems


def resolve(path: str | Path) -> Path:
    """Turn a run dir, a checkpoints dir or a tag dir into a complete tag directory.

    Raises:
        CheckpointError: the path does not exist or holds no complete checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if is_complete(p):
        return p
    for candidate in (p, p / "checkpoints"):
        found = find_latest(candidate)
        if found is not None:
            return found
    raise CheckpointError(f"{p} holds no complete checkpoint (a tag directory with {META_FILE}); "
                          "pass a run directory, its checkpoints/ directory or a step######## directory")


def read_meta(tag_dir: str | Path) -> dict:
    """The metadata dict written with a checkpoint (step, config, tokenizer, zero_stage, world_size)."""
    path = Path(tag_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {e}") from None


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, meta: dict, keep_last: int = 0,
         exclude_frozen: bool = False) -> Path:
    """Save a complete checkpoint of ``engine`` at ``step``; collective (call on every rank).

    Args:
        client_state: picklable dict stored by DeepSpeed next to the module (loader and RNG states).
        meta: JSON-serialisable metadata, written as ``llada_scale.json`` when the save is complete (with
            ``step``, ``files`` and ``sha256``: the size and SHA-256 of every file of the checkpoint).
        keep_last: keep this many complete checkpoints of steps up to ``step``, the one just written included;
            delete older ones (0 keeps all) once the one just written checks complete. The checkpoint just
            written is never deleted, and checkpoints of
            later steps (another run's, or the future of a run resumed from an earlier step) are left alone.
        exclude_frozen: leave parameters with ``requires_grad=False`` out (LoRA: only the adapters are saved).
    Returns:
        The final tag directory.
    Raises:
        CheckpointError: writing failed on some rank (every rank raises; the message names the directory and,
            for a full disk, says so). The ``.tmp`` directory is removed and the previous checkpoints are intact.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    tmp = ckpt_dir / tmp_tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
    except (RuntimeError, OSError) as e:
        error = _save_error(e, tmp, ckpt_dir)
    _raise_if_any(error, tmp, rank)
    final = ckpt_dir / tag
    if rank == 0:
        try:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            sha = integrity.digests(str(tmp), list(files))
            atomic_write_text(tmp / META_FILE, json.dumps({**meta, "step": step, "files": files, "sha256": sha},
                                                          indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(ckpt_dir / "latest", tag)
        except OSError as e:
            error = _save_error(e, tmp, ckpt_dir)
        if error is None and keep_last > 0 and damage(final, verify=False) is None:
            # `final` is the newest verified checkpoint (its digests were just computed from the bytes on disk);
            # if it no longer even looks complete, nothing older is deleted
            done = [p for p in list_complete(ckpt_dir) if int(_TAG.match(p.name).group(1)) < step]  # never `final`
            for old in done[:max(0, len(done) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    _raise_if_any(error, tmp, rank)
    return final


def _save_error(e: BaseException, tmp: Path, ckpt_dir: Path) -> str:
    """One line for a failed save; a full disk is named as such (torch's zip writer reports it as
    ``[enforce fail at inline_container.cc] . unexpected pos``, without a path)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in text \
        or "No space left" in text
    previous = find_latest(ckpt_dir)
    kept = f"; the previous checkpoint {previous} is intact" if previous else "; no earlier checkpoint exists"
    if full:
        try:
            free = f" ({shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return (f"no space left on device writing checkpoint {tmp}{free}{kept}; free space, lower "
                f"train.keep_last or use another run_dir ({text})")
    return f"writing checkpoint {tmp} failed: {type(e).__name__}: {text}{kept}"


def _raise_if_any(error: str | None, tmp: Path, rank: int) -> None:
    """Collective: every rank raises CheckpointError when any rank failed (else barrier only)."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    r, msg = failed[0]
    raise CheckpointError(msg if r == rank or len(errors) == 1 else f"rank {r}: {msg}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()
