"""Checkpoint averaging (LLaDA 2.0's top-k checkpoint merge): a weighted mean of several checkpoints of one
model, written in our consolidated format, and the choice of the k checkpoints with the lowest logged
validation loss of a run.

Every source must record the same model config (and the same tensor names and shapes); a mismatch is refused
by name before anything is written. Consolidated (safetensors) sources are streamed tensor by tensor: each
output tensor is sum_i w_i x source_i[name], computed in float32 from one tensor of each source at a time, and
an output shard is written as soon as it is complete (peak memory ~ one output shard + k tensors). Other
sources (DeepSpeed tags, whose ZeRO shards must be merged first) are loaded one at a time and accumulated into
a float32 state dict (peak ~ 2 models). The output is staged (complete or absent).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

import torch

from llada_scale.checkpoint.convert import _copy_tokenizer, _log, consolidated_config, write_consolidated
from llada_scale.checkpoint.files import (CONFIG_FILE, FORMAT, SAFE_INDEX, SAFE_SINGLE, CheckpointError, atomic_save_file,
                                          atomic_write_text, dtype_name, parse_dtype, parse_size, resolve_dtype)
from llada_scale.checkpoint.checkpointer import read_meta
from llada_scale.checkpoint.streaming import scan_weights, staged_output
from llada_scale.checkpoint.weights import (consolidated_meta, load_model_state, model_config_from_meta,
                                            resolve_checkpoint)

__all__ = ["best_checkpoints", "average_checkpoints"]

_STEP_DIR = re.compile(r"^step(\d+)$")


def best_checkpoints(run_dir: str, k: int) -> list[tuple[str, float]]:
    """The ``k`` checkpoints of ``run_dir`` with the lowest ``val/loss`` logged in ``run_dir/metrics.jsonl`` at
    their step (``checkpoints/stepNNNNNNNN`` directories), as ``[(path, val_loss), ...]``, best first.

    Raises:
        CheckpointError: ``k < 1``, no metrics.jsonl, or fewer than ``k`` checkpoints with a logged validation
            loss (the message says how many there are: save checkpoints at validation steps and keep them,
            ``train.save_every`` a multiple of ``train.val_every`` and ``train.keep_last: 0``).
    """
    if k < 1:
        raise CheckpointError(f"--best_k must be >= 1, got {k}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise CheckpointError(f"{metrics} does not exist; --best_k needs the run directory (with metrics.jsonl)")
    val = {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and isinstance(row.get("val/loss"), (int, float)) and "step" in row:
                val[int(row["step"])] = float(row["val/loss"])  # a resumed run's later value wins
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = {}
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            steps[int(m.group(1))] = os.path.join(ckpt_dir, name)
    scored = sorted((val[s], s) for s in steps if s in val)
    if len(scored) < k:
        raise CheckpointError(f"{run_dir} has {len(scored)} checkpoint(s) with a logged val/loss "
                              f"({len(steps)} checkpoint(s), {len(val)} validation(s)); --best_k {k} needs {k}: "
                              "save at validation steps and keep them (train.keep_last: 0)")
    return [(steps[s], loss) for loss, s in scored[:k]]


def _source_meta(path: str) -> tuple[str, str, dict]:
    kind, resolved = resolve_checkpoint(path)
    if kind == "safetensors":
        return kind, resolved, consolidated_meta(resolved)
    if kind == "deepspeed":
        meta = read_meta(resolved)
        return kind, resolved, {**meta, "model": (meta.get("config") or {}).get("model") or meta.get("model"),
                                "path": resolved}
    return kind, resolved, load_model_state(resolved, progress=False)[1]


def _check_same(metas: list[dict], paths: list[str]) -> None:
    first = metas[0].get("model")
    if not isinstance(first, dict):
        raise CheckpointError(f"{paths[0]} records no model config; cannot check the sources match")
    for m, p in zip(metas[1:], paths[1:]):
        other = m.get("model") or {}
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise CheckpointError(f"{p} has another model config than {paths[0]} "
                                  f"({', '.join(f'{k}: {first.get(k)!r} vs {other.get(k)!r}' for k in diff[:4])}); "
                                  "only checkpoints of the same model can be averaged")


def _stream(tensors: list[dict], weights: list[float], out_dir: str, dtype, max_shard_size, header: dict
            ) -> tuple[list[str], int]:
    """Write the weighted mean of the consolidated sources' tensors (``scan_weights`` dicts) as shards."""
    from safetensors import safe_open

    names = list(tensors[0])
    for i, t in enumerate(tensors[1:], 1):
        bad = sorted(set(names) ^ set(t)) or [n for n in names if t[n].shape != tensors[0][n].shape]
        if bad:
            raise CheckpointError(f"source {i + 1} differs in tensor names or shapes ({', '.join(bad[:4])})")
    dt = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    plan, size = [[]], 0
    for n in names:
        info = tensors[0][n]
        out_dt = dt if info.dtype.is_floating_point else info.dtype
        b = math.prod(info.shape) * torch.empty((), dtype=out_dt).element_size()
        if plan[-1] and size + b > limit:
            plan, size = plan + [[]], 0
        plan[-1].append(n)
        size += b
    files = [SAFE_SINGLE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                                   for i in range(len(plan))]
    count = 0
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def get(src: dict, name: str) -> torch.Tensor:
            f = src[name].file
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            return handles[f].get_tensor(name)

        for shard, keys in zip(files, plan):
            buffer = {}
            for n in keys:
                first = get(tensors[0], n)
                if not first.is_floating_point():  # integer buffers: must agree, kept as they are
                    if any(not torch.equal(first, get(t, n)) for t in tensors[1:]):
                        raise CheckpointError(f"non-float tensor {n} differs between sources")
                    buffer[n] = first
                    continue
                acc = first.float() * weights[0]
                for w, t in zip(weights[1:], tensors[1:]):
                    acc += get(t, n).float() * w
                buffer[n] = acc.to(dt).contiguous()
                count += acc.numel()
            atomic_save_file(buffer, os.path.join(out_dir, shard), header)
    if len(files) > 1:
        weight_map = {n: files[i] for i, keys in enumerate(plan) for n in keys}
        atomic_write_text(os.path.join(out_dir, SAFE_INDEX), json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                         indent=2, sort_keys=True))
    return files, count


def average_checkpoints(checkpoints: list[str], out_dir: str, *, weights: list[float] | None = None,
                        best_k: int | None = None, dtype: str = "auto", max_shard_size: str = "5GB",
                        force: bool = False, quiet: bool = False, tokenizer: str | None = None) -> list[str]:
    """Average checkpoints into a consolidated directory ``out_dir`` (sources: any format we load).

    Args:
        checkpoints: the source checkpoints; with ``best_k`` exactly one run directory instead.
        weights: one weight per source (normalised to sum 1; must be >= 0 with a positive sum); None = uniform.
        best_k: pick the ``best_k`` checkpoints of the run with the lowest logged validation loss
            (:func:`best_checkpoints`), averaged uniformly unless ``weights`` (one per picked checkpoint).
        dtype: ``"auto"`` (default) writes the sources' stored dtype (fp32 when they mix dtypes; the mean itself is
            accumulated in float32), else ``"bf16"|"fp32"|"fp16"``.
        max_shard_size, force, quiet, tokenizer: as the other converters.
    Returns:
        The averaged sources' resolved paths.
    Raises:
        CheckpointError: fewer than 1 source, a weight count or value that does not fit, sources of different
            model configs / tensor names / shapes, a non-empty ``out_dir`` without ``force``.
    """
    if best_k is not None:
        if len(checkpoints) != 1:
            raise CheckpointError(f"--best_k takes one run directory, got {len(checkpoints)} paths")
        picked = best_checkpoints(checkpoints[0], best_k)
        _log("best checkpoints by val/loss: " + ", ".join(f"{os.path.basename(p)} ({v:.4f})" for p, v in picked))
        checkpoints = [p for p, _ in picked]
    if not checkpoints:
        raise CheckpointError("average needs at least one checkpoint")
    weights = [1.0] * len(checkpoints) if weights is None else [float(w) for w in weights]
    if len(weights) != len(checkpoints) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CheckpointError(f"--weights needs {len(checkpoints)} numbers >= 0 with a positive sum, got {weights}")
    weights = [w / sum(weights) for w in weights]
    sources = [_source_meta(p) for p in checkpoints]
    paths = [r for _, r, _ in sources]
    metas = [m for _, _, m in sources]
    _check_same(metas, paths)
    cfg = model_config_from_meta(metas[0], paths[0])
    source = {"path": paths[0], "kind": "average", "averaged": paths, "weights": weights}
    with staged_output(out_dir, force, inputs=tuple(paths)) as tmp:
        tok = _copy_tokenizer(metas[0], tmp, tokenizer)
        if all(kind == "safetensors" for kind, _, _ in sources):
            scans = [scan_weights(p) for p in paths]
            dt, origin = resolve_dtype(dtype, (i.dtype for s in scans for i in s.values()))
            dtype = dtype_name(dt)
            config = consolidated_config(cfg, dtype, tok, None, metas[0].get("config"), source)
            files, n = _stream(scans, weights, tmp, dtype, max_shard_size,
                               {"format": "pt", FORMAT: json.dumps(config)})
            atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
            _log(f"wrote {out_dir}: {len(files)} weight file(s), {n / 1e6:.2f}M averaged parameters, dtype {origin}")
        else:
            acc, stored = None, []
            for p, w in zip(paths, weights):
                sd, m = load_model_state(p, progress=not quiet)
                stored += m["dtypes"]
                if acc is None:
                    acc = {k: v.float() * w if v.is_floating_point() else v for k, v in sd.items()}
                    continue
                bad = sorted(set(acc) ^ set(sd)) or [k for k in acc if acc[k].shape != sd[k].shape]
                if bad:
                    raise CheckpointError(f"{p} differs in tensor names or shapes ({', '.join(bad[:4])})")
                for k, v in sd.items():
                    if v.is_floating_point():
                        acc[k] += v.float() * w
                del sd
            write_consolidated(acc, cfg, tmp, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tok,
                               run_config=metas[0].get("config"), source=source, progress=not quiet,
                               source_dtypes=stored)
    return paths
