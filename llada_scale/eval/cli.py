"""Command line of ``tools/eval_diffusion.py``: evaluate AR and masked-diffusion (LLaDA) checkpoints on WikiText-2, LAMBADA, PIQA, GSM8K and the poem
reversal set (see llada_scale/eval/tasks.py for what each number means, docs/EVAL.md for recipes).

  python tools/eval_diffusion.py --checkpoint runs/x/checkpoints/step00001000 --tasks piqa,lambada --limit 200
  python tools/eval_diffusion.py --checkpoint DIFF --compare AR --tasks gsm8k --limit 50   # side by side
  python tools/eval_diffusion.py --checkpoint DIFF --watch --prompt "床前明月光的下一句是什么？"  # live unmasking
  python tools/eval_diffusion.py --checkpoint BD --sampler block --block_length 32 --tasks gsm8k  # block diffusion

Diffusion sampler: --sampler llada (llada_scale.sampling.diffusion.diffusion_generate) or block (block-by-block decoding
with a KV cache, llada_scale.sampling.block.generate_blocks_batch); the default is block when the checkpoint's
run config trained with block diffusion, else llada.

Data parallel: launched by torchrun / deepspeed (WORLD_SIZE > 1) every rank loads the whole model (a ZeRO-3
checkpoint is merged per rank with zero_to_fp32 - evaluation needs no sharded parameters), takes a contiguous
slice of the examples, and rank 0 gathers the records, prints the table and writes --output.
Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import llada_scale.checkpoint as cio
from llada_scale.api import render_partial, special_ids
from llada_scale.sampling.block import generate_blocks_batch
from llada_scale.data import default_data
from llada_scale.eval.runner import run_task
from llada_scale.eval.tasks import (SAMPLERS, TASKS, EvalConfig, EvalError, ModelHandle, aggregate, check_lengths,
                                    default_sampler, load_examples, trained_block_length)
from llada_scale.sampling import diffusion_generate, truncate_at


# ------------------------------------------------------------------------------------------------ setup
def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def load_tokenizer(path: str | None, meta: dict, data: str, rank: int):
    from llada_scale.data.tokenizer import Tokenizer

    src = path or cio.tokenizer_path_from_meta(meta)
    if not src:
        src = os.path.join(data, "tokenizer", "minimind")
        if rank == 0:
            print(f"warning: the checkpoint names no usable tokenizer; using {src} (pass --tokenizer)", file=sys.stderr)
    return Tokenizer.load(src)


def make_handle(model, tokenizer, name: str, sampler: str = "llada", likelihood_block_length: int | None = None
                ) -> ModelHandle:
    """Wrap a loaded Transformer for the tasks: mask id, ids to suppress and stop ids
    (:func:`llada_scale.api.special_ids`), the diffusion sampler (``"llada"`` / ``"block"``; AR: ignored) and the
    likelihood estimator (``likelihood_block_length``: None = LLaDA's full-attention ELBO, else the block NELBO).

    Raises:
        EvalError: tokenizer larger than the model vocabulary; diffusion model without a usable mask id.
    """
    try:
        mask, suppress, stops = special_ids(model.config, tokenizer)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return ModelHandle(model=model, tokenizer=tokenizer, causal=model.config.causal, mask_token_id=mask,
                       suppress_token_ids=suppress, stop_ids=stops, name=name, sampler=sampler,
                       likelihood_block_length=likelihood_block_length, max_seq_len=model.config.max_seq_len)


def resolve_likelihood(flag: str, model, sampler: str | None) -> tuple[str | None, str]:
    """``(estimator, source)``: None for AR models (exact); else ``flag`` when it is ``full``/``block``
    ("flag"), else ``block`` for checkpoints decoded with the block sampler (trained with block diffusion) and
    ``full`` otherwise ("checkpoint")."""
    if model.config.causal:
        return None, "ar model"
    if flag != "auto":
        return flag, "flag"
    return ("block" if sampler in ("block", "llada2") else "full"), "checkpoint"


def resolve_sampler(flag: str | None, model) -> tuple[str | None, str]:
    """``(sampler, source)`` for a loaded model: None for AR models; else ``flag`` when given ("flag"), else
    :func:`default_sampler` of its checkpoint metadata ("checkpoint")."""
    if model.config.causal:
        return None, "ar model"
    if flag:
        return flag, "flag"
    if getattr(model.config, "model_type", None) == "llada2_moe":  # LLaDA2: the release's own decoding loop
        return "llada2", "checkpoint"
    return default_sampler(getattr(model, "checkpoint_meta", None)), "checkpoint"


# ------------------------------------------------------------------------------------------------ watch
def watch(h: ModelHandle, args, cfg: EvalConfig) -> dict:
    """Generate for one prompt and print the partially unmasked answer after every step."""
    if h.causal:
        raise EvalError("--watch shows diffusion unmasking; the checkpoint is an AR model")
    tok = h.tokenizer
    text = args.prompt or "床前明月光的下一句是什么？直接输出句子即可。"
    prompt = tok.render_prompt([{"role": "user", "content": text}]) if not args.no_chat else tok.encode(text)
    live = sys.stdout.isatty()
    frames = []

    def show(step, tokens, committed):
        s = render_partial(tok, tokens[0].tolist(), h.mask_token_id, args.mask_symbol)
        frames.append(s)
        header = f"step {step + 1}: +{int(committed[0].sum())} token(s)"
        if live:
            sys.stdout.write("\x1b[2J\x1b[H" + f"prompt: {text}\n{header}\n\n{s}\n")
            sys.stdout.flush()
        else:
            print(f"[{header}] {s}".replace("\n", "\\n"), flush=True)
        if args.watch_delay > 0:
            time.sleep(args.watch_delay)

    if h.sampler == "block":
        res = generate_blocks_batch(h.model, [prompt], mask_token_id=h.mask_token_id, gen_length=cfg.gen_length,
                                    block_length=cfg.block_length, steps_per_block=cfg.steps_per_block(),
                                    temperature=cfg.temperature, seeds=[cfg.seed],
                                    suppress_token_ids=h.suppress_token_ids, callback=show,
                                    repetition_penalty=cfg.repetition_penalty,
                                    allow_extrapolation=cfg.allow_extrapolation)
    else:
        res = diffusion_generate(h.model, [prompt], mask_token_id=h.mask_token_id, gen_length=cfg.gen_length,
                                 block_length=cfg.block_length, steps=cfg.steps, temperature=cfg.temperature,
                                 remasking=cfg.remasking, threshold=cfg.threshold, cfg_scale=cfg.cfg_scale,
                                 suppress_token_ids=h.suppress_token_ids, cache=cfg.cache,
                                 repetition_penalty=cfg.repetition_penalty,
                                 allow_extrapolation=cfg.allow_extrapolation,
                                 generator=torch.Generator().manual_seed(cfg.seed), callback=show)
    final = tok.decode(truncate_at(res.tokens[0], h.stop_ids))
    print(f"\nfinal ({res.steps} steps, {res.nfe} forwards, {res.seconds:.2f}s): {final}", flush=True)
    return {"prompt": text, "frames": frames, "final": final, "steps": res.steps, "nfe": res.nfe}


# ------------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(results: dict, names: list[str]) -> str:
    """results[task][model] = metrics dict -> one markdown table (a column per model, then tok/s per model)."""
    head = ["task", "metric"] + names + [f"{n} tok/s" for n in names] + [f"{n} NFE" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, per_model in results.items():
        keys = []
        for n in names:
            for k in per_model.get(n, {}):
                if k not in keys and k not in ("tokens_per_s", "seconds", "tokens", "nfe"):
                    keys.append(k)
        for i, k in enumerate(keys):
            row = [task if i == 0 else "", k] + [_fmt(per_model.get(n, {}).get(k, "-")) for n in names]
            row += [_fmt(per_model.get(n, {}).get("tokens_per_s", "-")) if i == 0 else "" for n in names]
            row += [_fmt(per_model.get(n, {}).get("nfe", "-")) if i == 0 else "" for n in names]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval_diffusion.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="model to evaluate: DeepSpeed tag dir (any ZeRO stage), consolidated dir/.safetensors or "
                         "exported HF dir; AR or diffusion is read from its config")
    ap.add_argument("--compare", metavar="AR_CKPT", default=None,
                    help="a second (AR) checkpoint run on the same prompts; the table shows both side by side")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)} (default all)")
    ap.add_argument("--limit", type=int, default=0, help="first N examples per task (0 = all; wikitext2: N chunks; "
                                                         "negative values are refused)")
    ap.add_argument("--data", default=None, help="shared data directory holding eval/ (default $LLADA_DATA or "
                                                 "../shared/data)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: the one the checkpoint names)")
    ap.add_argument("--batch_size", type=int, default=16, help="prompts / likelihood pairs per forward (default 16; "
                                                               "diffusion likelihood packs 8x as many MC rows)")
    ap.add_argument("--mc_samples", type=int, default=128, help="Monte Carlo samples per diffusion likelihood "
                                                                "(default 128, as LLaDA)")
    ap.add_argument("--gen_length", type=int, default=128, help="tokens generated for gsm8k (default 128)")
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                    help="diffusion sampler: llada2 (the LLaDA2 release's generate(), the default of LLaDA2 "
                         "checkpoints; --threshold, default 0.95), llada (LLaDA semi-AR blocks after the prompt, "
                         "left-padded batches) or "
                         "block (block-diffusion models: blocks from position 0, exact KV cache, equal-length "
                         "batches; no --threshold/--cfg_scale/--remasking random). Default: block when the "
                         "checkpoint's run config has block diffusion on (objective.block_length > 0 or a "
                         "block_schedule), else llada")
    ap.add_argument("--block_length", type=int, default=None,
                    help="diffusion block length of either sampler (default 32; with the block sampler the block "
                         "length the checkpoint was last trained with, if its run config records one)")
    ap.add_argument("--steps", type=int, default=128, help="diffusion steps for gen_length tokens (default 128; "
                                                           "poem scales it to its length; block sampler: "
                                                           "round(steps*block_length/gen_length) per block)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    ap.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                    help="diffusion remasking strategy (default low_confidence)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="Fast-dLLM confidence threshold for parallel decoding (default off: fixed steps)")
    ap.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance scale (default 0 = off)")
    ap.add_argument("--cache", default=None, choices=["prefix", "dual"],
                    help="Fast-dLLM's approximate KV cache for the llada sampler: prefix (cache the prompt and "
                         "finished blocks) or dual (also the masked suffix); refreshed at every block's first step. "
                         "Default off (exact); usually with --threshold. See docs/EVAL.md")
    ap.add_argument("--repetition_penalty", type=float, default=1.0,
                    help="HF-style repetition penalty on tokens already in the sequence, every sampler "
                         "(default 1 = off; > 1 discourages repeats)")
    ap.add_argument("--likelihood", default="auto", choices=["auto", "full", "block"],
                    help="diffusion likelihood estimator for wikitext2/piqa: full (LLaDA's Monte Carlo ELBO with "
                         "full attention) or block (the block NELBO of block diffusion, blocks of --block_length); "
                         "auto (default) = block for checkpoints trained with block diffusion, else full")
    ap.add_argument("--allow_extrapolation", action="store_true",
                    help="run prompts + generations longer than the model's max_seq_len (refused by default: "
                         "RoPE models degrade silently beyond their trained context)")
    ap.add_argument("--poem_gen_length", type=int, default=32, help="tokens generated per poem line (default 32)")
    ap.add_argument("--chunk_len", type=int, default=128, help="WikiText-2 chunk length in tokens (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of MC masks and sampling (default 0)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model weights dtype (default fp32)")
    ap.add_argument("--output", default=None, help="write results + all settings + per-example records as JSON here")
    ap.add_argument("--watch", action="store_true",
                    help="live view: show one prompt being unmasked step by step (diffusion only), then exit")
    ap.add_argument("--prompt", default=None, help="--watch prompt text (default: a poem question)")
    ap.add_argument("--no_chat", action="store_true", help="--watch: feed --prompt raw instead of via the chat template")
    ap.add_argument("--mask_symbol", default="░", help="--watch: how a still-masked token is shown (default ░)")
    ap.add_argument("--watch_delay", type=float, default=0.0, help="--watch: seconds to pause after each step")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    return ap


def run(args) -> int:
    cfg = EvalConfig(batch_size=args.batch_size, mc_samples=args.mc_samples, gen_length=args.gen_length,
                     block_length=args.block_length or 32, steps=args.steps, temperature=args.temperature,
                     remasking=args.remasking, threshold=args.threshold, cfg_scale=args.cfg_scale,
                     poem_gen_length=args.poem_gen_length, chunk_len=args.chunk_len, seed=args.seed,
                     cache=args.cache, repetition_penalty=args.repetition_penalty,
                     allow_extrapolation=args.allow_extrapolation, likelihood=args.likelihood)
    if args.limit < 0:
        raise EvalError(f"--limit must be >= 0 (0 = all examples), got {args.limit}")
    cfg.validate(args.sampler)  # sampler-specific checks again once the models (and default samplers) are known
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    data = args.data or default_data()
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    model = cio.build_model_from_checkpoint(args.checkpoint, dtype=args.dtype, device=str(device),
                                            progress=rank == 0 and not args.no_progress)
    meta = model.checkpoint_meta
    tok = load_tokenizer(args.tokenizer, meta, data, rank)
    main_name = "diffusion" if not model.config.causal else "ar"
    sampler, sampler_source = resolve_sampler(args.sampler, model)
    handles = [make_handle(model, tok, main_name, sampler or "llada")]
    metas = {main_name: meta}
    samplers, sources = {main_name: sampler}, {main_name: sampler_source}
    if args.compare:
        other = cio.build_model_from_checkpoint(args.compare, dtype=args.dtype, device=str(device),
                                                progress=rank == 0 and not args.no_progress)
        name = "ar" if other.config.causal else "diffusion"
        if name == main_name:
            name = f"{name}_compare"
        ident_a, ident_b = meta.get("tokenizer") or {}, other.checkpoint_meta.get("tokenizer") or {}
        if ident_a.get("sha256") and ident_b.get("sha256") and ident_a["sha256"] != ident_b["sha256"]:
            raise EvalError("--compare model uses a different tokenizer (sha256 differs); prompts would not match")
        samplers[name], sources[name] = resolve_sampler(args.sampler, other)
        handles.append(make_handle(other, tok, name, samplers[name] or "llada"))
        metas[name] = other.checkpoint_meta
    block_length_source = "flag" if args.block_length else "default"
    if not args.block_length:
        for h in handles:
            trained = trained_block_length(metas[h.name]) if samplers[h.name] == "block" else None
            if trained:
                cfg.block_length, block_length_source = trained, f"checkpoint ({h.name})"
                break
    likelihoods, likelihood_sources = {}, {}
    for h in handles:
        cfg.validate(None if h.causal else h.sampler)
        likelihoods[h.name], likelihood_sources[h.name] = resolve_likelihood(cfg.likelihood, h.model, samplers[h.name])
        h.likelihood_block_length = cfg.block_length if likelihoods[h.name] == "block" else None
    if rank == 0:
        for h in handles:
            if not h.causal:
                extra = f", {cfg.steps_per_block()} steps per block" if h.sampler in ("block", "llada2") else ""
                est = likelihoods[h.name] + (f" (blocks of {cfg.block_length})" if h.likelihood_block_length else "")
                print(f"[{h.name}] sampler {h.sampler} ({sources[h.name]}), block_length {cfg.block_length} "
                      f"({block_length_source}){extra}; likelihood {est} ({likelihood_sources[h.name]})", flush=True)
    sampler_settings = {"sampler": sampler, "sampler_source": sampler_source, "samplers": samplers,
                        "block_length": cfg.block_length, "block_length_source": block_length_source,
                        "steps_per_block": cfg.steps_per_block() if {"block", "llada2"} & set(samplers.values())
                        else None,
                        "likelihood": likelihoods[main_name], "likelihood_source": likelihood_sources[main_name],
                        "likelihoods": likelihoods}
    if args.watch:
        if rank == 0:
            out = watch(handles[0], args, cfg)
            if args.output:
                settings = {**vars(args), **sampler_settings}
                cio.atomic_write_text(args.output, json.dumps({"watch": out, "settings": settings}, indent=1,
                                                              ensure_ascii=False))
        return 0

    results: dict = {}
    records: dict = {}
    t_start = time.time()
    all_examples = {task: load_examples(task, data, tok, cfg, args.limit or None) for task in tasks}
    for task in tasks:  # refuse sequences beyond a model's context before any work
        for h in handles:
            check_lengths(task, all_examples[task], cfg, h.max_seq_len)
    for task in tasks:
        examples = all_examples[task]
        lo, hi = len(examples) * rank // world, len(examples) * (rank + 1) // world
        shard = examples[lo:hi]
        results[task], records[task] = {}, {}
        for h in handles:
            recs, stats = run_task(task, h, shard, cfg, progress=rank == 0 and not args.no_progress) if shard \
                else ([], {"seconds": 0.0, "tokens": 0, "nfe": 0})
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                torch.distributed.gather_object((recs, stats), gathered, dst=0)
                if rank == 0:
                    recs = sorted((r for g in gathered for r in g[0]), key=lambda r: r["index"])
                    stats = {"seconds": max(g[1]["seconds"] for g in gathered),
                             "tokens": sum(g[1]["tokens"] for g in gathered),
                             "nfe": sum(g[1]["nfe"] for g in gathered)}
            if rank == 0:
                m = aggregate(task, recs, h.causal)
                m["seconds"] = stats["seconds"]
                m["nfe"] = stats["nfe"]
                m["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
                results[task][h.name] = m
                records[task][h.name] = recs
                print(f"{task} [{h.name}]: " + ", ".join(f"{k}={_fmt(v)}" for k, v in m.items()), flush=True)
    if rank == 0:
        names = [h.name for h in handles]
        table = markdown_table(results, names)
        print("\n" + table, flush=True)
        if args.output:
            out = {
                "settings": {**vars(args), **sampler_settings, "data": data, "eval_config": cfg.to_dict(),
                             "world_size": world},
                "models": {n: {"path": metas[n]["path"], "format": metas[n]["format"], "step": metas[n].get("step"),
                               "sampler": samplers[n], "likelihood": likelihoods[n],
                               "model_config": next(h.model.config.to_dict() for h in handles if h.name == n)}
                           for n in names},
                "tokenizer": tok.identity(),
                "results": results, "table": table, "records": records,
                "seconds": time.time() - t_start,
            }
            cio.atomic_write_text(args.output, json.dumps(out, indent=1, ensure_ascii=False))
            print(f"wrote {args.output}", flush=True)
    if world > 1:
        torch.distributed.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from llada_scale.data.tokenizer import TokenizerError
    except ImportError:  # pragma: no cover
        TokenizerError = ValueError  # noqa: N806
    try:
        return run(args)
    except (EvalError, cio.CheckpointError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
