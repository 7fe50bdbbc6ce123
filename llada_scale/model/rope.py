"""Rotary position embeddings: plain RoPE, YaRN frequency interpolation (the minimind / Nano-LLaDA
convention) and Llama 3.1's frequency scaling, the cos/sin tables and the rotation.

``ModelConfig.rope_scaling`` is validated and normalised here (:func:`normalize_rope_scaling`).
"""

from __future__ import annotations

import math

import torch


_YARN_KEYS = ("type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")
_LLAMA3_KEYS = ("type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def normalize_rope_scaling(rope_scaling) -> dict:
    """Validate a ``ModelConfig.rope_scaling`` dict and return it with all keys of its type filled
    (``_YARN_KEYS`` or ``_LLAMA3_KEYS``).

    Raises:
        ValueError: not a dict, a type other than ``"yarn"`` / ``"llama3"``, an unknown key, a missing
            required key, or an out-of-range value (the message names the key).
    """
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rs = dict(rope_scaling)
    if "rope_type" in rs:  # HF's newer spelling of "type"
        kind = rs.pop("rope_type")
        if rs.get("type", kind) != kind:
            raise ValueError(f"rope_scaling has conflicting type {rs['type']!r} and rope_type {kind!r}")
        rs["type"] = kind
    if rs.get("type") == "llama3":
        return _normalize_llama3(rs)
    if rs.get("type") != "yarn":
        raise ValueError(f"rope_scaling type {rs.get('type')!r} is not supported (yarn, llama3; None = plain RoPE)")
    unknown = sorted(set(rs) - set(_YARN_KEYS))
    if unknown:
        raise ValueError(f"rope_scaling has unsupported key(s) {unknown}; known: {list(_YARN_KEYS)}")
    for key in ("factor", "original_max_position_embeddings"):
        if rs.get(key) is None:
            raise ValueError(f"rope_scaling (yarn) needs {key!r}")
    rs.setdefault("beta_fast", 32.0)
    rs.setdefault("beta_slow", 1.0)
    rs.setdefault("attention_factor", 1.0)
    for key in _YARN_KEYS[1:]:
        v = rs[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"rope_scaling[{key!r}] must be a finite number, got {v!r}")
    orig = rs["original_max_position_embeddings"]
    if orig != int(orig) or orig < 1:
        raise ValueError(f"rope_scaling['original_max_position_embeddings'] must be a positive integer, got {orig}")
    if rs["factor"] < 1:
        raise ValueError(f"rope_scaling['factor'] must be >= 1 (the context extension ratio), got {rs['factor']}")
    if not rs["beta_fast"] > rs["beta_slow"] > 0:
        raise ValueError(f"rope_scaling needs beta_fast > beta_slow > 0, got beta_fast={rs['beta_fast']}, "
                         f"beta_slow={rs['beta_slow']}")
    if rs["attention_factor"] <= 0:
        raise ValueError(f"rope_scaling['attention_factor'] must be > 0, got {rs['attention_factor']}")
    return {"type": "yarn", "factor": float(rs["factor"]), "original_max_position_embeddings": int(orig),
            "beta_fast": float(rs["beta_fast"]), "beta_slow": float(rs["beta_slow"]),
            "attention_factor": float(rs["attention_factor"])}


def _normalize_llama3(rs: dict) -> dict:
    unknown = sorted(set(rs) - set(_LLAMA3_KEYS))
    if unknown:
        raise ValueError(f"rope_scaling (llama3) has unsupported key(s) {unknown}; known: {list(_LLAMA3_KEYS)}")
    for key in _LLAMA3_KEYS[1:]:
        v = rs.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"rope_scaling (llama3) needs a positive number {key!r}, got {v!r}")
    if rs["factor"] < 1 or not rs["high_freq_factor"] > rs["low_freq_factor"]:
        raise ValueError(f"rope_scaling (llama3) needs factor >= 1 and high_freq_factor > low_freq_factor, got {rs}")
    orig = rs["original_max_position_embeddings"]
    if orig != int(orig):
        raise ValueError(f"rope_scaling['original_max_position_embeddings'] must be an integer, got {orig}")
    return {"type": "llama3", "factor": float(rs["factor"]), "low_freq_factor": float(rs["low_freq_factor"]),
            "high_freq_factor": float(rs["high_freq_factor"]), "original_max_position_embeddings": int(orig)}


def llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling of plain-RoPE inverse frequencies (Meta, "The Llama 3 Herd of Models",
    2024, and the ``apply_scaling`` of its reference code; HF ``_compute_llama3_parameters`` is the same).

    With original context L, wavelength lambda = 2 pi / theta_d, l = L / low_freq_factor and
    h = L / high_freq_factor: lambda < h keeps theta_d (high frequencies), lambda > l divides it by ``factor``
    (low frequencies), and in between it blends linearly in r = L / lambda:
    theta'_d = (1 - a) theta_d / factor + a theta_d, a = (r - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    s, lo, hi = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    orig = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    a = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - a) * inv_freq / s + a * inv_freq
    out = torch.where(wavelen > orig / lo, inv_freq / s, inv_freq)
    return torch.where((wavelen <= orig / lo) & (wavelen >= orig / hi), blended, out)


def yarn_correction_range(head_dim: int, theta: float, rope_scaling: dict) -> tuple[int, int]:
    """Ramp bounds ``(low, high)`` over the ``head_dim // 2`` frequency indices, minimind's convention.

    ``d(b) = head_dim * ln(L / (2 pi b)) / (2 ln theta)`` is the index whose wavelength 2 pi / theta_d fits
    ``b`` times into the original context ``L``; low = max(floor(d(beta_fast)), 0),
    high = min(ceil(d(beta_slow)), head_dim // 2 - 1). (HF ``_compute_yarn_parameters`` clamps high to
    ``head_dim - 1`` instead; the two agree whenever ``low <= ceil(d(beta_slow)) <= head_dim // 2 - 1``.)
    """
    orig = rope_scaling["original_max_position_embeddings"]

    def index(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(index(rope_scaling["beta_fast"])), 0)
    high = min(math.ceil(index(rope_scaling["beta_slow"])), head_dim // 2 - 1)
    return low, high


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies [head_dim // 2] (float32) and the cos/sin multiplier.

    Plain RoPE: theta_d = theta^(-2d / head_dim), multiplier 1. Llama 3.1: :func:`llama3_inv_freq`, multiplier 1.

    YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
    arXiv:2309.00071). Sec. 3.2 ("NTK-by-parts" interpolation, which YaRN uses unchanged in Sec. 3.4) gives,
    for scale s = ``factor``, original context L and wavelength lambda_d = 2 pi / theta_d, the ratio
    r(d) = L / lambda_d and

        h(theta_d) = (1 - gamma(r(d))) * theta_d / s + gamma(r(d)) * theta_d,
        gamma(r) = 0 if r < beta_slow, 1 if r > beta_fast, (r - beta_slow) / (beta_fast - beta_slow) otherwise

    (the paper's alpha = beta_slow = 1, beta = beta_fast = 32). The reference implementations (YaRN's own code,
    HF ``_compute_yarn_parameters``, minimind, Nano-LLaDA) instead solve r(d) = beta for the index,
    d(beta) = head_dim * ln(L / (2 pi beta)) / (2 ln theta), round it outward and make the weight linear in the
    index d rather than in r; that is what is computed here:

        ramp_d = clamp((d - low) / max(high - low, 0.001), 0, 1)      # = 1 - gamma, d = 0 .. head_dim/2 - 1
        theta'_d = theta_d * (1 - ramp_d + ramp_d / s)

    with (low, high) from :func:`yarn_correction_range`. cos and sin are multiplied by ``attention_factor``
    (YaRN's attention temperature sqrt(1/t), Sec. 3.4, folded into the tables as the reference code does; the
    paper recommends 0.1 ln(s) + 1, minimind and Nano-LLaDA hard-code 1.0).

    Conventions follow minimind ``model/model_minimind.py::precompute_freqs_cis`` and Nano-LLaDA
    ``scripts/train/diffusion.py::precompute_freqs_cis`` exactly (same float32 operations, the index range
    0..head_dim/2-1, the high clamp, the 0.001 floor), since their checkpoints were trained with them. Unlike
    those functions this one always applies the scaling when ``rope_scaling`` is set; they skip it when their
    table length (``max_position_embeddings``) does not exceed ``original_max_position_embeddings``, which the
    importer (tools/convert_checkpoint.py) resolves by setting ``rope_scaling=None``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if rope_scaling is None:
        return inv_freq, 1.0
    if rope_scaling["type"] == "llama3":
        return llama3_inv_freq(inv_freq, rope_scaling), 1.0
    low, high = yarn_correction_range(head_dim, theta, rope_scaling)
    ramp = (torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / max(high - low, 0.001)
    ramp = ramp.clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp + ramp / rope_scaling["factor"])
    return inv_freq, float(rope_scaling["attention_factor"])


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                   rope_scaling: dict | None = None):
    """Rotary embedding tables (Su et al. 2021, RoFormer eq. 34; HF Llama's rotate-half layout).

    Args:
        position_ids: int64 [B, L] positions (restart at each packed document).
        rope_scaling: ``ModelConfig.rope_scaling`` (None = plain RoPE); frequencies from :func:`rope_inv_freq`.
    Returns:
        cos, sin: [B, 1, L, head_dim] in ``dtype``, to broadcast over heads.
    """
    inv_freq, mscale = rope_inv_freq(head_dim, theta, rope_scaling, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, D]
    cos, sin = emb.cos(), emb.sin()
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, L, D] by the tables from :func:`rotary_cos_sin` (rotate-half convention).

    Computed in float32 whatever the dtypes (pass float32 tables) and cast back to ``x.dtype``, as LLaDA's
    modeling code and our exported remote code rotate: in bf16 the product and sum round again, which moved the
    attention scores of the 8B shape by ~4e-3 relative (issue 21). Returns [B, H, L, D] in ``x.dtype``.
    """
    y = x.float()
    y1, y2 = y.chunk(2, dim=-1)
    return (y * cos.float() + torch.cat([-y2, y1], dim=-1) * sin.float()).to(x.dtype)
