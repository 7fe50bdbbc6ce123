"""Stop signals (SLURM preemption, time limits, launchers, Ctrl-C): record them, never die of them.

Exit code contract with ``slurm/launch.sh``: :data:`PREEMPTED_EXIT` means every rank saved a complete
checkpoint after a stop signal and the job should be requeued; :data:`INTERRUPTED_EXIT` (Ctrl-C) means the
same checkpoint was written but the user asked to stop, so nothing requeues.

Which signals stop a run (every rank agrees on the step, saves, exits; see ``Trainer.train_step``):

* SIGUSR1, SIGTERM: SLURM's ``--signal``, ``scancel``, preemption, ``kill``; also what ``torchrun`` and the
  ``deepspeed`` launcher send their workers when they are told to stop.
* SIGINT (Ctrl-C): the same, with exit status 130; a second Ctrl-C exits at once without a checkpoint.
* SIGHUP (the terminal went away), unless it was ignored at start (``nohup``).
* The launcher process dying: a rank started by ``torchrun`` or by the ``deepspeed`` launcher checks once a
  second that its launcher (for ``deepspeed``: ``deepspeed.launcher.launch`` and the ``deepspeed`` command
  above it) is still there; both die of a signal they do not handle (torchrun of SIGUSR1, the ``deepspeed``
  command of SIGTERM/SIGUSR1) and would leave the ranks training as orphans. It counts as SIGHUP.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM/SIGHUP after a complete checkpoint; launch.sh requeues
INTERRUPTED_EXIT = 130  # 128 + SIGINT: stopped by Ctrl-C after a complete checkpoint
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LAUNCHER_POLL_S = 1.0
signal_seen = 0  # a stop signal taken by the watch_stop_signals thread (read by Trainer.train_step)
_interrupts = 0  # Ctrl-Cs so far

_watch: dict = {}  # thread, stop event, handled signals, watched launcher processes


def exit_code(signum: int) -> int:
    """Exit status after a checkpoint forced by ``signum``: 130 for SIGINT, else :data:`PREEMPTED_EXIT`."""
    return INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


def describe(signum: int) -> str:
    """``"SIGUSR1"``; SIGHUP also names the launcher case."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "?"
    return name + (": the terminal or the launcher went away" if signum == signal.SIGHUP else "")


def _note_signal(signum, frame=None):
    global signal_seen, _interrupts
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            print("second Ctrl-C: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT)
        print("Ctrl-C: checkpointing at the next step boundary, then stopping (Ctrl-C again: exit at once)",
              file=sys.stderr, flush=True)
    signal_seen = max(signal_seen, signum)  # SIGHUP 1 < SIGINT 2 < SIGUSR1 10 < SIGTERM 15


def _parent_of(pid: int) -> int | None:
    """Parent pid of ``pid`` from /proc (None when the process is gone or /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int | None) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain() -> list[tuple[int, int]]:
    """``(pid, parent pid)`` pairs that must stay as they are while this rank runs under a launcher.

    Under ``torchrun`` (``TORCHELASTIC_RUN_ID`` set): this process and its parent, the agent. Under the
    ``deepspeed`` launcher: this process and ``deepspeed.launcher.launch``, plus that one and the ``deepspeed``
    command above it. Empty otherwise (a plain ``python``, ``srun`` or a test harness: nothing to watch).
    """
    me, parent = os.getpid(), os.getppid()
    cmd = _cmdline(parent)
    if "deepspeed.launcher.launch" in cmd:
        chain = [(me, parent)]
        grand = _parent_of(parent)
        if grand and "deepspeed" in _cmdline(grand):
            chain.append((parent, grand))
        return chain
    if os.environ.get("TORCHELASTIC_RUN_ID") or "torchrun" in cmd or "torch.distributed.run" in cmd:
        return [(me, parent)]
    return []


def launcher_gone(chain: list[tuple[int, int]]) -> bool:
    """True when a process of :func:`launcher_chain` has died (its child was re-parented)."""
    return any(_parent_of(pid) != parent for pid, parent in chain)


def watch_stop_signals(watch_launcher: bool = True) -> None:
    """Block the stop signals in this process and take them on one daemon thread (``sigtimedwait``).

    SLURM delivers a job-step signal (srun forwarding it, ``scancel --signal``, the time limit) to EVERY
    process of the step, children included. Data loader workers, DeepSpeed's ninja op builds, the wandb
    service or compile workers would die of SIGUSR1 (default action: terminate) or SIGTERM and take the
    run down before it could checkpoint. A blocked signal stays blocked in every thread and child process
    started afterwards (fork and exec keep the mask), so they ignore it, while this process records it in
    ``signal_seen`` for the all-reduce in ``train_step``. The same thread polls the launcher (see the module
    docstring) once a second. Call first thing, before threads exist; :func:`stop_watching` undoes it.
    """
    if _watch:
        return
    handled = [s for s in STOP_SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)]
    for s in handled:
        signal.signal(s, _note_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    stop = threading.Event()
    chain = launcher_chain() if watch_launcher else []

    def wait_loop():
        watched = list(chain)
        while not stop.is_set():
            info = signal.sigtimedwait(handled, LAUNCHER_POLL_S)
            if stop.is_set():
                return
            if info is not None:
                _note_signal(info.si_signo)
            elif watched and launcher_gone(watched):
                print(f"the launcher (pid {watched[-1][1]}) is gone: checkpointing at the next step boundary, "
                      "then stopping", file=sys.stderr, flush=True)
                watched = []
                _note_signal(signal.SIGHUP)

    thread = threading.Thread(target=wait_loop, name="llada-stop-signals", daemon=True)
    _watch.update(thread=thread, stop=stop, handled=handled)
    thread.start()


def stop_watching() -> None:
    """End the :func:`watch_stop_signals` thread and give the signals back their default actions.

    Called by ``Trainer.close`` once training is over, so that a signal during teardown (or a hung exit)
    ends the process as it normally would. No-op when nothing is being watched.
    """
    if not _watch:
        return
    thread, stop, handled = _watch.pop("thread"), _watch.pop("stop"), _watch.pop("handled")
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        signal.pthread_kill(thread.ident, signal.SIGUSR1)  # wakes sigtimedwait at once (still blocked there)
        thread.join(timeout=2 * LAUNCHER_POLL_S)
    if threading.current_thread() is threading.main_thread():
        for s in handled:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)


def close_loader(loader, timeout: float = 5.0) -> None:
    """Stop the worker processes of a (Stateful)DataLoader now, killing any that do not exit.

    Why this is needed: ``StatefulDataLoader`` keeps its iterator (for ``state_dict()``), so the workers are
    never shut down before interpreter exit, where the loader skips its own shutdown and multiprocessing's
    exit handler ``terminate()``s the daemon workers with SIGTERM -- which they ignore, having inherited the
    blocked stop signals of :func:`watch_stop_signals` -- and then joins them forever. Here the loader's own
    shutdown runs while the interpreter is alive (workers exit at once), and a worker still alive after
    ``timeout`` seconds gets SIGKILL. No-op without workers or before the first ``iter``.
    """
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    workers = list(getattr(it, "_workers", []) or [])
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        w.join(timeout)
        if w.is_alive():
            w.kill()
            w.join(timeout)
    loader._iterator = None
