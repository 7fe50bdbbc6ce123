"""lm-evaluation-harness for llada_scale checkpoints: the registered model ``llada_scale`` (AR and diffusion) and
``python -m llada_scale.eval.harness``, lm-eval's own CLI with that model and our offline task YAMLs.

    python -m llada_scale.eval.harness --model_args pretrained=runs/sft_diffusion_tiny,mc_samples=32 \\
        --tasks llada_piqa,llada_gsm8k --limit 100 --output_path results/

Every flag except ``--model_args`` is lm-eval's (``lm-eval run --help``); ``--model`` is ``llada_scale`` and the
task directory ``llada_scale/eval/lm_eval_tasks`` (``llada_gsm8k``, ``llada_gsm8k_chat``, ``llada_piqa``, ``llada_lambada``,
``llada_wikitext2``, ``llada_poem_forward`` / ``llada_poem_reversal``, tag ``llada_poem``) is always included,
next to lm-eval's built-in tasks and any ``--include_path``. Unknown or ill-typed model arguments are refused in
one line (exit 2) before any model loads.

The model (:class:`LladaScaleLM`, built on :func:`llada_scale.load`):

* ``loglikelihood``: AR models the exact chain rule with lm-eval's ``is_greedy``; diffusion models the
  stratified Monte Carlo ELBO (LLaDA eq. 6; the block NELBO for block-diffusion checkpoints), ``mc_samples``
  samples, optional CFG, and ``is_greedy`` by decoding the continuation one token per step at temperature 0
  (LLaDA ``eval_llada.py::suffix_greedy_prediction``; ``check_greedy=false`` skips it).
* ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_seq_len - 1`` tokens after the prefix token, each
  scored as above (LLaDA's harness class lacks it).
* ``generate_until``: our batched samplers (``sampler``, ``gen_length``, ``steps``, ``block_length``,
  ``threshold``, ``cache``, ``cfg_scale``, ``temperature``, ``repetition_penalty``; ``sampler=edit`` with
  ``editing_threshold``, ``max_post_steps``, ``preset``, ``top_k``, ``top_p`` for LLaDA 2.1's editing decoder),
  the text cut at eos and at the first of the request's ``until`` strings.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from llada_scale import api
from llada_scale.sampling import truncate_at, validate
from llada_scale.sampling.diffusion import CACHES

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - reported by main()
    TemplateLM, register_model = object, None

__all__ = ["MODEL_ARGS", "TASKS_DIR", "LladaScaleLM", "parse_model_args", "main"]

LIKELIHOODS = ("auto", "full", "block")

TASKS_DIR = str(Path(__file__).resolve().parent / "lm_eval_tasks")
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}

# name -> (type, default, help). lm-eval passes batch_size, max_batch_size and device itself.
MODEL_ARGS: dict[str, tuple[type, object, str]] = {
    "pretrained": (str, None, "checkpoint: DeepSpeed tag/run dir, consolidated or HF directory (required)"),
    "tokenizer": (str, None, "tokenizer dir/file (default: the one the checkpoint names)"),
    "dtype": (str, None, "fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)"),
    "device": (str, None, "cpu, cuda, cuda:1 (default: lm-eval's --device, else cuda when available)"),
    "batch_size": (int, 16, "prompts per forward (generation), pairs per forward (AR), 8x as many MC rows"),
    "max_batch_size": (int, None, "accepted from lm-eval and ignored"),
    "mc_samples": (int, 128, "Monte Carlo samples per diffusion log-likelihood (LLaDA: 128)"),
    "cfg_scale": (float, 0.0, "classifier-free guidance for diffusion likelihoods and generation"),
    "likelihood": (str, "auto", "diffusion estimator: auto (block NELBO for block-diffusion checkpoints), full, block"),
    "check_greedy": (bool, True, "diffusion is_greedy by decoding the continuation (false: always False, faster)"),
    "gen_length": (int, None, "tokens generated (default: the request's max_gen_toks, rounded up to a block)"),
    "steps": (int, None, "denoising steps for gen_length tokens (default gen_length)"),
    "block_length": (int, None, "block length (default: trained one for block diffusion, else 32)"),
    "sampler": (str, None, "low_confidence, random, threshold, block, edit or llada2 (default: from the checkpoint)"),
    "threshold": (float, None, "confidence threshold of threshold (default 0.9), edit (0.7) and llada2 (0.95)"),
    "editing_threshold": (str, "0.5", "edit sampler: T2T threshold (0 = every changed token; none = no edits)"),
    "max_post_steps": (int, 16, "edit sampler: editing steps after a block has no mask left"),
    "preset": (str, None, "edit sampler: quality (0.7/0.5/16) or speed (0.5/0.0/16), sets the three above"),
    "top_k": (int, None, "edit sampler: top-k filtering (temperature > 0)"),
    "top_p": (float, None, "edit sampler: nucleus filtering (temperature > 0)"),
    "cache": (str, None, "prefix or dual: Fast-dLLM's approximate KV cache (default none = exact)"),
    "temperature": (float, 0.0, "sampling temperature (0 = greedy)"),
    "repetition_penalty": (float, 1.0, "HF-style repetition penalty (1 = off)"),
    "seed": (int, 0, "seed of Monte Carlo noise and sampling"),
    "allow_extrapolation": (bool, False, "allow sequences longer than the model's max_seq_len"),
    "data": (str, None, "shared data directory for the llada_* tasks (default $LLADA_DATA or ../shared/data)"),
}
CHOICES = {"likelihood": LIKELIHOODS, "sampler": api.SAMPLERS, "preset": ("quality", "speed"), "cache": tuple(c for c in CACHES if c),
           "dtype": ("fp32", "bf16", "float32", "bfloat16")}


def parse_model_args(args: dict) -> dict:
    """Check and type lm-eval ``--model_args`` for ``llada_scale``; returns every argument with defaults filled.

    Raises:
        ValueError: one line naming an unknown argument (and the known ones), a value of the wrong type or
            outside its choices, or a missing ``pretrained``.
    """
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"unknown model_arg(s) {', '.join(unknown)} for llada_scale; known: {', '.join(MODEL_ARGS)}")
    out = {}
    for name, (typ, default, _) in MODEL_ARGS.items():
        v = args.get(name, default)
        if v is None or (v == "auto" and name in ("batch_size", "max_batch_size")):
            out[name] = default
            continue
        try:
            if typ is bool:
                v = v if isinstance(v, bool) else _BOOL[str(v).strip().lower()]
            elif typ is int:
                if isinstance(v, bool) or float(v) != int(float(v)):
                    raise ValueError
                v = int(float(v))
            else:
                v = typ(v)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"model_arg {name}={v!r} must be {_KIND[typ]}") from None
        if name in CHOICES and v not in CHOICES[name]:
            raise ValueError(f"model_arg {name}={v!r}: choose one of {', '.join(CHOICES[name])}")
        out[name] = v
    if not out["pretrained"]:
        raise ValueError("model_args needs pretrained=CHECKPOINT")
    et = str(out["editing_threshold"]).strip().lower()
    try:
        out["editing_threshold"] = None if et == "none" else float(et)
    except ValueError:
        raise ValueError(f"model_arg editing_threshold={et!r} must be a number or none") from None
    for name in ("batch_size", "mc_samples"):
        if out[name] < 1:
            raise ValueError(f"model_arg {name} must be >= 1, got {out[name]}")
    try:  # the API's own checks (0, NaN, inf, steps above gen_length), before anything is loaded
        validate.check_generation(**{k: out[k] for k in ("gen_length", "steps", "block_length", "temperature",
                                                         "cfg_scale", "threshold", "repetition_penalty", "seed",
                                                         "batch_size")}
                                  | {"gen_length": out["gen_length"] if out["gen_length"] is not None
                                     else max(out["steps"] or 1, 1)})
    except ValueError as e:
        raise ValueError(f"model_arg {e}") from None
    return out


class LladaScaleLM(TemplateLM):
    """lm-evaluation-harness model for llada_scale checkpoints (see the module docstring); construct with the
    keyword arguments of :data:`MODEL_ARGS` (``lm_eval.simple_evaluate(model="llada_scale", model_args={...})``).

    Attributes a caller may use between ``simple_evaluate`` calls (``tools/eval_diffusion.py`` does): ``opts``
    (the parsed model arguments, read at every request), ``stats`` (``seconds`` of model time, ``tokens`` scored
    or generated, ``nfe`` forwards, accumulated since the caller last reset it) and ``progress`` (our bars)."""

    backend = "causal"  # lm-eval's _encode_pair: encode context + continuation together, then split

    def __init__(self, **kwargs):
        super().__init__()
        self.opts = opts = parse_model_args(kwargs)  # before any loading: bad arguments fail fast
        device = opts["device"]
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available; pass --device cpu")
        self.m = api.load(opts["pretrained"], device=device, dtype=opts["dtype"], tokenizer=opts["tokenizer"])
        self.tokenizer = self.m.tokenizer
        self._device = self.m.device
        self.stats = {"seconds": 0.0, "tokens": 0, "nfe": 0}  # model time, scored/generated tokens, forwards
        self.progress = True  # False: no progress bars of ours (tools/eval_diffusion.py --no_progress)

    def _generate_ids(self, prompts, **kwargs):
        """``Model.generate_ids``, counted in :attr:`stats` (generated tokens up to the stop id)."""
        res = self.m.generate_ids(prompts, **kwargs)
        self.stats["seconds"] += res.seconds
        self.stats["nfe"] += res.nfe
        self.stats["tokens"] += sum(len(t) for t in res.tokens)
        return res

    def _log_likelihood_ids(self, pairs, **kwargs):
        """``Model.log_likelihood_ids``, counted in :attr:`stats` (continuation tokens; forwards of ``batch_size``
        rows: one row per pair for AR models, ``mc_samples`` rows per pair for diffusion)."""
        t0 = time.perf_counter()
        out = self.m.log_likelihood_ids(pairs, **kwargs)
        rows = len(pairs) * (1 if self.m.causal else kwargs["mc_samples"])
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["nfe"] += math.ceil(rows / kwargs["batch_size"])
        self.stats["tokens"] += sum(len(a) for _, a in pairs)
        return out

    # ------------------------------------------------------------------ tokenizer glue
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self.m.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_text(chat_history, add_generation_prompt)

    def _likelihood_kwargs(self) -> dict:
        o = self.opts
        kw = dict(batch_size=o["batch_size"] if self.m.causal else 8 * o["batch_size"],
                  seed=o["seed"], allow_extrapolation=o["allow_extrapolation"])
        if not self.m.causal:
            kw.update(mc_samples=o["mc_samples"], cfg_scale=o["cfg_scale"],
                      estimator=None if o["likelihood"] == "auto" else o["likelihood"])
        return kw

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        if self.m.causal:
            out = self._log_likelihood_ids(pairs, return_greedy=True, progress=self.progress and not disable_tqdm,
                                            **self._likelihood_kwargs())
        else:
            lls = self._log_likelihood_ids(pairs, progress=self.progress and not disable_tqdm, **self._likelihood_kwargs())
            out = list(zip(lls, self._greedy(pairs)))
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return [(float(ll), bool(g)) for ll, g in out]

    def _greedy(self, pairs) -> list[bool]:
        """Diffusion is_greedy: the continuation decoded after the context, one token per step at temperature 0
        (low-confidence remasking; the block sampler for block-diffusion checkpoints), equals the target."""
        if not self.opts["check_greedy"]:
            return [False] * len(pairs)
        if not getattr(self, "_warned_greedy", False):
            self._warned_greedy = True
            print("llada_scale: check_greedy=true decodes every continuation for lm-eval's is_greedy, which only "
                  "loglikelihood tasks' acc uses (LAMBADA); for multiple-choice tasks pass check_greedy=false "
                  "(~5x faster)", file=sys.stderr, flush=True)
        out = [False] * len(pairs)
        by_len: dict[int, list[int]] = {}
        for i, (_, cont) in enumerate(pairs):
            by_len.setdefault(len(cont), []).append(i)
        for n, idx in by_len.items():
            block = None if self.m.sampler in ("block", "llada2") else n
            res = self._generate_ids([pairs[i][0] for i in idx], gen_length=n, steps=n, block_length=block,
                                      cfg_scale=self.opts["cfg_scale"] if self.m.sampler not in ("block", "llada2") else 0.0,
                                      batch_size=self.opts["batch_size"],
                                      allow_extrapolation=self.opts["allow_extrapolation"])
            for i, toks in zip(idx, res.tokens):
                out[i] = toks == truncate_at(pairs[i][1], self.m.stop_ids)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for j, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length - 1, context_len=1)):
                pairs.append((list(ctx), list(cont)))
                owner.append(j)
        lls = self._log_likelihood_ids(pairs, progress=self.progress and not disable_tqdm, **self._likelihood_kwargs())
        totals = [0.0] * len(requests)
        for j, ll in zip(owner, lls):
            totals[j] += float(ll)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        o = self.opts
        outs: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._gen_length(req.args[1]), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for gen_length, idx in groups.items():
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch
            for c in range(0, len(idx), o["batch_size"]):
                chunk = idx[c:c + o["batch_size"]]
                res = self._generate_ids([self.tok_encode(requests[i].args[0]) for i in chunk],
                                          gen_length=gen_length, steps=o["steps"], block_length=o["block_length"],
                                          sampler=o["sampler"], temperature=o["temperature"],
                                          cfg_scale=o["cfg_scale"], threshold=o["threshold"], cache=o["cache"],
                                          repetition_penalty=o["repetition_penalty"], seed=o["seed"],
                                          batch_size=o["batch_size"], allow_extrapolation=o["allow_extrapolation"],
                                          **self._edit_kwargs())
                for i, toks in zip(chunk, res.tokens):
                    context, gen_kwargs = requests[i].args
                    outs[i] = cut_at_stops(self.tok_decode(toks), gen_kwargs.get("until"))
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), outs[i])
                bar.update(len(chunk))
        bar.close()
        return outs

    def _edit_kwargs(self) -> dict:
        """The edit sampler's knobs (only with ``sampler=edit``: the other samplers refuse them)."""
        o = self.opts
        if (o["sampler"] or self.m.sampler) != "edit":
            return {}
        return {k: o[k] for k in ("editing_threshold", "max_post_steps", "preset", "top_k", "top_p")}

    def _gen_length(self, gen_kwargs: dict) -> int:
        """model_arg gen_length, else the request's max_gen_toks (lm-eval default 256); the LLaDA samplers need
        a multiple of the block length, so it is rounded up to one."""
        n = self.opts["gen_length"] or int(gen_kwargs.get("max_gen_toks", 256))
        if self.m.causal or (self.opts["sampler"] or self.m.sampler) in ("block", "edit", "llada2"):
            return n
        block = self.opts["block_length"] or min(32, n)
        return -(-n // block) * block


def cut_at_stops(text: str, until) -> str:
    """``text`` up to the first occurrence of any of ``until`` (a string or a list of strings)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min([text.find(s) for s in stops if s and s in text], default=len(text))
    return text[:cut]


if register_model is not None:
    register_model("llada_scale")(LladaScaleLM)


def _usage() -> str:
    rows = "\n".join(f"  {k:<20} {t.__name__:<5} default {d!r}: {h}" for k, (t, d, h) in MODEL_ARGS.items())
    return (f"{__doc__}\nmodel_args (key=value, comma separated):\n{rows}\n\nOther flags: lm-eval run --help "
            "(--tasks, --limit, --num_fewshot, --batch_size, --device, --output_path, --log_samples, "
            "--apply_chat_template, --gen_kwargs, --seed ...).")


def _index_our_tasks_only() -> None:
    """Only our task directory is indexed when only our tasks are requested: lm-eval's CLI otherwise indexes its
    ~15k built-in task YAMLs first (10-20 s on 2 cores). Without this the run is the same, only slower."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_llada_scale_only", False):
        return

    class OurTasks(base):
        _llada_scale_only = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = OurTasks


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI with ``--model llada_scale`` and our task directory; returns the exit status (2 and one
    line on stderr for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if register_model is None:
        print("error: lm-evaluation-harness is not installed: pip install 'llada_scale[eval]' (or lm-eval)",
              file=sys.stderr)
        return 2
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from llada_scale.checkpoint import CheckpointError, resolve_checkpoint
    from llada_scale.data.tokenizer import TokenizerError

    cli = HarnessCLI()
    args = cli._parser.parse_args(argv if argv[0] == "run" else ["run", *argv])
    try:
        if args.model not in (None, "llada_scale"):
            raise ValueError(f"--model {args.model}: this command evaluates llada_scale checkpoints (use lm-eval for "
                             "other models)")
        if args.limit is not None and args.limit < 0:
            raise ValueError(f"--limit must be >= 0 (a count, or a fraction below 1), got {args.limit:g}")
        model_args = dict(args.model_args or {})
        opts = parse_model_args(model_args)
        for name in ("batch_size", "device"):  # lm-eval passes these itself: a copy in model_args would clash
            if name in model_args:
                value = model_args.pop(name)
                if getattr(args, name, None) is None:
                    setattr(args, name, value)
        resolve_checkpoint(opts["pretrained"])
        if "batch_size" not in vars(args):
            args.batch_size = MODEL_ARGS["batch_size"][1]
        if args.device is None:
            args.device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        args.model, args.model_args = "llada_scale", model_args
        args.include_path = [TASKS_DIR] + ([args.include_path] if args.include_path else [])
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        tasks = [t for spec in (args.tasks or []) for t in str(spec).split(",") if t]
        if tasks and all(t.startswith("llada_") for t in tasks) and not args.include_path[1:]:
            _index_our_tasks_only()
        setup_logging()
        cli.execute(args)
    except (ValueError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
