"""Argument checks of the generation and likelihood entry points (:class:`llada_scale.api.Model`, ``tools/chat.py``,
the lm-eval model of :mod:`llada_scale.eval.harness`), in one place: types, ranges, NaN/inf, text that is not
valid Unicode, and sizes that cannot fit in memory, each refused with one-line ``ValueError`` before anything is
tokenised or allocated.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

__all__ = ["check_int", "check_float", "check_text", "check_messages", "check_generation", "check_likelihood",
           "check_fits", "available_bytes"]


def check_int(name: str, value, *, low: int | None = None, high: int | None = None, optional: bool = False):
    """``value`` as an int (bools and non-integral numbers refused); None passes when ``optional``.

    Raises:
        ValueError: ``"<name> must be an integer >= low, got <value>"``.
    """
    if value is None and optional:
        return None
    rng = f" >= {low}" if low is not None else ""
    rng += f" and <= {high}" if high is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{rng}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{rng}, got {value}")
    return int(value)


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); None passes through
    when ``optional``.

    Raises:
        ValueError: a non-number, NaN, +-inf or a value outside the range, naming ``name``.
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}, got {v:g}")
    return v


def check_text(name: str, text) -> str:
    """``text`` if it is a str that is valid Unicode (encodable as UTF-8: no lone surrogates, which is what
    undecodable bytes become under ``surrogateescape``).

    Raises:
        ValueError: not a str, or naming the position of the first lone surrogate.
    """
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}, e.g. from bytes that are not UTF-8); fix the encoding of the input") from None
    return text


def check_messages(messages) -> list[dict]:
    """A chat: a non-empty list of ``{"role": "system"|"user"|"assistant", "content": str}``.

    Raises:
        ValueError: naming the first malformed message.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] must be a dict with role system, user or assistant, got {m!r:.80}")
        check_text(f"messages[{i}]['content']", m.get("content"))
    return list(messages)


def check_generation(*, gen_length, steps, block_length, temperature, cfg_scale, threshold, repetition_penalty,
                     seed, batch_size) -> dict:
    """Check the sampling arguments of :meth:`llada_scale.api.Model.generate`; returns them typed.

    ``steps``, ``block_length`` and ``threshold`` may be None (their defaults: the sampler's own) but not 0; ``steps`` may not exceed
    ``gen_length`` (a step commits at least one token: more steps than tokens would be silently capped).

    Raises:
        ValueError: one line naming the argument, its value and the valid range.
    """
    gen_length = check_int("gen_length", gen_length, low=1)
    return dict(
        gen_length=gen_length,
        steps=check_int("steps", steps, low=1, high=gen_length, optional=True),
        block_length=check_int("block_length", block_length, low=1, optional=True),
        temperature=check_float("temperature", temperature, low=0),
        cfg_scale=check_float("cfg_scale", cfg_scale, low=0),
        threshold=check_float("threshold", threshold, low=0, high=1, low_open=True, optional=True),
        repetition_penalty=check_float("repetition_penalty", repetition_penalty, low=0, low_open=True),
        seed=check_int("seed", seed),
        batch_size=check_int("batch_size", batch_size, low=1),
    )


def check_likelihood(*, mc_samples, batch_size, cfg_scale, seed) -> dict:
    """Check the arguments of :meth:`llada_scale.api.Model.log_likelihood`; returns them typed.

    Raises:
        ValueError: one line naming the argument.
    """
    return dict(mc_samples=check_int("mc_samples", mc_samples, low=1), batch_size=check_int("batch_size", batch_size,
                                                                                             low=1),
                cfg_scale=check_float("cfg_scale", cfg_scale, low=0), seed=check_int("seed", seed))


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable of
    /proc/meminfo), or None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def check_fits(config, rows: int, length: int, device: torch.device, what: str) -> None:
    """Refuse a forward over ``rows`` x ``length`` positions whose activations cannot fit in the free memory.

    The estimate is a lower bound: float32 logits (rows x length x vocab, twice: logits and their softmax)
    plus the key/value cache and one layer's activations (rows x length x hidden x 8 values) in the model's
    dtype. A forward that passes may still run out of memory; one that fails certainly would.

    Raises:
        ValueError: naming the estimate, the free memory and what to lower.
    """
    free = available_bytes(device)
    if free is None:
        return
    elem = 2 if device.type == "cuda" else 4
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem
    need = rows * length * (2 * 4 * config.vocab_size + kv + 8 * config.hidden_size * elem)
    if need > free:
        raise ValueError(f"{what}: {rows} rows x {length} positions need at least {need / 2**30:.1f} GiB on "
                         f"{device.type}, {free / 2**30:.1f} GiB is free; lower batch_size or the length")
