"""Entry point: train an AR or LLaDA diffusion model with DeepSpeed ZeRO (argument parsing, process group,
``Trainer(...).fit()``, exit codes).

Launch with any of::

    deepspeed --num_gpus 2 llada_scale/train.py --deepspeed_config ds_configs/zero2.json --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m llada_scale.train --deepspeed_config ds_configs/zero2.json --config configs/X.yaml
    python -m llada_scale.train --config configs/X.yaml          # one process

Exit codes: 0 done (``train.max_steps``, ``train.stop_at_step`` or early stopping), 2 bad input or a run that
cannot go on (one ``error:`` line: bad config, diverged, disk full, ...), 75 (:data:`PREEMPTED_EXIT`) stopped by
SIGUSR1/SIGTERM/SIGHUP or a vanished launcher after a complete checkpoint, 130 the same after Ctrl-C (SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from llada_scale.training.config import ConfigError, load_config  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.signals import exit_code, watch_stop_signals  # noqa: E402

_PACKAGE_DIR = str(Path(__file__).resolve().parent)

log = logging.getLogger("llada_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train an AR or LLaDA diffusion model with DeepSpeed ZeRO. Positional key=value arguments "
                    "override the recipe (e.g. optim.lr=3e-4 train.max_steps=100 model.preset=30m).")
    p.add_argument("--config", required=True, help="YAML recipe in configs/ (model, data, objective, optim, train)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON from ds_configs/ (ZeRO stage, bf16, offload); 'auto' fields are filled from "
                        "the recipe. Default: ZeRO-0")
    p.add_argument("--resume", default=None,
                   help="auto (latest complete checkpoint of the run, default), none, or a checkpoint directory")
    p.add_argument("--init_from", default=None,
                   help="initialise weights from this checkpoint (run dir, tag dir or safetensors dir), e.g. AR -> diffusion")
    p.add_argument("--run_dir", default=None, help="output directory (default runs/<run_name>)")
    p.add_argument("--wandb", default=None, choices=["auto", "online", "offline", "off"],
                   help="wandb mode (auto: offline without WANDB_API_KEY)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value")
    args = p.parse_intermixed_args(argv)  # options may follow the key=value overrides
    # what the command line (not the recipe) says: --init_from / --resume, or their key=value overrides
    args.cli_init_from = args.init_from is not None or any(o.startswith("train.init_from=") for o in args.overrides)
    args.cli_resume = args.resume is not None or any(o.startswith("train.resume=") for o in args.overrides)
    for flag, key in (("resume", "train.resume"), ("init_from", "train.init_from"), ("run_dir", "run_dir"),
                      ("wandb", "train.wandb")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    return args


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's input or the run's state (exit 2), or None for a
    bug or a library failure (keep the traceback).

    User errors: our own exception classes (ConfigError, TrainError, CheckpointError, ShardError, LoaderError,
    ...), FileNotFoundError, and ValueErrors raised by package code (e.g. ``ModelConfig`` checks). An error
    re-raised from a data-loader worker carries the worker's traceback in its message: only its last line
    (the original message) is kept.
    """
    if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError, KeyError)):
        return None
    frames = traceback.extract_tb(e.__traceback__)
    raised_here = bool(frames) and frames[-1].filename.startswith(_PACKAGE_DIR)
    ours = type(e).__module__.startswith("llada_scale")
    if not (ours or isinstance(e, FileNotFoundError) or (raised_here and isinstance(e, ValueError))):
        return None
    msg = str(e)
    if "Original Traceback" in msg:  # torch DataLoader ExceptionWrapper: "...\nmodule.Class: message"
        last = [x for x in msg.strip().splitlines() if x.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(msg.split("\n")).strip()


def main(argv=None) -> int:
    """Train; returns 0 (done, stopped at train.stop_at_step, or early-stopped), 2 (bad input / TrainError), or
    after a stop signal made every rank checkpoint and stop early: 75 (PREEMPTED_EXIT; SIGUSR1, SIGTERM, SIGHUP or
    a vanished launcher) or 130 (INTERRUPTED_EXIT; Ctrl-C)."""
    watch_stop_signals()  # SLURM may signal any time, start-up included: record, never die of it
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # library deprecation chatter that would otherwise repeat in every log (torchdata 0.11, DeepSpeed 0.19)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.distributed.*deprecated.*")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        from llada_scale.training import resume

        resume.check_init_from(cfg, cli_init_from=args.cli_init_from, cli_resume=args.cli_resume)
    except (ConfigError, RuntimeError) as e:
        msg = user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    rank, _, _ = init_distributed()
    if rank != 0:
        logging.getLogger("llada_scale").setLevel(logging.WARNING)
    trainer = None
    try:
        from llada_scale.training.trainer import Trainer

        trainer = Trainer(cfg, args.deepspeed_config)
        trainer.install_signal_handlers()
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - sorted into one line (exit 2) or a traceback below
        msg = user_error(e)
        if msg is None:
            raise  # a bug or a library failure: keep the traceback
        print(f"error (rank {rank}): {msg}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if rank == 0 and result:
        log.info("final " + " ".join(f"{k}={v}" for k, v in result.items()))
    if result and result.get("preempted"):
        try:
            dist.barrier()  # leave together: srun --kill-on-bad-exit must not kill a rank still finishing
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        return exit_code(result.get("signal", 0))
    return 0


if __name__ == "__main__":
    from llada_scale.train import main as _main  # import as a module so error classes keep their module name

    _code = _main()
    # Leave without the interpreter's teardown, once everything is written and closed (trainer.close: loader
    # workers, logger and wandb, engine.destroy, run lock). (1) Preempted or interrupted: every rank has just left
    # a barrier and exits within a millisecond; otherwise srun --kill-on-bad-exit=1 may see one rank's 75 while
    # another is still tearing down, kill that one, and report 143 instead of 75 (no requeue; slurm/launch.sh
    # copes, but late). (2) Any other end: C++ destructors of DeepSpeed/gloo state at teardown abort now and then
    # ("terminate called without an active exception", exit -6) after a finished ZeRO-3 run: the shared
    # DeepSpeed-on-CPU note measured 3 in 8 without engine.destroy(), and a ZeRO-3 expert-parallel resume did it
    # once in ~20 runs even with it (docs/LOG.md 2026-12-08).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)
