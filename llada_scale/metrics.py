"""Throughput and model-FLOPs utilisation (MFU).

MFU = model FLOPs per token x tokens/s / peak FLOP/s of the devices (PaLM, Chowdhery et al. 2022, App. B).
"""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks per device, FLOP/s (vendor datasheets, SXM parts).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 n_layer d_model seq_len (PaLM App. B; forward + backward).

    ``num_params`` counts every weight used in a matmul (all but the input embedding when the head is untied).
    For bidirectional attention the attention term is the same (full L x L scores either way).
    """
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def device_peak_flops(override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``override`` if > 0, else looked up from the CUDA device name, else None."""
    if override > 0:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


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
