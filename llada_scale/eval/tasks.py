"""Evaluation tasks on the real eval sets in ``<data>/eval`` for AR and masked-diffusion models.

Each task turns the published data into examples (:func:`load_examples`), scores a contiguous slice of
them with a model (:func:`run_task`, batched) and reduces per-example records to metrics
(:func:`aggregate`). ``tools/eval_diffusion.py`` is the CLI (data parallel, JSON output, AR/diffusion
comparison, live unmasking view).

=========  ===========================================================================================
task       what is measured
=========  ===========================================================================================
wikitext2  perplexity on consecutive chunks of ``chunk_len`` tokens of WikiText-2 test, each scored as the
           answer to a one-token prompt (bos, else eos). AR: exact ``exp(NLL / tokens)``. Diffusion:
           ``exp(-ELBO / tokens)`` with LLaDA's Monte Carlo ELBO (an estimate of an **upper bound** on
           the perplexity; LLaDA eq. 6).
lambada    last-word accuracy. AR: greedy decoding of the last word's tokens reproduces them exactly
           (computed from one teacher-forced forward: greedy decoding succeeds iff every argmax matches).
           Diffusion: the last word's tokens are masked after the context and filled with low-confidence
           remasking, one token per step (temperature 0); correct iff all tokens match.
piqa       pick sol1/sol2 by log p(" " + sol | "Question: goal\\nAnswer:") (``acc``) and by that log
           likelihood per character (``acc_norm``, lm-evaluation-harness convention). Diffusion uses the MC
           estimate with ``mc_samples`` samples.
gsm8k      the question rendered with the tokenizer's chat template (generation prompt), answer generated
           (diffusion: ``gen_length``/``block_length``/``steps``/``threshold``; AR: greedy up to
           ``gen_length`` tokens), cut at eos; the number after ``####`` - else the last number - must equal
           the reference answer.
poem       LLaDA's reversal-curse poem set (Chinese couplets): forward = given the first line generate the
           second, reversal = given the second generate the first (chat prompt asking for the next / previous
           line); exact match of the first generated line, punctuation and spaces ignored.
=========  ===========================================================================================

Diffusion samplers (``ModelHandle.sampler``, CLI ``--sampler``): ``llada`` is
:func:`llada_scale.generate.diffusion_generate` (left-padded batches, blocks counted from the end of the
prompt); ``block`` is :func:`llada_scale.block_sampling.generate_blocks_batch` for block-diffusion models
(blocks counted from position 0 as in training, exact KV cache of finished blocks, prompts batched by equal
length; low-confidence remasking only: no ``threshold``, ``cfg_scale`` or random remasking). The CLI defaults
to ``block`` when the checkpoint's run config has block diffusion on (:func:`default_sampler`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from llada_scale.block_sampling import generate_blocks_batch
from llada_scale.generate import (_call, ar_generate, diffusion_generate, left_pad, log_likelihood_batch,
                                  truncate_at)

__all__ = ["TASKS", "SAMPLERS", "EvalConfig", "EvalError", "load_examples", "run_task", "aggregate",
           "extract_gsm8k_answer", "normalize_number", "ModelHandle", "default_sampler", "trained_block_length"]

TASKS = ("wikitext2", "lambada", "piqa", "gsm8k", "poem")
SAMPLERS = ("llada", "block")

POEM_FORWARD = "{line}的下一句是什么？直接输出句子即可。"
POEM_REVERSAL = "{line}的上一句是什么？直接输出句子即可。"


class EvalError(ValueError):
    """Unusable eval data or settings (missing file, unknown task, bad knob)."""


@dataclass
class EvalConfig:
    """Knobs shared by all tasks (the CLI flags of ``tools/eval_diffusion.py``).

    batch_size: examples (likelihood rows / prompts) per forward. mc_samples: Monte Carlo samples per
    likelihood (diffusion). gen_length/block_length/steps/temperature/remasking/threshold/cfg_scale: diffusion
    sampling (:func:`llada_scale.generate.diffusion_generate`); the block sampler uses ``block_length`` and
    ``temperature`` and :meth:`steps_per_block` (the same tokens per step as ``steps`` for ``gen_length``).
    AR models decode up to ``gen_length`` tokens greedily (``temperature`` > 0 samples). poem_gen_length:
    tokens generated per poem line. chunk_len: WikiText-2 chunk length in tokens. seed: base seed of all
    randomness (per-example seeds derive from it, so results do not depend on sharding).
    """

    batch_size: int = 16
    mc_samples: int = 128
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cfg_scale: float = 0.0
    poem_gen_length: int = 32
    chunk_len: int = 128
    seed: int = 0

    def validate(self, sampler: str | None = "llada") -> None:
        """Raise :class:`EvalError` naming the first bad knob.

        ``sampler``: also check the knobs of that diffusion sampler (``"llada"``: block/step divisibility;
        ``"block"``: no threshold, CFG or random remasking); None = only the sampler-independent checks (AR
        models, or before the sampler is known).
        """
        for name in ("batch_size", "mc_samples", "gen_length", "block_length", "steps", "poem_gen_length", "chunk_len"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise EvalError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.remasking not in ("low_confidence", "random"):
            raise EvalError(f"remasking must be low_confidence or random, not {self.remasking!r}")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise EvalError("temperature and cfg_scale must be >= 0")
        if sampler is None:
            return
        if sampler not in SAMPLERS:
            raise EvalError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        if sampler == "block":
            bad = [f for f, on in (("--threshold", self.threshold is not None), ("--cfg_scale", self.cfg_scale > 0),
                                   ("--remasking random", self.remasking != "low_confidence")) if on]
            if bad:
                raise EvalError(f"the block sampler does not support {', '.join(bad)} (low-confidence remasking "
                                "with fixed steps only); use --sampler llada")
            return
        if self.gen_length % self.block_length:
            raise EvalError(f"gen_length {self.gen_length} must be a multiple of block_length {self.block_length}")
        nb = self.gen_length // self.block_length
        if self.threshold is None and self.steps % nb:
            raise EvalError(f"steps {self.steps} must be a multiple of the number of blocks {nb}")

    def steps_per_block(self) -> int:
        """Denoising steps per block of the block sampler: ``round(steps * block_length / gen_length)``
        (at least 1), i.e. the tokens-per-step rate that ``steps`` gives for ``gen_length`` tokens."""
        return max(1, round(self.steps * self.block_length / self.gen_length))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelHandle:
    """A model plus what the tasks need to drive it.

    causal: AR (True) or diffusion (False). mask_token_id: required for diffusion. suppress_token_ids: ids
    never generated (vocab padding rows; the mask token for AR). stop_ids: generation is cut at the first of
    these (eos, pad). sampler: diffusion generation with ``"llada"`` (:func:`diffusion_generate`) or
    ``"block"`` (:func:`llada_scale.block_sampling.generate_blocks_batch`, for block-diffusion models);
    ignored for AR models.
    """

    model: Any
    tokenizer: Any
    causal: bool
    mask_token_id: int | None = None
    suppress_token_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    name: str = "model"
    sampler: str = "llada"


def _objective(meta: dict | None) -> dict:
    cfg = (meta or {}).get("config")
    obj = cfg.get("objective") if isinstance(cfg, dict) else None
    return obj if isinstance(obj, dict) else {}


def default_sampler(meta: dict | None) -> str:
    """``"block"`` when the checkpoint's stored run config has block diffusion on
    (``config.objective.block_length > 0`` or a non-empty ``block_schedule``), else ``"llada"`` (also when the
    checkpoint stores no run config, e.g. HF exports)."""
    obj = _objective(meta)
    bl = obj.get("block_length") or 0
    return "block" if (isinstance(bl, int) and bl > 0) or obj.get("block_schedule") else "llada"


def trained_block_length(meta: dict | None) -> int | None:
    """The block length the checkpoint was last trained with: ``objective.block_length``, or the
    ``block_schedule`` value at the checkpoint's last step (its last phase when the step is unknown). None when
    block diffusion is off, the value is ``"full"`` or the schedule is unreadable."""
    from llada_scale import block_diffusion as bd

    obj = _objective(meta)
    bl = obj.get("block_length") or 0
    if isinstance(bl, int) and bl > 0:
        return bl
    sched = obj.get("block_schedule")
    if not sched:
        return None
    step = (meta or {}).get("step")
    try:
        if not isinstance(step, int) or step < 1:
            step = sum(int(s) for _, s in sched)  # past the end: the last phase
        out = bd.block_length_at(sched, step - 1)
    except (ValueError, TypeError):
        return None
    return None if out >= bd.FULL_LENGTH else out


# ------------------------------------------------------------------------------------------------ data
def _path(data_dir: str, name: str) -> str:
    p = os.path.join(data_dir, "eval", name)
    if not os.path.isfile(p):
        raise EvalError(f"eval file {p} not found (set --data or LLADA_DATA to the shared data directory)")
    return p


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def load_examples(task: str, data_dir: str, tokenizer, cfg: EvalConfig, limit: int | None = None) -> list[dict]:
    """Read and tokenize the examples of ``task`` from ``<data_dir>/eval`` (the first ``limit`` if given).

    Returns a list of dicts with an ``index`` and the task's token ids / reference fields.

    Raises:
        EvalError: unknown task, missing or malformed file.
    """
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    n = None if limit is None or limit <= 0 else limit
    out: list[dict] = []
    if task == "wikitext2":
        with _open(_path(data_dir, "wikitext2_test.txt")) as f:
            text = f.read().lstrip("\ufeff")
        # Tokenize line by line (fast, bounded memory) and cut the stream into chunks.
        ids: list[int] = []
        need = None if n is None else n * cfg.chunk_len
        for line in text.splitlines(keepends=True):
            ids.extend(tokenizer.encode(line))
            if need is not None and len(ids) >= need:
                break
        n_chunks = len(ids) // cfg.chunk_len if n is None else min(n, len(ids) // cfg.chunk_len)
        for i in range(n_chunks):
            out.append({"index": i, "answer": ids[i * cfg.chunk_len:(i + 1) * cfg.chunk_len]})
    elif task == "lambada":
        with _open(_path(data_dir, "lambada_test.txt")) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                context, _, word = line.rpartition(" ")
                if not context:
                    continue
                out.append({"index": len(out), "context": tokenizer.encode(context),
                            "target": tokenizer.encode(" " + word), "word": word})
                if n and len(out) >= n:
                    break
    elif task == "piqa":
        with _open(_path(data_dir, "piqa_valid.jsonl")) as f, _open(_path(data_dir, "piqa_valid_labels.lst")) as g:
            for line, label in zip(f, g):
                try:
                    row = json.loads(line)
                    lab = int(label.strip())
                except (json.JSONDecodeError, ValueError) as e:
                    raise EvalError(f"malformed PIQA record {len(out)}: {e}") from None
                prompt = tokenizer.encode(f"Question: {row['goal']}\nAnswer:")
                sols = [row["sol1"], row["sol2"]]
                out.append({"index": len(out), "prompt": prompt, "choices": [tokenizer.encode(" " + s) for s in sols],
                            "choice_chars": [max(1, len(s)) for s in sols], "label": lab})
                if n and len(out) >= n:
                    break
    elif task == "gsm8k":
        with _open(_path(data_dir, "gsm8k_test.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                gold = normalize_number(row["answer"].split("####")[-1])
                prompt = tokenizer.render_prompt([{"role": "user", "content": row["question"]}])
                out.append({"index": len(out), "prompt": prompt, "gold": gold})
                if n and len(out) >= n:
                    break
    elif task == "poem":
        with _open(_path(data_dir, "poem_reversal.json")) as f:
            rows = json.load(f)
        for row in rows:
            out.append({"index": len(out), "first": row["first"], "second": row["second"],
                        "forward_prompt": tokenizer.render_prompt(
                            [{"role": "user", "content": POEM_FORWARD.format(line=row["first"])}]),
                        "reversal_prompt": tokenizer.render_prompt(
                            [{"role": "user", "content": POEM_REVERSAL.format(line=row["second"])}])})
            if n and len(out) >= n:
                break
    if not out:
        raise EvalError(f"task {task}: no examples read")
    return out


# ------------------------------------------------------------------------------------------------ scoring
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """``" $1,234.50 "`` -> ``"1234.5"``; ``"7.0"`` -> ``"7"``; non-numbers stripped of spaces."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return t
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####`` if there is one, else the last number in ``text`` (normalized);
    None when there is no number."""
    if "####" in text:
        m = _NUM.search(text.split("####")[-1])
        if m:
            return normalize_number(m.group(0))
    nums = _NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


_PUNCT = re.compile(r"[\s，。！？、；：,.!?;:\"'“”‘’「」『』《》()（）]+")


def _first_line(text: str) -> str:
    for part in re.split(r"[\n，。！？,.!?；;]", text):
        if part.strip():
            return part.strip()
    return ""


def _batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _seed(cfg: EvalConfig, task: str, index: int, k: int = 0) -> int:
    return (cfg.seed * 1_000_003 + sum(map(ord, task)) * 7919 + index * 31 + k) % (2**63)


def _generate(h: ModelHandle, prompts: list[list[int]], cfg: EvalConfig, gen_length: int, stats: dict,
              index: int) -> list[list[int]]:
    if h.causal:
        res = ar_generate(h.model, prompts, max_new_tokens=gen_length, eos_token_id=h.stop_ids[0] if h.stop_ids else None,
                          temperature=cfg.temperature, suppress_token_ids=h.suppress_token_ids,
                          generator=torch.Generator().manual_seed(_seed(cfg, "gen", index)))
    else:
        block = cfg.block_length if gen_length % cfg.block_length == 0 else gen_length
        nb = gen_length // block
        steps = max(nb, round(gen_length * cfg.steps / cfg.gen_length))
        steps = -(-steps // nb) * nb
        res = diffusion_generate(h.model, prompts, mask_token_id=h.mask_token_id, gen_length=gen_length,
                                 block_length=block, steps=steps, temperature=cfg.temperature,
                                 remasking=cfg.remasking, threshold=cfg.threshold, cfg_scale=cfg.cfg_scale,
                                 suppress_token_ids=h.suppress_token_ids,
                                 generator=torch.Generator().manual_seed(_seed(cfg, "gen", index)))
    stats["seconds"] += res.seconds
    stats["nfe"] += res.nfe
    out = [truncate_at(t, h.stop_ids) for t in res.tokens]
    stats["tokens"] += sum(len(t) for t in res.tokens)
    return out


def _uses_block(h: ModelHandle) -> bool:
    return not h.causal and h.sampler == "block"


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
        res = generate_blocks_batch(h.model, prompts, mask_token_id=h.mask_token_id, gen_length=gen_length,
                                    block_length=cfg.block_length, steps_per_block=cfg.steps_per_block(),
                                    temperature=cfg.temperature, seeds=seeds, batch_size=cfg.batch_size,
                                    suppress_token_ids=h.suppress_token_ids,
                                    progress=lambda n: bar.update(n / len(keys)))
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
        out = log_likelihood_batch(h.model, pairs, causal=True, batch_size=cfg.batch_size)
        stats["nfe"] += math.ceil(len(pairs) / cfg.batch_size)
    else:
        out = log_likelihood_batch(h.model, pairs, causal=False, mask_token_id=h.mask_token_id,
                                   mc_samples=cfg.mc_samples, batch_size=cfg.batch_size * 8, pair_seeds=seeds)
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
                x, pos, doc = left_pad([e["context"] + e["target"] for e in batch], 0, device=_dev(h.model))
                logits = _call(h.model, x, pos, doc).float()
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
                        batch_size=cfg.batch_size, suppress_token_ids=h.suppress_token_ids, progress=bar.update))]
                else:
                    calls = ((batch, diffusion_generate(h.model, [e["context"] for e in batch],
                                                        mask_token_id=h.mask_token_id, gen_length=t, block_length=t,
                                                        steps=t, temperature=0.0,
                                                        suppress_token_ids=h.suppress_token_ids))
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
                                "forward_correct": _PUNCT.sub("", ft) == _PUNCT.sub("", e["second"]),
                                "reversal_correct": _PUNCT.sub("", rt) == _PUNCT.sub("", e["first"])})
    else:
        raise EvalError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    bar.close()
    return records, stats


def _dev(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def aggregate(task: str, records: list[dict], causal: bool) -> dict:
    """Reduce per-example records to the task's metrics (floats) plus ``n`` (examples).

    wikitext2: ``nll_per_token`` and ``ppl`` (AR, exact) or ``nll_bound_per_token`` and ``ppl_bound``
    (diffusion, MC upper bound); lambada/gsm8k: ``acc``; piqa: ``acc``, ``acc_norm``; poem: ``forward_acc``,
    ``reversal_acc``.
    """
    n = len(records)
    if n == 0:
        return {"n": 0}
    if task == "wikitext2":
        tokens = sum(r["tokens"] for r in records)
        nll = sum(r["nll"] for r in records) / tokens
        key = "" if causal else "_bound"
        return {"n": n, "tokens": tokens, f"nll{key}_per_token": nll, f"ppl{key}": math.exp(min(nll, 700))}
    if task in ("lambada", "gsm8k"):
        return {"n": n, "acc": sum(r["correct"] for r in records) / n}
    if task == "piqa":
        return {"n": n, "acc": sum(r["correct"] for r in records) / n,
                "acc_norm": sum(r["correct_norm"] for r in records) / n}
    if task == "poem":
        return {"n": n, "forward_acc": sum(r["forward_correct"] for r in records) / n,
                "reversal_acc": sum(r["reversal_correct"] for r in records) / n}
    raise EvalError(f"unknown task {task!r}")
