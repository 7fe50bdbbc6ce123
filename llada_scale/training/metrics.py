"""Throughput, model-FLOPs utilisation (MFU) and the run logger (console, metrics.jsonl, wandb).

MFU = model FLOPs per second per device / the device's peak FLOP/s (PaLM, Chowdhery et al. 2022, App. B), with
the FLOPs counted from the positions each micro batch actually processed (:class:`FlopCounter`).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import torch

from llada_scale.training.config import ConfigError, RunConfig

log = logging.getLogger("llada_scale")

# Dense (no sparsity) bf16 tensor-core peak of one GPU, FLOP/s, from the vendors' datasheets (which quote the
# sparse figure, twice these): NVIDIA H100 Tensor Core GPU datasheet (SXM 989.4 TFLOP/s, NVL 835.5, PCIe 756),
# H800 (as H100: SXM 989.4, PCIe 756), H200 datasheet (989.4, the H100 SXM compute), A100 datasheet (312, SXM
# and PCIe), HGX B200 (2.25 PFLOP/s per GPU), L40S datasheet (362.05). The first key that the device name
# contains wins, so the PCIe/NVL variants come before the SXM names.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H800 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("H200", 989e12), ("A100", 312e12), ("B200", 2250e12), ("L40S", 362e12))


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 n_layer d_model seq_len (PaLM App. B; forward + backward).

    ``num_params`` counts every weight used in a matmul (all but the input embedding when the head is untied).
    For bidirectional attention the attention term is the same (full L x L scores either way).
    """
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def block_diffusion_attention_density(seq_len: int, block_length: int) -> float:
    """Share of the ``[2L x 2L]`` attention scores the block-diffusion mask keeps for one document of ``seq_len``
    (L) tokens in blocks of ``block_length`` (the last may be shorter); documents only lower it.

    Block k (size s_k, P_k clean tokens before it): its noisy queries see their own noisy block and the clean
    prefix (s_k + P_k keys), its clean queries the clean prefix and their own clean block (P_k + s_k), so
    kept = sum_k 2 s_k (s_k + P_k) of (2L)^2: (n + 1) / (4 n) for n equal blocks (BD3-LM's vectorised training
    mask, Arriola et al. 2025, Sec. 3.2). 0.254 at L 2048 and block 32; FlexAttention runs whole 128 x 128 tiles, so
    the kernel executes a little more (28% of the tiles there, docs/LOG.md issue 21).
    """
    kept, prefix = 0, 0
    for start in range(0, seq_len, block_length):
        size = min(block_length, seq_len - start)
        kept += 2 * size * (size + prefix)
        prefix += size
    return kept / (2 * seq_len) ** 2


class FlopCounter:
    """Model FLOPs of one micro batch from the positions it actually processed (PaLM App. B accounting).

    flops = model_tokens x (6 N_body + 12 n_layer d seq_len) + head_tokens x 6 N_head, where model_tokens are
    the positions the decoder ran on (B x L, or B x 2L for the block-diffusion ``[x_t ; x_0]`` layout, whose
    attention spans 2L: ``seq_len`` is the model's input length) and head_tokens the positions the output head
    ran on (the loss positions only: the head never runs on the clean half or on unmasked tokens). A
    random-length cut keeps the full row (static shapes), so it costs and counts the same as any other batch.

    Args:
        num_params: all parameters; embedding_params: the input embedding; head_params: the output head (equal
            to the embedding when tied: the head is then counted, the embedding lookup is not).
        hidden_size: the attention width, num_heads x head_dim (PaLM's H Q; d_model unless head_dim is set apart).
    """

    def __init__(self, num_params: int, embedding_params: int, head_params: int, num_layers: int, hidden_size: int,
                 tied: bool = False):
        self.body_params = num_params - embedding_params - (0 if tied else head_params)
        self.head_params = head_params
        self.num_layers, self.hidden_size = num_layers, hidden_size

    def per_token(self, seq_len: int) -> float:
        """FLOPs of one position that runs through the decoder and the head (for the start-up log line)."""
        return flops_per_token(self.body_params + self.head_params, self.num_layers, self.hidden_size, seq_len)

    def __call__(self, model_tokens, seq_len: int, head_tokens, attention_density: float = 1.0):
        """FLOPs of micro batches of input length ``seq_len`` (linear in the token counts, so a sum over micro
        batches may be passed); ``model_tokens`` / ``head_tokens`` may be floats or device tensors.
        ``attention_density`` < 1 counts only the attention scores a mask keeps (the executed FLOPs of block
        diffusion: :func:`block_diffusion_attention_density`); 1 = PaLM's convention, every score of seq_len."""
        body = 6.0 * self.body_params + 12.0 * self.num_layers * self.hidden_size * seq_len * attention_density
        return model_tokens * body + head_tokens * (6.0 * self.head_params)


def peak_flops_for(device_name: str) -> float | None:
    """Datasheet dense bf16 peak (:data:`PEAK_FLOPS`) of a GPU named ``device_name``, or None if unknown."""
    return next((v for k, v in PEAK_FLOPS if k in device_name), None)


def device_peak_flops(override: float = 0.0, device: torch.device | str = "cpu") -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where it comes from: ``(peak or None, explanation)``.

    ``override`` (``train.peak_flops``) if > 0; on CUDA the datasheet peak of a known GPU; otherwise None with
    the reason, and the trainer logs tokens/s without MFU. CPUs have no such figure: a matmul measured at
    start-up depends on what else the machine runs (it gave MFU above 100% on a busy machine), so CPU MFU is
    reported only against an explicit ``train.peak_flops``.
    """
    if override > 0:
        return override, f"train.peak_flops = {override / 1e12:g} TFLOP/s"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak_flops_for(name)
        if peak is None:
            return None, f"no datasheet bf16 peak for {name!r}; set train.peak_flops (FLOP/s) to log MFU"
        return peak, f"{name}: {peak / 1e12:g} TFLOP/s dense bf16 (datasheet)"
    return None, "CPU: no fixed peak; set train.peak_flops (FLOP/s) to log MFU"


def throughput(tokens: float, flops: float, seconds: float, world_size: int, peak_flops: float | None) -> dict:
    """``{"tokens_per_s", "tokens_per_s_per_device", "mfu"}`` of ``tokens`` data tokens and ``flops`` model
    FLOPs processed by all devices together in ``seconds``; mfu is None when the peak is unknown."""
    seconds = max(seconds, 1e-9)
    per_dev = tokens / seconds / world_size
    mfu = flops / seconds / world_size / peak_flops if peak_flops else None
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": per_dev, "mfu": mfu}


def t_bucket_metrics(ce_sum: list[float], count: list[float]) -> tuple[dict, str]:
    """Mean masked-token cross-entropy per noise-level bucket t in [i/n, (i+1)/n), n = len(count).

    ``ce_sum``/``count`` are the window's all-reduced per-bucket sums (nats, token counts). A bucket no row fell
    into is missing from the metrics and shown as ``-`` on the console: a 0.00 would read as a perfect fit.
    Returns ({"train/ce_t0.0-0.2": nats, ...}, "2.31/-/...").
    """
    n = len(count)
    ce = [s / c if c else None for s, c in zip(ce_sum, count)]
    metrics = {f"train/ce_t{i / n:.1f}-{(i + 1) / n:.1f}": v for i, v in enumerate(ce) if v is not None}
    return metrics, "/".join("-" if v is None else f"{v:.2f}" for v in ce)


def append_line(path: Path, line: str, step: int) -> bool:
    """Append ``line`` + newline to ``path`` whole or not at all: one ``write`` on an ``O_APPEND`` descriptor;
    if it fails or writes only part (a full disk), the file is cut back to its previous length, so it never
    ends in a half line. A failure is logged as one warning line (the run goes on; the next checkpoint reports
    a full disk itself) and False is returned."""
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        log.warning(f"cannot open {path} ({e.strerror}): metrics of step {step} not written")
        return False
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, "No space left on device (short write)")
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            log.warning(f"{e.strerror or e} writing {path}: metrics of step {step} not written (the file ends at the "
                        "previous step, intact)")
            return False
    finally:
        os.close(fd)
    return True


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
            append_line(self.metrics_path, json.dumps({"step": step, **metrics}), step)
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
