"""Evaluation tasks on the real eval sets in ``<data>/eval`` for AR and masked-diffusion models.

Each task turns the published data into examples (:func:`load_examples`), scores a contiguous slice of
them with a model (:func:`llada_scale.eval.runner.run_task`, batched) and reduces per-example records to metrics
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
:func:`llada_scale.sampling.diffusion.diffusion_generate` (left-padded batches, blocks counted from the end of the
prompt); ``block`` is :func:`llada_scale.sampling.block.generate_blocks_batch` for block-diffusion models
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
from dataclasses import asdict, dataclass, field
from typing import Any

from llada_scale.api import default_sampler, trained_block_length


__all__ = ["TASKS", "SAMPLERS", "LIKELIHOODS", "EvalConfig", "EvalError", "load_examples", "aggregate",
           "extract_gsm8k_answer", "normalize_number", "ModelHandle", "default_sampler", "trained_block_length",
           "required_length", "check_lengths", "poem_match"]

TASKS = ("wikitext2", "lambada", "piqa", "gsm8k", "poem")
SAMPLERS = ("llada", "block", "llada2")
LIKELIHOODS = ("auto", "full", "block")

POEM_FORWARD = "{line}的下一句是什么？直接输出句子即可。"
POEM_REVERSAL = "{line}的上一句是什么？直接输出句子即可。"


class EvalError(ValueError):
    """Unusable eval data or settings (missing file, unknown task, bad knob)."""


@dataclass
class EvalConfig:
    """Knobs shared by all tasks (the CLI flags of ``tools/eval_diffusion.py``).

    batch_size: examples (likelihood rows / prompts) per forward. mc_samples: Monte Carlo samples per
    likelihood (diffusion). gen_length/block_length/steps/temperature/remasking/threshold/cfg_scale: diffusion
    sampling (:func:`llada_scale.sampling.diffusion.diffusion_generate`); the block sampler uses ``block_length`` and
    ``temperature`` and :meth:`steps_per_block` (the same tokens per step as ``steps`` for ``gen_length``).
    AR models decode up to ``gen_length`` tokens greedily (``temperature`` > 0 samples). poem_gen_length:
    tokens generated per poem line. chunk_len: WikiText-2 chunk length in tokens. seed: base seed of all
    randomness (per-example seeds derive from it, so results do not depend on sharding). cache: Fast-dLLM's
    approximate ``"prefix"``/``"dual"`` KV cache of the llada sampler (None = exact). repetition_penalty:
    HF-style penalty in every sampler (1 = off). allow_extrapolation: run sequences longer than the model's
    ``max_seq_len`` (refused otherwise). likelihood: the diffusion likelihood estimator, ``"auto"`` (the block
    NELBO for block-diffusion checkpoints, else LLaDA's full-attention ELBO), ``"full"`` or ``"block"``.
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
    cache: str | None = None
    repetition_penalty: float = 1.0
    allow_extrapolation: bool = False
    likelihood: str = "auto"

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
        if not self.repetition_penalty > 0:
            raise EvalError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.cache not in (None, "prefix", "dual"):
            raise EvalError(f"cache must be prefix or dual (or unset), not {self.cache!r}")
        if self.likelihood not in LIKELIHOODS:
            raise EvalError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, not {self.likelihood!r}")
        if sampler is None:
            return
        if sampler not in SAMPLERS:
            raise EvalError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        if sampler == "llada2":  # the LLaDA2 release's generate(): threshold commits, no CFG / cache / penalty
            bad = [f for f, on in (("--cfg_scale", self.cfg_scale > 0), ("--cache", self.cache is not None),
                                   ("--remasking random", self.remasking != "low_confidence"),
                                   ("--repetition_penalty", self.repetition_penalty != 1.0)) if on]
            if bad:
                raise EvalError(f"the llada2 sampler does not support {', '.join(bad)}; use --sampler llada")
            return
        if sampler == "block":
            bad = [f for f, on in (("--threshold", self.threshold is not None), ("--cfg_scale", self.cfg_scale > 0),
                                   ("--remasking random", self.remasking != "low_confidence"),
                                   ("--cache", self.cache is not None)) if on]
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
    ``"block"`` (:func:`llada_scale.sampling.block.generate_blocks_batch`, for block-diffusion models);
    ignored for AR models. likelihood_block_length: None = LLaDA's full-attention ELBO, else the block NELBO
    with that block length (:func:`llada_scale.sampling.likelihood.log_likelihood_batch`). max_seq_len: the
    model's context (sequences beyond it are refused unless ``EvalConfig.allow_extrapolation``).
    """

    model: Any
    tokenizer: Any
    causal: bool
    mask_token_id: int | None = None
    suppress_token_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    name: str = "model"
    sampler: str = "llada"
    likelihood_block_length: int | None = None
    max_seq_len: int | None = None


# ------------------------------------------------------------------------------------------------ data
def _path(data_dir: str, name: str) -> str:
    p = os.path.join(data_dir, "eval", name)
    if not os.path.isfile(p):
        raise EvalError(f"eval file {p} not found (point --data, the harness model_arg data=, or LLADA_DATA at the "
                        "shared data directory)")
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


def required_length(task: str, examples: list[dict], cfg: EvalConfig) -> int:
    """The longest sequence (prompt + answer/generation, in tokens) that ``task`` runs on ``examples``."""
    if task == "wikitext2":
        return 1 + max(len(e["answer"]) for e in examples)
    if task == "lambada":
        return max(len(e["context"]) + len(e["target"]) for e in examples)
    if task == "piqa":
        return max(len(e["prompt"]) + len(c) for e in examples for c in e["choices"])
    if task == "gsm8k":
        return max(len(e["prompt"]) for e in examples) + cfg.gen_length
    if task == "poem":
        return max(max(len(e["forward_prompt"]), len(e["reversal_prompt"])) for e in examples) + cfg.poem_gen_length
    raise EvalError(f"unknown task {task!r}")


def check_lengths(task: str, examples: list[dict], cfg: EvalConfig, max_seq_len: int | None) -> None:
    """Refuse a task whose sequences exceed ``max_seq_len`` unless ``cfg.allow_extrapolation`` (one line).

    Raises:
        EvalError: naming the task, the length, the limit and the flag.
    """
    need = required_length(task, examples, cfg) if examples else 0
    if max_seq_len is not None and need > max_seq_len and not cfg.allow_extrapolation:
        raise EvalError(f"{task}: sequences of up to {need} tokens (prompt + answer/generation) exceed the model's "
                        f"max_seq_len {max_seq_len}; lower --gen_length/--chunk_len/--limit or pass "
                        "--allow_extrapolation")


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


def poem_match(line: str, reference: str) -> bool:
    """The poem tasks' exact match: ``line`` (already cut to its first line) equals ``reference`` with
    punctuation and whitespace ignored."""
    return _PUNCT.sub("", line) == _PUNCT.sub("", reference)


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
