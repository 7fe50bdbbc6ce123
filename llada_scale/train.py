"""Entry point: train an AR or LLaDA diffusion model with DeepSpeed ZeRO (argument parsing, process group,
``Trainer(...).fit()``, exit codes).

Launch with any of::

    deepspeed --num_gpus 2 llada_scale/train.py --deepspeed_config ds_configs/zero2.json --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m llada_scale.train --deepspeed_config ds_configs/zero2.json --config configs/X.yaml
    python -m llada_scale.train --config configs/X.yaml          # one process

Exit codes: 0 done, 2 bad input (one ``error:`` line), 75 (:data:`PREEMPTED_EXIT`) stopped by a signal after a
complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from llada_scale.training.config import ConfigError, load_config  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.signals import PREEMPTED_EXIT, watch_stop_signals  # noqa: E402

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
    args = p.parse_args(argv)
    for flag, key in (("resume", "train.resume"), ("init_from", "train.init_from"), ("run_dir", "run_dir"),
                      ("wandb", "train.wandb")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    """Train; returns 0 (done, or stopped at train.stop_at_step), 2 (bad input / TrainError), or
    :data:`PREEMPTED_EXIT` = 75 when a SIGUSR1/SIGTERM made every rank checkpoint and stop early."""
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
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
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if not type(e).__module__.startswith("llada_scale") and not isinstance(e, FileNotFoundError):
            raise  # a bug or a library failure: keep the traceback
        print(f"error (rank {rank}): {e}", file=sys.stderr)
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
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    from llada_scale.train import PREEMPTED_EXIT as _PREEMPTED  # import as a module so error classes keep
    from llada_scale.train import main as _main  # their module name

    _code = _main()
    if _code == _PREEMPTED:
        # Every rank has just left a barrier: exit now, all within a millisecond, skipping the interpreter's
        # teardown. Otherwise srun --kill-on-bad-exit=1 may see one rank's 75 while another is still tearing
        # down, kill that one, and report 143 instead of 75 (no requeue; slurm/launch.sh copes, but late).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_code)
    sys.exit(_code)
