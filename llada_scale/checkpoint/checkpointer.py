"""Training checkpoints on top of DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

Layout of a run directory::

    runs/<name>/checkpoints/latest            # text: tag of the newest complete checkpoint
    runs/<name>/checkpoints/step00000100/     # DeepSpeed tag directory (model, ZeRO optimizer shards)
    runs/<name>/checkpoints/step00000100/llada_scale.json   # our metadata, written last

A checkpoint is written under ``<tag>.tmp``; only after every rank has finished does rank 0 write
``llada_scale.json`` into it, rename it to ``<tag>`` and update ``latest``. A directory without the metadata
file is therefore never complete, and a crash mid-save never becomes the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from llada_scale.checkpoint.files import META_FILE, CheckpointError, atomic_write_text

_TAG = re.compile(r"^step(\d{8})$")


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
        meta: JSON-serialisable metadata, written as ``llada_scale.json`` when the save is complete.
        keep_last: delete older complete checkpoints beyond this many (0 keeps all).
        exclude_frozen: leave parameters with ``requires_grad=False`` out (LoRA: only the adapters are saved).
    Returns:
        The final tag directory.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        atomic_write_text(ckpt_dir / tmp_tag / META_FILE, json.dumps({**meta, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last > 0:
            for old in list_complete(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _barrier():
    if dist.is_initialized():
        dist.barrier()
