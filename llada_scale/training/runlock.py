"""One trainer per run directory: an advisory lock on ``<run_dir>/.lock`` held by global rank 0 for the life of
the run.

The lock is ``fcntl.flock`` (exclusive, non-blocking) on an open file; the kernel drops it when the process
ends however it ends (crash, ``kill -9``, preemption), so a requeued job is never blocked by its predecessor.
The holder writes ``host pid start-time`` into the file, which a refused second trainer quotes. On NFS (Linux
>= 2.6.12 emulates flock with POSIX byte-range locks, served by NLM on v3 and by the server on v4) the lock
holds across nodes; on Lustre it needs the ``flock`` mount option (``localflock`` only locks within one node)
and GPFS supports it natively (see docs/SLURM.md).

Holding the lock, rank 0 also removes what killed runs of the trainer left behind: ``checkpoints/*.tmp`` staging
directories of interrupted saves (no other trainer can be writing one).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

import torch.distributed as dist

from llada_scale.training.engine import TrainError

__all__ = ["LOCK_FILE", "RunLock", "hold"]

LOCK_FILE = ".lock"
log = logging.getLogger("llada_scale")


class RunLock:
    """The held lock of one run directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self):
        self.release()


def acquire(run_dir: str | Path) -> RunLock:
    """Take the lock of ``run_dir`` (created if missing) for this process.

    Raises:
        TrainError: another process holds it (the message names its host and PID from the lock file), or the
            file system refuses locks (the message says how to run without a shared lock).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"host {holder[0]}, PID {holder[1]}" if len(holder) >= 2 else "an unknown process"
            since = f", since {holder[2]}" if len(holder) >= 3 else ""
            raise TrainError(f"another trainer is running in {run_dir} ({who}{since}; it holds {path}); wait for it "
                             "to end, stop it, or use another run_dir") from None
        raise TrainError(f"cannot lock {path} ({e.strerror}); the file system of run_dir does not support flock "
                         "(on Lustre mount with -o flock; see docs/SLURM.md)") from None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {stamp}\n".encode(), 0)
    return RunLock(run_dir, fd)


def _remove_stale_saves(ckpt_dir: Path) -> None:
    if not ckpt_dir.is_dir():
        return
    for d in ckpt_dir.iterdir():
        if d.is_dir() and d.name.endswith(".tmp"):
            log.info(f"removing {d}, left by an interrupted save")
            shutil.rmtree(d, ignore_errors=True)


def hold(run_dir: str | Path, rank: int) -> RunLock | None:
    """Collective: rank 0 takes the lock of ``run_dir`` and cleans stale staging directories; every rank raises
    the same TrainError when the lock is taken (so a second trainer exits 2 on all ranks before it writes
    anything). Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = acquire(run_dir)
            _remove_stale_saves(Path(run_dir) / "checkpoints")
        except TrainError as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainError(error)
    return lock
