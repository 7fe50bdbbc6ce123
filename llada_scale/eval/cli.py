"""Command line of ``tools/eval_diffusion.py``: AR and masked-diffusion (LLaDA) checkpoints side by side on
WikiText-2, LAMBADA, PIQA, GSM8K and the poem reversal set, through lm-evaluation-harness, and a live unmasking
view (``--watch``).

  python tools/eval_diffusion.py --checkpoint runs/sft_diffusion_tiny runs/ar_pretrain_tiny --limit 40
  python tools/eval_diffusion.py --checkpoint DIFF --compare AR --tasks gsm8k --limit 50 --output res.json
  python tools/eval_diffusion.py --checkpoint DIFF --watch --prompt "床前明月光的下一句是什么？"

Every task is an lm-eval task of ``llada_scale/eval/lm_eval_tasks/`` (the definitions live only there), run with
the ``llada_scale`` model (:class:`llada_scale.eval.harness.LladaScaleLM`) by ``lm_eval.simple_evaluate``: one
model load per checkpoint, one ``simple_evaluate`` call per task (each task gets its own generation length and
``check_greedy``). This module only maps the short task names to those tasks, renames lm-eval's metric keys
(``acc,none`` -> ``acc``), prints one table with a column per checkpoint and writes ``--output``.

Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from llada_scale import api

# short name -> (lm-eval tasks with --chat, without --chat (--no_chat), {(lm-eval task or "", lm-eval key): our key},
#                generation task?). "" matches every lm-eval task of the group.
TASKS: dict[str, tuple[list[str], list[str], dict[tuple[str, str], str], bool]] = {
    "wikitext2": (["llada_wikitext2"], ["llada_wikitext2"],
                  {("", "word_perplexity,none"): "word_perplexity", ("", "byte_perplexity,none"): "byte_perplexity",
                   ("", "bits_per_byte,none"): "bits_per_byte"}, False),
    "lambada": (["llada_lambada"], ["llada_lambada"],
                {("", "acc,none"): "acc", ("", "perplexity,none"): "perplexity"}, False),
    "piqa": (["llada_piqa"], ["llada_piqa"], {("", "acc,none"): "acc", ("", "acc_norm,none"): "acc_norm"}, False),
    "gsm8k": (["llada_gsm8k_chat"], ["llada_gsm8k"],
              {("", "exact_match,flexible-extract"): "acc", ("", "exact_match,strict-match"): "acc_strict"}, True),
    "poem": (["llada_poem_forward", "llada_poem_reversal"], ["llada_poem_forward", "llada_poem_reversal"],
             {("llada_poem_forward", "exact_match,none"): "forward_acc",
              ("llada_poem_reversal", "exact_match,none"): "reversal_acc"}, True),
}
SAMPLER_CHOICES = (*api.SAMPLERS, "llada")


class EvalError(ValueError):
    """Unusable settings (unknown task, bad knob, a flag the model's sampler does not support)."""


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval_diffusion.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--checkpoint", nargs="+", required=True, metavar="CKPT",
      help="one or more checkpoints (DeepSpeed tag/run dir of any ZeRO stage, consolidated dir/.safetensors, exported "
           "HF or LLaDA dir); AR or diffusion is read from each. Each gets a column: ar, diffusion, then ar_2, ...")
    a("--compare", nargs="+", default=[], metavar="CKPT",
      help="more checkpoints for the same table (the same as listing them after --checkpoint)")
    a("--tasks", default=",".join(TASKS),
      help=f"comma-separated subset of {','.join(TASKS)} (default all); each is a task of llada_scale/eval/lm_eval_tasks")
    a("--limit", type=int, default=0,
      help="first N documents per task (0 = all; wikitext2: N whole articles of the 62; poem: N couplets, each in "
           "both directions)")
    a("--data", default=None, help="shared data directory holding eval/ (default $LLADA_DATA or ../shared/data)")
    a("--tokenizer", default=None, help="tokenizer dir/file (default: the one each checkpoint names)")
    a("--batch_size", type=int, default=16,
      help="prompts per generation forward, pairs per AR forward; diffusion likelihoods pack 8x as many Monte Carlo "
           "rows (default 16; at temperature 0 in fp32 the results do not depend on it)")
    a("--mc_samples", type=int, default=128,
      help="Monte Carlo samples per diffusion log-likelihood: wikitext2, piqa, lambada perplexity (default 128, "
           "LLaDA's)")
    a("--likelihood", default="auto", choices=["auto", "full", "block"],
      help="diffusion likelihood estimator: full (LLaDA's Monte Carlo ELBO with full attention) or block (the block "
           "NELBO a block-diffusion checkpoint was trained with); auto (default) = block for block-diffusion "
           "checkpoints, else full")
    a("--gen_length", type=int, default=128,
      help="tokens generated for gsm8k (default 128; the LLaDA samplers round it up to a multiple of --block_length); "
           "also --watch's answer length")
    a("--poem_gen_length", type=int, default=32, help="tokens generated per poem line (default 32)")
    a("--sampler", default=None, choices=SAMPLER_CHOICES,
      help="diffusion sampler: low_confidence / random (LLaDA remasking, fixed steps), threshold (Fast-dLLM parallel "
           "decoding), block (block-diffusion models: blocks from position 0, exact KV cache); llada = "
           "low_confidence. Default: block for checkpoints trained with block diffusion, else low_confidence "
           "(threshold when --threshold is given). AR models decode greedily left to right whatever this says")
    a("--block_length", type=int, default=None,
      help="diffusion block length (default: the trained one for block-diffusion checkpoints, else 32; a generation "
           "shorter than a block is one block)")
    a("--steps", type=int, default=None,
      help="denoising steps for --gen_length tokens (default --gen_length: one token per step); poem and --watch "
           "use the same tokens-per-step rate; the block sampler takes round(steps*block_length/gen_length) per block")
    a("--threshold", type=float, default=None,
      help="confidence threshold of the threshold sampler (implies --sampler threshold when no sampler is given; "
           "default 0.9 with --sampler threshold)")
    a("--editing_threshold", default=None,
      help="--sampler edit (LLaDA 2.1's editing decoder): rewrite a committed token whose argmax changed with at least "
           "this probability (0 = every changed token; none = no edits; default 0.5); see docs/EVAL.md section 9")
    a("--max_post_steps", type=int, default=None,
      help="--sampler edit: editing steps after a block has no mask left (default 16)")
    a("--preset", default=None, choices=["quality", "speed"],
      help="--sampler edit: LLaDA 2.1's presets, threshold / editing_threshold / max_post_steps = quality 0.7 / 0.5 / "
           "16, speed 0.5 / 0.0 / 16")
    a("--top_k", type=int, default=None, help="--sampler edit: top-k filtering at temperature > 0")
    a("--top_p", type=float, default=None, help="--sampler edit: nucleus filtering at temperature > 0")
    a("--cache", default=None, choices=["prefix", "dual"],
      help="Fast-dLLM's approximate KV cache for the LLaDA samplers (default off: exact); see docs/EVAL.md")
    a("--cfg_scale", type=float, default=0.0,
      help="classifier-free guidance of diffusion likelihoods and generation (default 0 = off; not with block)")
    a("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    a("--repetition_penalty", type=float, default=1.0,
      help="HF-style repetition penalty in every sampler (default 1 = off; > 1 discourages repeats)")
    a("--no_chat", action="store_true",
      help="feed prompts raw instead of through the tokenizer's chat template: gsm8k then runs llada_gsm8k "
           "('Question: ...\\nAnswer:') instead of llada_gsm8k_chat (the question as the user message), poem its "
           "questions raw, --watch its --prompt raw. Likelihood tasks never use the template")
    a("--allow_extrapolation", action="store_true",
      help="run sequences longer than the model's max_seq_len (refused by default: RoPE models degrade beyond "
           "their trained context)")
    a("--seed", type=int, default=0, help="seed of Monte Carlo noise and sampling (default 0)")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="model weights dtype (default fp32)")
    a("--device", default=None, help="cpu, cuda, cuda:1 (default cuda when available, else cpu)")
    a("--output", default=None,
      help="write results, settings, models, the table and lm-eval's per-document records as JSON here")
    a("--watch", action="store_true",
      help="live view: show one prompt being unmasked step by step (diffusion only, first checkpoint), then exit")
    a("--prompt", default=None, help="--watch prompt text (default: a poem question)")
    a("--mask_symbol", default="░", help="--watch: how a still-masked token is shown (default ░)")
    a("--watch_delay", type=float, default=0.0, help="--watch: seconds to pause after each step")
    a("--no_progress", action="store_true",
      help="no progress bars of the model and no lm-eval log lines below ERROR (lm-eval's own short bars remain)")
    return ap


def check_args(args) -> list[str]:
    """Validate the flags that need no model; returns the task names. Raises :class:`EvalError`."""
    if args.limit < 0:
        raise EvalError(f"--limit must be >= 0 (0 = all documents), got {args.limit}")
    for name in ("batch_size", "mc_samples", "gen_length", "poem_gen_length"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("block_length", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvalError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise EvalError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.temperature < 0 or args.cfg_scale < 0 or not args.repetition_penalty > 0:
        raise EvalError("--temperature and --cfg_scale must be >= 0 and --repetition_penalty > 0")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    return tasks


EDIT_FLAGS = ("editing_threshold", "max_post_steps", "preset", "top_k", "top_p")


def edit_kwargs(args) -> dict:
    """The edit sampler's flags that were given, as :meth:`llada_scale.api.Model.generate_ids` takes them."""
    out = {k: getattr(args, k) for k in EDIT_FLAGS if getattr(args, k) is not None}
    if "editing_threshold" in out:
        et = str(out["editing_threshold"]).strip().lower()
        try:
            out["editing_threshold"] = None if et == "none" else float(et)
        except ValueError:
            raise EvalError(f"--editing_threshold must be a number or none, got {et!r}") from None
    return out


def sampler_for(args, m: api.Model) -> str | None:
    """The diffusion sampler of ``m`` (None for AR models). Raises :class:`EvalError` for flags it does not take."""
    if m.causal:
        return None
    s = {"llada": "low_confidence"}.get(args.sampler, args.sampler)
    if s is None:
        s = "threshold" if args.threshold is not None and m.sampler not in ("block", "llada2") else m.sampler
    if s in ("block", "llada2", "edit"):  # exact KV caches, no CFG; llada2 and edit take --threshold
        bad = [f for f, on in (("--threshold", args.threshold is not None and s == "block"),
                               ("--cfg_scale", args.cfg_scale > 0), ("--cache", args.cache is not None)) if on]
        if bad:
            raise EvalError(f"the {s} sampler does not support {', '.join(bad)}; use --sampler low_confidence or "
                            "threshold")
    edit_flags = [f"--{k}" for k in EDIT_FLAGS if getattr(args, k) is not None]
    if edit_flags and s != "edit":
        raise EvalError(f"{', '.join(edit_flags)} only apply to --sampler edit (the sampler here is {s})")
    return s


def gen_settings(args, m: api.Model, sampler: str | None, gen_length: int) -> dict:
    """``gen_length``/``steps``/``block_length`` model args for a generation of ``gen_length`` tokens: the
    tokens-per-step rate of ``--steps`` for ``--gen_length``; the LLaDA samplers need whole blocks and a step count
    divisible by the number of blocks."""
    block = args.block_length or (m.block_length if sampler in ("block", "llada2", "edit") else None) or 32
    if sampler not in (None, "block", "edit"):
        block = min(block, gen_length)
        gen_length = -(-gen_length // block) * block
    steps = gen_length if args.steps is None else max(1, round(gen_length * args.steps / args.gen_length))
    if sampler not in (None, "block", "edit"):
        nb = gen_length // block
        steps = -(-steps // nb) * nb
    return {"gen_length": gen_length, "steps": steps, "block_length": block}


# ------------------------------------------------------------------------------------------------ watch
def watch(m: api.Model, args) -> dict:
    """Generate for one prompt and print the partially unmasked answer after every step."""
    if m.causal:
        raise EvalError("--watch shows diffusion unmasking; the checkpoint is an AR model")
    text = args.prompt or "床前明月光的下一句是什么？直接输出句子即可。"
    prompt = m.encode_prompt(text, chat=not args.no_chat)
    sampler = sampler_for(args, m)
    g = gen_settings(args, m, sampler, args.gen_length)
    live = sys.stdout.isatty()
    frames = []

    def show(step, tokens, committed, edited=None):  # edited: the edit sampler's rewritten positions
        s = api.render_partial(m.tokenizer, tokens[0].tolist(), m.mask_token_id, args.mask_symbol)
        frames.append(s)
        header = f"step {step + 1}: +{int(committed[0].sum())} token(s)"
        if edited is not None:
            header += f", {int(edited[0].sum())} edited"
        if live:
            sys.stdout.write("\x1b[2J\x1b[H" + f"prompt: {text}\n{header}\n\n{s}\n")
            sys.stdout.flush()
        else:
            print(f"[{header}] {s}".replace("\n", "\\n"), flush=True)
        if args.watch_delay > 0:
            time.sleep(args.watch_delay)

    res = m.generate_ids([prompt], **g, sampler=sampler, temperature=args.temperature, cfg_scale=args.cfg_scale,
                         threshold=args.threshold, cache=args.cache, repetition_penalty=args.repetition_penalty,
                         seed=args.seed, allow_extrapolation=args.allow_extrapolation, callback=show,
                         **(edit_kwargs(args) if sampler == "edit" else {}))
    final = m.decode(res.tokens[0])
    print(f"\nfinal ({res.steps} steps, {res.nfe} forwards, {res.seconds:.2f}s): {final}", flush=True)
    return {"prompt": text, "frames": frames, "final": final, "steps": res.steps, "nfe": res.nfe,
            "sampler": sampler, **g}


# ------------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


STATS = ("n", "seconds", "tokens", "nfe", "tokens_per_s")


def markdown_table(results: dict, names: list[str]) -> str:
    """results[task][model] = metrics dict -> one markdown table (a column per model, then tok/s and NFE per
    model; ``*_stderr`` keys are shown as ``± x`` next to their metric)."""
    head = ["task", "metric"] + names + [f"{n} tok/s" for n in names] + [f"{n} NFE" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, per_model in results.items():
        keys = []
        for n in names:
            keys += [k for k in per_model.get(n, {}) if k not in keys and k not in STATS and not k.endswith("_stderr")]
        for i, k in enumerate(keys):
            cells = []
            for n in names:
                m = per_model.get(n, {})
                err = m.get(f"{k}_stderr")
                cells.append(_fmt(m.get(k, "-")) + (f" ± {_fmt(err)}" if isinstance(err, float) else ""))
            row = [task if i == 0 else "", k] + cells
            row += [_fmt(per_model.get(n, {}).get("tokens_per_s", "-")) if i == 0 else "" for n in names]
            row += [_fmt(per_model.get(n, {}).get("nfe", "-")) if i == 0 else "" for n in names]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _records(samples: list[dict], metrics: set[str]) -> list[dict]:
    """lm-eval's per-document samples, reduced to what is worth keeping (JSON-serialisable)."""
    keep = ("doc_id", "target", "filter", "filtered_resps")
    return [{**{k: s[k] for k in keep if k in s}, **{k: s[k] for k in metrics if k in s}} for s in samples]


# ------------------------------------------------------------------------------------------------ run
def evaluate_task(lm, task: str, args, task_manager) -> tuple[dict, list]:
    """Run one short task on a loaded :class:`LladaScaleLM`: ``(metrics, records)``."""
    import lm_eval

    chat_tasks, raw_tasks, keys, generation = TASKS[task]
    names = raw_tasks if args.no_chat else chat_tasks
    m = lm.m
    lm.opts["check_greedy"] = task == "lambada"  # only lambada's acc reads is_greedy
    if generation:
        length = args.gen_length if task == "gsm8k" else args.poem_gen_length
        lm.opts.update(gen_settings(args, m, lm.opts["sampler"] or m.sampler if not m.causal else None, length))
    lm.stats = {"seconds": 0.0, "tokens": 0, "nfe": 0}
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit or None, task_manager=task_manager,
                                  apply_chat_template=generation and not args.no_chat, log_samples=True,
                                  bootstrap_iters=1000, random_seed=args.seed, numpy_random_seed=args.seed,
                                  torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    metrics: dict = {"n": max(out["n-samples"][t]["effective"] for t in names)}
    for (t, key), ours in keys.items():
        for name in ([t] if t else names):
            res = out["results"][name]
            metrics[ours] = res[key]
            err = res.get(key.replace(",", "_stderr,", 1))
            if isinstance(err, float):
                metrics[f"{ours}_stderr"] = err
    s = lm.stats
    metrics.update(seconds=s["seconds"], tokens=s["tokens"], nfe=s["nfe"],
                   tokens_per_s=s["tokens"] / s["seconds"] if s["seconds"] > 0 else 0.0)
    metric_names = {k.split(",")[0] for (_, k) in keys}
    records = {n: _records(out["samples"][n], metric_names) for n in names}
    return metrics, (records[names[0]] if len(names) == 1 else records)


def model_args(args, path: str) -> dict:
    """``LladaScaleLM`` keyword arguments for ``path`` from the flags (see :data:`harness.MODEL_ARGS`)."""
    sampler = {"llada": "low_confidence"}.get(args.sampler, args.sampler)  # None: per model, by sampler_for
    return {"pretrained": path, "tokenizer": args.tokenizer, "dtype": args.dtype, "device": args.device,
            "batch_size": args.batch_size, "mc_samples": args.mc_samples, "cfg_scale": args.cfg_scale,
            "likelihood": args.likelihood, "sampler": sampler, "threshold": args.threshold, **edit_kwargs(args),
            "cache": args.cache, "temperature": args.temperature, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed, "allow_extrapolation": args.allow_extrapolation, "data": args.data}


def run(args) -> int:
    tasks = check_args(args)
    paths = list(args.checkpoint) + list(args.compare)
    if args.watch:
        m = api.load(paths[0], device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
        out = watch(m, args)
        if args.output:
            from llada_scale.checkpoint import atomic_write_text

            atomic_write_text(args.output, json.dumps({"watch": out, "settings": vars(args)}, indent=1,
                                                      ensure_ascii=False))
        return 0
    try:
        from lm_eval.tasks import TaskManager

        from llada_scale.eval.harness import TASKS_DIR, LladaScaleLM, parse_model_args
    except ImportError:
        raise EvalError("lm-evaluation-harness is not installed: pip install 'llada_scale[eval]' (or lm-eval)") from None
    from llada_scale.checkpoint import atomic_write_text, resolve_checkpoint
    from llada_scale.data import default_data

    data = args.data or default_data()
    for p in paths:  # bad flags and missing checkpoints fail before any model loads
        parse_model_args({k: v for k, v in model_args(args, p).items() if v is not None})
        resolve_checkpoint(p)
    task_manager = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata={"data": data})
    t_start = time.time()
    results: dict = {t: {} for t in tasks}
    records: dict = {t: {} for t in tasks}
    models: dict = {}
    tokenizer = None
    for path in paths:
        lm = LladaScaleLM(**{k: v for k, v in model_args(args, path).items() if v is not None})
        lm.progress = not args.no_progress
        m = lm.m
        kind = "ar" if m.causal else "diffusion"
        name = kind if kind not in models else f"{kind}_{1 + sum(n.startswith(kind) for n in models)}"
        sampler = sampler_for(args, m)
        lm.opts["sampler"] = sampler
        likelihood = None if m.causal else (m.estimator if args.likelihood == "auto" else args.likelihood)
        models[name] = {"path": m.meta.get("path", path), "format": m.meta.get("format"), "step": m.meta.get("step"),
                        "sampler": sampler, "likelihood": likelihood,
                        "block_length": gen_settings(args, m, sampler, args.gen_length)["block_length"]
                        if sampler else None, "model_config": m.config.to_dict()}
        if tokenizer is None:
            tokenizer = m.tokenizer.identity()
        elif tokenizer.get("sha256") != m.tokenizer.identity().get("sha256"):
            raise EvalError(f"{path} uses another tokenizer than {paths[0]} (sha256 differs); prompts would not match")
        if sampler:
            print(f"[{name}] {path}: sampler {sampler}, block_length {models[name]['block_length']}, likelihood "
                  f"{likelihood}", flush=True)
        for task in tasks:
            results[task][name], records[task][name] = evaluate_task(lm, task, args, task_manager)
            print(f"{task} [{name}]: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[task][name].items()),
                  flush=True)
        del lm, m
    table = markdown_table(results, list(models))
    print("\n" + table, flush=True)
    if args.output:
        out = {"settings": {**vars(args), "data": data, "lm_eval_tasks": {t: TASKS[t][1 if args.no_chat else 0]
                                                                          for t in tasks}},
               "models": models, "tokenizer": tokenizer, "results": results, "table": table, "records": records,
               "seconds": time.time() - t_start}
        atomic_write_text(args.output, json.dumps(out, indent=1, ensure_ascii=False, default=str))
        print(f"wrote {args.output}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llada_scale.checkpoint import CheckpointError
    from llada_scale.data.tokenizer import TokenizerError

    level = logging.getLogger("lm_eval").level
    if args.no_progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        return run(args)
    except (EvalError, CheckpointError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("lm_eval").setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
