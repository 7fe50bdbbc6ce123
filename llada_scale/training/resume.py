"""Resuming a run: which checkpoint (never a damaged one, never silently over another run, never silently
instead of ``train.init_from``), a world-size change (universal checkpoint, loader resharding), and restoring
the engine, loader and noise-RNG states saved by :meth:`llada_scale.training.trainer.Trainer.save`.

Client state of a checkpoint (all ranks' states, written by rank 0): ``step``, ``loader`` (list over ranks of
``StatefulDataLoader.state_dict()``), ``rng`` (list over ranks of the noise generator state), ``skipped`` and
``loss_ema`` (the loss guard), ``world_size``, ``config``, ``tokenizer``.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llada_scale.checkpoint import checkpointer
from llada_scale.checkpoint.autoep import universal_command
from llada_scale.training.engine import TrainError

# minutes the other ranks wait for rank 0's universal-checkpoint conversion (LLADA_CONVERT_TIMEOUT_MIN)
CONVERT_TIMEOUT_MIN = float(os.environ.get("LLADA_CONVERT_TIMEOUT_MIN", "240"))

log = logging.getLogger("llada_scale")


def find_resume_dir(mode: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint tag directory to resume from for ``train.resume``.

    ``none``/empty: None. ``auto``: the latest complete checkpoint under ``ckpt_dir`` (None when there is
    none). Anything else: a path resolved by :func:`llada_scale.checkpoint.checkpointer.resolve`.

    Raises:
        TrainError: a given path holds no complete checkpoint.
    """
    if mode in ("none", "", None):
        return None
    if mode == "auto":
        return checkpointer.find_latest(ckpt_dir)
    try:
        return checkpointer.resolve(mode)
    except checkpointer.CheckpointError as e:
        raise TrainError(f"train.resume: {e}") from None


def choose_resume_dir(train_cfg, ckpt_dir: Path, rank: int = 0) -> Path | None:
    """:func:`_choose_resume_dir` on rank 0 (which reads and hashes the checkpoint once), its answer broadcast to
    every rank of an initialised process group (one TrainError on all ranks when it refuses)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return _choose_resume_dir(train_cfg, ckpt_dir, rank)
    box: list = [None]
    if rank == 0:
        try:
            box = [("ok", _choose_resume_dir(train_cfg, ckpt_dir, rank))]
        except TrainError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TrainError(value)
    return value


def _choose_resume_dir(train_cfg, ckpt_dir: Path, rank: int = 0) -> Path | None:
    """The checkpoint a run starts from (None = fresh), with the checks :func:`find_resume_dir` leaves out.

    * ``train.resume=none`` in a run directory that already holds complete checkpoints: refused. Starting
      another run there would interleave both runs' checkpoints; retention and ``--resume auto`` (what a
      requeue does) would then pick the other run's.
    * ``auto`` (or a run / checkpoints directory): the newest checkpoint that :func:`checkpointer.damage`
      finds loadable (sizes, zip directories and every file's SHA-256); damaged newer ones are reported
      (rank 0) and skipped. A given tag directory that is
      damaged is refused.
    * A checkpoint wins over ``train.init_from``: rank 0 says so (see :func:`check_init_from` for the refusal
      when ``--init_from`` was typed on the command line).

    Raises:
        TrainError: the cases above, or a given path that holds no complete checkpoint.
    """
    mode = train_cfg.resume
    if mode in ("none", "", None):
        existing = checkpointer.list_complete(ckpt_dir)
        if existing:
            raise TrainError(f"train.resume=none, but {ckpt_dir} already holds checkpoints of a run (newest "
                             f"{existing[-1].name}); a fresh run there would mix with them. Continue it with "
                             f"train.resume=auto, choose another run_dir, or move {ckpt_dir} away")
        return None
    given_tag = mode != "auto" and checkpointer.is_complete(Path(mode))
    found = find_resume_dir(mode, ckpt_dir)
    if found is None:
        return None
    why = checkpointer.damage(found)
    if why is not None:
        if given_tag:
            raise TrainError(f"train.resume={mode}: the checkpoint is damaged: {why}")
        found, problems = checkpointer.find_usable(found.parent)
        if rank == 0:
            for p in problems:
                log.warning(f"skipping damaged checkpoint {p}")
        if found is None:
            raise TrainError(f"no loadable checkpoint in {ckpt_dir if mode == 'auto' else mode}: "
                             + "; ".join(problems) + "; move the damaged ones away or start another run_dir")
        if rank == 0:
            log.warning(f"resuming from the previous complete checkpoint {found}")
    lora = getattr(getattr(train_cfg, "lora", None), "enabled", False)  # LoRA: init_from is the frozen base
    if rank == 0 and train_cfg.init_from and not lora:
        log.warning(f"train.init_from={train_cfg.init_from} is ignored: the run resumes from its checkpoint {found}")
    return found


def check_init_from(cfg, *, cli_init_from: bool, cli_resume: bool) -> None:
    """Refuse ``--init_from X`` on the command line when ``--resume auto`` would resume a checkpoint instead.

    A requeued job repeats its command line; the recipe's ``train.init_from`` (how the main job's stages
    chain) is simply superseded by the run's own checkpoint and logged by :func:`choose_resume_dir`. But a
    user who types ``--init_from`` into a directory with checkpoints most likely means it, so this asks
    them to say which with an explicit ``--resume``. Reads the file system only (no process group).

    Raises:
        TrainError: ``cli_init_from`` without ``cli_resume`` while ``run_dir/checkpoints`` has a checkpoint.
    """
    t = cfg.train
    lora = getattr(getattr(t, "lora", None), "enabled", False)  # LoRA resumes adapters on top of init_from
    if not (cli_init_from and t.init_from and not cli_resume and t.resume == "auto") or lora:
        return
    latest = checkpointer.find_latest(Path(cfg.run_dir) / "checkpoints")
    if latest is not None:
        raise TrainError(f"--init_from {t.init_from} was given, but {cfg.run_dir} holds checkpoint {latest}, "
                         "which --resume auto would load instead; pass --resume auto to continue that run (init_from "
                         "ignored), or another run_dir / --resume none after moving its checkpoints away")


def prepare_world_size_change(tag_dir: Path | None, ds_cfg: dict, rank: int, world_size: int) -> Path | None:
    """Before ``deepspeed.initialize``: make a checkpoint written by another world size loadable.

    ZeRO stages 1-3 shard the optimizer state by rank, so rank 0 converts the checkpoint once into a
    universal checkpoint (``deepspeed.checkpoint.ds_to_universal --inject_missing_state``) under
    ``checkpoints/universal/<tag>`` (written to ``<tag>.tmp`` and renamed; reused when present) and
    ``ds_cfg["checkpoint"]["load_universal"]`` is set. ZeRO-0 checkpoints hold the whole optimizer state
    and load at any world size as they are. Collective.

    Returns:
        The universal checkpoint directory to load instead of ``tag_dir``, or None (same world size,
        ZeRO-0, or no checkpoint).
    Raises:
        TrainError: unreadable metadata or a failed conversion (the message says how to convert by hand).
    """
    if tag_dir is None:
        return None
    try:
        meta = checkpointer.read_meta(tag_dir)
    except checkpointer.CheckpointError as e:
        raise TrainError(str(e)) from None
    old_world, stage = meta.get("world_size"), meta.get("zero_stage", 0)
    if old_world == world_size or not stage:
        return None
    uni = tag_dir.parent / "universal" / tag_dir.name
    error = None
    if rank == 0 and not uni.is_dir():
        log.info(f"checkpoint {tag_dir} was written by {old_world} ranks, this run has {world_size}: "
                 f"converting it to a universal checkpoint in {uni}")
        tmp = uni.with_name(uni.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = universal_command(str(tag_dir), str(tmp), conversion_workers())
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            error = (f"converting {tag_dir} to a universal checkpoint failed (exit {r.returncode}): "
                     f"{(r.stderr or r.stdout).strip()[-1500:]}\nresume on {old_world} ranks, or run "
                     f"{' '.join(cmd[1:])} yourself and rename the output to {uni}")
        else:
            os.replace(tmp, uni)
            log.info(f"universal checkpoint written in {time.perf_counter() - t0:.1f} s")
    box = [error]
    # also the barrier: the conversion is finished. On a gloo group of its own, with its own timeout: the other
    # ranks wait here for rank 0's conversion (minutes at 8B), which must not run into the NCCL group's timeout
    wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=CONVERT_TIMEOUT_MIN))
    dist.broadcast_object_list(box, src=0, group=wait)
    dist.destroy_process_group(wait)
    if box[0]:
        raise TrainError(box[0])
    ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    return uni


def conversion_workers() -> int:
    """Extract/merge workers of ``ds_to_universal``: half the CPUs this task may run on (its affinity, which SLURM
    sets per task, not the node's ``os.cpu_count()``), 1 to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def check_same_model(tag_dir: Path, model_cfg) -> None:
    """Refuse to resume a checkpoint of another model shape (``attention_backend`` may differ).

    Raises:
        TrainError: naming every differing ModelConfig field (checkpoint vs recipe).
    """
    meta = checkpointer.read_meta(tag_dir)
    saved = meta.get("config", {}).get("model", {})
    mine = model_cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if k in saved and saved[k] != v and k != "attention_backend"}
    if diff:
        raise TrainError(f"checkpoint {tag_dir} is of another model (checkpoint vs recipe: {diff}); "
                         "resume with the recipe it was trained with, or use train.init_from")


def load_loader_state(loader, saved: list, rank: int, world_size: int) -> bool:
    """Restore this rank's loader position; under another layout, reshard it (returns True then).

    ``saved`` is the list over the old run's ranks of ``StatefulDataLoader.state_dict()``. Same layout
    (world size, loader workers, micro batch, seq_len): exact resume. Otherwise every rank derives its
    position from all old positions with :meth:`PackedDataset.load_resharded` (no document repeated or
    skipped mid-shard; see its docstring for the exact guarantee).

    Raises:
        TrainError: the saved states are of other data or mixed layouts.
    """
    from llada_scale.data.loader import LoaderStateError, loader_dataset_states

    dataset = getattr(loader, "dataset", None)
    old = [s for st in saved for s in loader_dataset_states(st)]
    same = len(saved) == world_size and all(dataset.same_layout(s) for s in old) \
        if hasattr(dataset, "same_layout") else True  # PackedDataset or MixtureDataset
    try:
        if same:
            loader.load_state_dict(saved[rank])
            return False
        dataset.load_resharded(old)
    except LoaderStateError as e:
        raise TrainError(f"cannot resume the data loader: {e}") from None
    return True


def restore(engine, loader, generator: torch.Generator, tag_dir: Path, universal_dir: Path | None, *,
            model_cfg, seed: int, rank: int, world_size: int, strict: bool = True) -> dict:
    """Load a checkpoint into ``engine``, ``loader`` and the noise ``generator``; collective.

    ``strict=False`` accepts module states without the frozen parameters (LoRA checkpoints hold only the
    adapters). A rank the old run did not have gets its own noise stream, distinct per rank and resume step. The
    universal copy (``universal_dir``, from :func:`prepare_world_size_change`) is deleted once every rank
    has read it.

    Returns:
        The checkpoint's client state (see the module docstring).
    Raises:
        TrainError: another model shape, a checkpoint DeepSpeed cannot load, an unusable loader state.
    """
    check_same_model(tag_dir, model_cfg)
    src = universal_dir or tag_dir
    try:
        load_path, client = engine.load_checkpoint(str(src.parent), tag=src.name, load_module_strict=strict)
    except (RuntimeError, OSError, EOFError, AssertionError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TrainError(f"cannot load checkpoint {src} ({type(e).__name__}: {first}); if it is damaged, move it "
                         "away and resume from the previous one") from None
    if load_path is None:
        raise TrainError(f"DeepSpeed could not load {src}")
    step = client["step"]
    old_world = len(client["rng"])
    resharded = load_loader_state(loader, client["loader"], rank, world_size)
    if rank < old_world:
        state = client["rng"][rank]
        generator.set_state(state.to(generator.device) if generator.device.type != "cuda" else state)
    else:
        generator.manual_seed(seed * 1000 + rank + 1_000_003 * step)
    if universal_dir is not None:
        dist.barrier()  # every rank has read it: the converted copy is no longer needed
        if rank == 0:
            shutil.rmtree(universal_dir, ignore_errors=True)
            (universal_dir.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's
            try:
                universal_dir.parent.rmdir()  # checkpoints/universal, when now empty
            except OSError:
                pass
    if rank == 0:
        how = f" (written by {old_world} ranks, now {world_size}: " \
              f"{'universal checkpoint, ' if universal_dir else ''}" \
              f"{'loader resharded' if resharded else 'loader state as saved'})" if old_world != world_size else ""
        log.info(f"resumed from {tag_dir} at step {step}{how}")
    return client
