"""Throughput, model-FLOPs utilisation (MFU) and the run logger (console, metrics.jsonl, wandb).

MFU = model FLOPs per token x tokens/s / peak FLOP/s of the devices (PaLM, Chowdhery et al. 2022, App. B).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from llada_scale.training.config import ConfigError, RunConfig

log = logging.getLogger("llada_scale")

# Dense bf16 tensor-core peaks per device, FLOP/s (vendor datasheets, SXM parts).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 n_layer d_model seq_len (PaLM App. B; forward + backward).

    ``num_params`` counts every weight used in a matmul (all but the input embedding when the head is untied).
    For bidirectional attention the attention term is the same (full L x L scores either way).
    """
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def device_peak_flops(override: float = 0.0, device: torch.device | str = "cpu") -> float | None:
    """Peak FLOP/s of one device.

    ``override`` if > 0; on CUDA the datasheet bf16 peak of a known GPU (H100/H200/A100), else None (MFU not
    reported); on CPU the measured fp32 matmul rate of this process's threads (:func:`measure_cpu_flops`), so
    CPU MFU means "share of what a plain matmul reaches here".
    """
    if override > 0:
        return override
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return measure_cpu_flops()


def measure_cpu_flops(n: int = 512, repeats: int = 8) -> float:
    """fp32 FLOP/s of an [n, n] x [n, n] matmul on the current torch CPU threads (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class SpeedMonitor:
    """Tokens/s, tokens/s per device and MFU over the steps since the last :meth:`report`.

    Args:
        flops_per_token: from :func:`flops_per_token`.
        world_size: number of devices.
        peak_flops: per device FLOP/s, or None to report MFU as unknown.
    """

    def __init__(self, flops_per_token: float, world_size: int, peak_flops: float | None):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.reset()

    def reset(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, global_tokens: int):
        """Count ``global_tokens`` tokens processed by all devices together."""
        self.tokens += global_tokens

    def report(self) -> dict:
        """Return ``{"tokens_per_s", "tokens_per_s_per_device", "mfu"}`` (mfu None if peak unknown) and reset."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tps = self.tokens / elapsed
        per_dev = tps / self.world_size
        mfu = per_dev * self.flops_per_token / self.peak_flops if self.peak_flops else None
        self.reset()
        return {"tokens_per_s": tps, "tokens_per_s_per_device": per_dev, "mfu": mfu}

class Logger:
    """Console lines on rank 0 and, when enabled, wandb (offline without an API key)."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.rank = rank
        self.run = None
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        mode = cfg.train.wandb
        if mode not in ("auto", "online", "offline", "off"):
            raise ConfigError(f"train.wandb must be auto, online, offline or off, not {mode!r}")
        if rank != 0 or mode == "off":
            return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run_dir = Path(cfg.run_dir)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb_cache"))
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = run_dir / "wandb_id"
        import wandb

        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.train.wandb_project, name=cfg.run_name, id=run_id, resume="allow",
                              mode=mode, config=cfg.to_dict())

    def log(self, step: int, metrics: dict, line: str | None = None):
        if self.rank != 0:
            return
        if line:
            log.info(line)
        if metrics:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
