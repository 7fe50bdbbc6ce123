"""Stop signals (SLURM preemption and time limits): record them, never die of them.

Exit code contract with ``slurm/launch.sh``: :data:`PREEMPTED_EXIT` means every rank saved a complete
checkpoint after a stop signal and the job should be requeued.
"""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after a complete checkpoint; slurm/launch.sh requeues
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
signal_seen = 0  # a stop signal taken by the watch_stop_signals thread (read by Trainer.train_step)


def _note_signal(signum, frame=None):
    global signal_seen
    signal_seen = signum


def watch_stop_signals() -> None:
    """Block SIGUSR1/SIGTERM in this process and take them on one daemon thread (``sigwait``).

    SLURM delivers a job-step signal (srun forwarding it, ``scancel --signal``, the time limit) to EVERY
    process of the step, children included. Data loader workers, DeepSpeed's ninja op builds, the wandb
    service or compile workers would die of SIGUSR1 (default action: terminate) or SIGTERM and take the
    run down before it could checkpoint. A blocked signal stays blocked in every thread and child process
    started afterwards (fork and exec keep the mask), so they ignore it, while this process records it in
    ``signal_seen`` for the all-reduce in ``train_step``. Call first thing, before threads exist; a Python
    handler also records a signal that reaches a thread started earlier.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, _note_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def wait_loop():
        while True:
            _note_signal(signal.sigwait(STOP_SIGNALS))

    threading.Thread(target=wait_loop, name="llada-stop-signals", daemon=True).start()
