"""Running an evaluation task: generation and likelihood calls in batches with per-example seeds, and the
per-example records of :func:`run_task` (what each task measures: :mod:`llada_scale.eval.tasks`)."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from llada_scale.eval.tasks import (TASKS, EvalConfig, EvalError, ModelHandle, _first_line, check_lengths,
                                    extract_gsm8k_answer, poem_match)
from llada_scale.sampling import ar_generate, diffusion_generate, generate_blocks_batch, left_pad, truncate_at
from llada_scale.sampling.common import call_model, model_device
from llada_scale.sampling.likelihood import log_likelihood_batch

__all__ = ["run_task"]


def _batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _seed(cfg: EvalConfig, task: str, index: int, k: int = 0) -> int:
    return (cfg.seed * 1_000_003 + sum(map(ord, task)) * 7919 + index * 31 + k) % (2**63)


def _common(cfg: EvalConfig) -> dict:
    """Sampler arguments every task passes through."""
    return {"repetition_penalty": cfg.repetition_penalty, "allow_extrapolation": cfg.allow_extrapolation}


def _generate(h: ModelHandle, prompts: list[list[int]], cfg: EvalConfig, gen_length: int, stats: dict,
              index: int) -> list[list[int]]:
    if h.causal:
        res = ar_generate(h.model, prompts, max_new_tokens=gen_length, eos_token_id=h.stop_ids[0] if h.stop_ids else None,
                          temperature=cfg.temperature, suppress_token_ids=h.suppress_token_ids,
                          generator=torch.Generator().manual_seed(_seed(cfg, "gen", index)), **_common(cfg))
    else:
        block = cfg.block_length if gen_length % cfg.block_length == 0 else gen_length
        nb = gen_length // block
        steps = max(nb, round(gen_length * cfg.steps / cfg.gen_length))
        steps = -(-steps // nb) * nb
        res = diffusion_generate(h.model, prompts, mask_token_id=h.mask_token_id, gen_length=gen_length,
                                 block_length=block, steps=steps, temperature=cfg.temperature,
                                 remasking=cfg.remasking, threshold=cfg.threshold, cfg_scale=cfg.cfg_scale,
                                 suppress_token_ids=h.suppress_token_ids, cache=cfg.cache,
                                 generator=torch.Generator().manual_seed(_seed(cfg, "gen", index)), **_common(cfg))
    stats["seconds"] += res.seconds
    stats["nfe"] += res.nfe
    out = [truncate_at(t, h.stop_ids) for t in res.tokens]
    stats["tokens"] += sum(len(t) for t in res.tokens)
    return out


def _uses_block(h: ModelHandle) -> bool:
    return not h.causal and h.sampler in ("block", "llada2")


def _generations(h: ModelHandle, examples: list[dict], keys: Sequence[str], cfg: EvalConfig, gen_length: int,
                 stats: dict, bar):
    """Yield ``(batch, outputs)``: ``outputs[k][i]`` = the generation (cut at a stop id) for
    ``batch[i][keys[k]]``.

    AR and the llada sampler: one call per ``batch_size`` examples (left padding). Block sampler: one
    :func:`generate_blocks_batch` call for all prompts of all keys, which groups equal-length prompts into
    batches of ``batch_size`` (more sharing than per batch) and seeds every prompt on its own, so outputs do
    not depend on the batching at any temperature.
    """
    if _uses_block(h):
        prompts = [e[k] for k in keys for e in examples]
        seeds = [_seed(cfg, "gen", e["index"] + j * 1_000_000) for j in range(len(keys)) for e in examples]
        if h.sampler == "llada2":
            from llada_scale.sampling.llada2 import generate_llada2

            res = generate_llada2(h.model, prompts, mask_token_id=h.mask_token_id, gen_length=gen_length,
                                  block_length=cfg.block_length, steps=cfg.steps_per_block(),
                                  threshold=0.95 if cfg.threshold is None else cfg.threshold,
                                  temperature=cfg.temperature, eos_token_id=h.stop_ids[0] if h.stop_ids else None,
                                  suppress_token_ids=h.suppress_token_ids, seed=seeds[0], batch_size=cfg.batch_size,
                                  allow_extrapolation=cfg.allow_extrapolation)
            bar.update(len(examples))
        else:
            res = generate_blocks_batch(h.model, prompts, mask_token_id=h.mask_token_id, gen_length=gen_length,
                                        block_length=cfg.block_length, steps_per_block=cfg.steps_per_block(),
                                        temperature=cfg.temperature, seeds=seeds, batch_size=cfg.batch_size,
                                        suppress_token_ids=h.suppress_token_ids,
                                        progress=lambda n: bar.update(n / len(keys)), **_common(cfg))
        stats["seconds"] += res.seconds
        stats["nfe"] += res.nfe
        stats["tokens"] += sum(len(t) for t in res.tokens)
        gens = [truncate_at(t, h.stop_ids) for t in res.tokens]
        n = len(examples)
        yield examples, [gens[j * n:(j + 1) * n] for j in range(len(keys))]
        return
    for batch in _batches(examples, cfg.batch_size):
        yield batch, [_generate(h, [e[k] for e in batch], cfg, gen_length, stats, batch[0]["index"] + j * 1_000_000)
                      for j, k in enumerate(keys)]
        bar.update(len(batch))


def _loglik(h: ModelHandle, pairs, seeds, cfg: EvalConfig, stats: dict) -> list[float]:
    t0 = time.perf_counter()
    if h.causal:
        out = log_likelihood_batch(h.model, pairs, causal=True, batch_size=cfg.batch_size,
                                   allow_extrapolation=cfg.allow_extrapolation)
        stats["nfe"] += math.ceil(len(pairs) / cfg.batch_size)
    else:
        out = log_likelihood_batch(h.model, pairs, causal=False, mask_token_id=h.mask_token_id,
                                   mc_samples=cfg.mc_samples, batch_size=cfg.batch_size * 8, pair_seeds=seeds,
                                   block_length=h.likelihood_block_length,
                                   allow_extrapolation=cfg.allow_extrapolation)
        stats["nfe"] += math.ceil(len(pairs) * cfg.mc_samples / (cfg.batch_size * 8))
    stats["seconds"] += time.perf_counter() - t0
    stats["tokens"] += sum(len(a) for _, a in pairs)
    return out


@torch.no_grad()
def run_task(task: str, h: ModelHandle, examples: list[dict], cfg: EvalConfig, *, progress: bool = True,
             position: int = 0) -> tuple[list[dict], dict]:
    """Score ``examples`` (from :func:`load_examples`) with the model in ``h``.

    Returns ``(records, stats)``: one JSON-serialisable record per example (with its ``index``), and
    ``{"seconds", "tokens", "nfe"}`` (model time, generated or scored tokens, forward passes).

    Diffusion likelihood forwards pack ``8 * batch_size`` Monte Carlo rows (rows are cheap relative to
    examples); generation uses ``batch_size`` prompts per call (block sampler: up to ``batch_size`` prompts
    of equal length per call, over the whole of ``examples``). Results do not depend on how examples are
    split into calls (per-example seeds; left padding with document masks; the block sampler needs no
    padding and seeds every prompt, so it is independent of the split at any temperature).
    """
    from tqdm.auto import tqdm

    cfg.validate(None if h.causal else h.sampler)
    if not h.causal and h.mask_token_id is None:
        raise EvalError("a diffusion model needs mask_token_id")
    check_lengths(task, examples, cfg, h.max_seq_len)
    stats = {"seconds": 0.0, "tokens": 0, "nfe": 0}
    records: list[dict] = []
    bar = tqdm(total=len(examples), desc=f"{task} [{h.name}]", unit="ex", disable=not progress, position=position,
               leave=False)
    tok = h.tokenizer
    if task == "wikitext2":
        prefix = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        for batch in _batches(examples, cfg.batch_size):
            lls = _loglik(h, [(prefix, e["answer"]) for e in batch], [_seed(cfg, task, e["index"]) for e in batch],
                          cfg, stats)
            records += [{"index": e["index"], "nll": -ll, "tokens": len(e["answer"])} for e, ll in zip(batch, lls)]
            bar.update(len(batch))
    elif task == "lambada":
        if h.causal:
            for batch in _batches(examples, cfg.batch_size):
                t0 = time.perf_counter()
                x, pos, doc = left_pad([e["context"] + e["target"] for e in batch], 0, device=model_device(h.model))
                logits = call_model(h.model, x, pos, doc).float()
                if h.suppress_token_ids:
                    logits[..., h.suppress_token_ids] = -math.inf
                stats["nfe"] += 1
                width = x.shape[1]
                for i, e in enumerate(batch):
                    t = len(e["target"])
                    pred = logits[i, width - t - 1:width - 1].argmax(-1).tolist()
                    records.append({"index": e["index"], "correct": pred == e["target"],
                                    "prediction": tok.decode(pred).strip(), "word": e["word"]})
                stats["seconds"] += time.perf_counter() - t0
                stats["tokens"] += sum(len(e["target"]) for e in batch)
                bar.update(len(batch))
        else:
            by_len: dict[int, list[dict]] = {}
            for e in examples:
                by_len.setdefault(len(e["target"]), []).append(e)
            for t, group in sorted(by_len.items()):
                # one token committed per step, temperature 0
                if _uses_block(h):  # grouped by context length inside, batch_size rows per call
                    calls = [(group, generate_blocks_batch(
                        h.model, [e["context"] for e in group], mask_token_id=h.mask_token_id, gen_length=t,
                        block_length=cfg.block_length, steps_per_block=cfg.block_length, temperature=0.0,
                        batch_size=cfg.batch_size, suppress_token_ids=h.suppress_token_ids, progress=bar.update,
                        allow_extrapolation=cfg.allow_extrapolation))]
                else:
                    calls = ((batch, diffusion_generate(h.model, [e["context"] for e in batch],
                                                        mask_token_id=h.mask_token_id, gen_length=t, block_length=t,
                                                        steps=t, temperature=0.0,
                                                        suppress_token_ids=h.suppress_token_ids,
                                                        allow_extrapolation=cfg.allow_extrapolation))
                             for batch in _batches(group, cfg.batch_size))
                for batch, res in calls:
                    stats["seconds"] += res.seconds
                    stats["nfe"] += res.nfe
                    stats["tokens"] += t * len(batch)
                    for e, pred in zip(batch, res.tokens):
                        records.append({"index": e["index"], "correct": pred == e["target"],
                                        "prediction": tok.decode(pred).strip(), "word": e["word"]})
                    if not _uses_block(h):
                        bar.update(len(batch))
            records.sort(key=lambda r: r["index"])
    elif task == "piqa":
        for batch in _batches(examples, cfg.batch_size):
            pairs, seeds = [], []
            for e in batch:
                for k, c in enumerate(e["choices"]):
                    pairs.append((e["prompt"], c))
                    seeds.append(_seed(cfg, task, e["index"], k))
            lls = _loglik(h, pairs, seeds, cfg, stats)
            for i, e in enumerate(batch):
                s = lls[2 * i:2 * i + 2]
                norm = [s[k] / e["choice_chars"][k] for k in range(2)]
                records.append({"index": e["index"], "label": e["label"], "loglik": s,
                                "correct": int(s[1] > s[0]) == e["label"],
                                "correct_norm": int(norm[1] > norm[0]) == e["label"]})
            bar.update(len(batch))
    elif task == "gsm8k":
        for batch, (gens,) in _generations(h, examples, ["prompt"], cfg, cfg.gen_length, stats, bar):
            for e, g in zip(batch, gens):
                text = tok.decode(g)
                pred = extract_gsm8k_answer(text)
                records.append({"index": e["index"], "gold": e["gold"], "prediction": pred,
                                "correct": pred is not None and pred == e["gold"], "output": text})
    elif task == "poem":
        for batch, (fw, rv) in _generations(h, examples, ["forward_prompt", "reversal_prompt"], cfg,
                                            cfg.poem_gen_length, stats, bar):
            for e, f, r in zip(batch, fw, rv):
                ft, rt = _first_line(tok.decode(f)), _first_line(tok.decode(r))
                records.append({"index": e["index"], "forward_output": ft, "reversal_output": rt,
                                "forward_correct": poem_match(ft, e["second"]),
                                "reversal_correct": poem_match(rt, e["first"])})
    else:
        raise EvalError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    bar.close()
    return records, stats
