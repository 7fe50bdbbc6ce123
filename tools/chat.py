#!/usr/bin/env python
"""Chat with a llada_scale checkpoint in the terminal: multi-turn, rendered with the tokenizer's chat template,
every sampler flag of llada_scale.load(...).generate; --watch shows a diffusion model's answer unmasking step by
step (as LLaDA's chat.py and its demo do).

  python tools/chat.py runs/sft_diffusion_tiny
  python tools/chat.py out/dp-10k --sampler threshold --cache dual --gen_length 128 --watch
  python tools/chat.py runs/llada2_bd_sft_tiny --sampler edit --preset speed --watch   # LLaDA 2.1 editing
  printf 'What is 2+2?\\nAnd times 3?\\n' | python tools/chat.py CKPT      # one answer per input line

Type a message and press Enter. /reset forgets the conversation, /quit (or Ctrl-D, or Ctrl-C at the prompt)
exits; Ctrl-C while an answer is being generated cancels that answer and returns to the prompt, keeping the
conversation. When the conversation no longer fits the model's max_seq_len together with --gen_length, the
oldest turns are dropped (said on screen). Errors print one line: a bad checkpoint or sampling flag exits with
status 2; a bad message (e.g. bytes that are not UTF-8) is reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llada_scale  # noqa: E402
from llada_scale.api import SAMPLERS, render_partial  # noqa: E402
from llada_scale.sampling import validate  # noqa: E402
from llada_scale.sampling.diffusion import CACHES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="DeepSpeed tag or run dir, consolidated dir/.safetensors or exported HF dir")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: the one the checkpoint names)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="weights dtype (default: bf16 on CUDA)")
    ap.add_argument("--system", default=None, help="a system message opening the conversation")
    ap.add_argument("--gen_length", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per answer (default gen_length)")
    ap.add_argument("--block_length", type=int, default=None,
                    help="block length (default: the trained one for block diffusion, else 32)")
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                    help="low_confidence / random remasking, threshold (Fast-dLLM parallel decoding) or block "
                         "(block-diffusion models); default from the checkpoint. AR models decode left to right")
    ap.add_argument("--threshold", type=float, default=None,
                    help="confidence threshold of --sampler threshold (default 0.9), edit (default 0.7) and llada2 (default 0.95)")
    ap.add_argument("--editing_threshold", type=_threshold_or_none, default=0.5,
                    help="--sampler edit: T2T threshold (default 0.5; 0 = edit every changed token; none = no edits)")
    ap.add_argument("--max_post_steps", type=int, default=16, help="--sampler edit: editing steps after a block "
                    "has no mask left (default 16)")
    ap.add_argument("--preset", default=None, choices=["quality", "speed"],
                    help="--sampler edit: LLaDA 2.1's presets (quality 0.7/0.5/16, speed 0.5/0.0/16; see docs/EVAL.md)")
    ap.add_argument("--top_k", type=int, default=None, help="--sampler edit: top-k filtering (temperature > 0)")
    ap.add_argument("--top_p", type=float, default=None, help="--sampler edit: nucleus filtering (temperature > 0)")
    ap.add_argument("--cache", default=None, choices=[c for c in CACHES if c],
                    help="Fast-dLLM's approximate KV cache (default off = exact); see docs/EVAL.md")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    ap.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance (default 0 = off)")
    ap.add_argument("--repetition_penalty", type=float, default=1.0, help="HF-style penalty (default 1 = off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--watch", action="store_true", help="show each answer unmasking step by step (diffusion)")
    ap.add_argument("--watch_delay", type=float, default=0.0, help="--watch: seconds to pause after each step")
    ap.add_argument("--mask_symbol", default="░", help="--watch: how a still-masked token is shown (default ░)")
    return ap


def _threshold_or_none(v: str) -> float | None:
    if v.strip().lower() == "none":
        return None
    return float(v)


def fit(model, messages: list[dict], gen_length: int) -> tuple[list[dict], int]:
    """Drop the oldest user/assistant turns (never the system message or the last user turn) until the rendered
    conversation plus ``gen_length`` fits ``max_seq_len``; returns ``(messages, turns dropped)``."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    body = messages[len(head):]
    dropped = 0
    while len(body) > 1 and len(model.encode_prompt(head + body)) + gen_length > model.config.max_seq_len:
        body = body[2:] if len(body) > 2 else body[1:]
        dropped += 1
    return head + body, dropped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate.check_generation(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                                  temperature=args.temperature, cfg_scale=args.cfg_scale, threshold=args.threshold,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed, batch_size=1)
        validate.check_float("watch_delay", args.watch_delay, low=0)
    except ValueError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become lone surrogates, reported per line
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        model = llada_scale.load(args.checkpoint, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    watch = args.watch and not model.causal
    if args.watch and model.causal:
        print("note: --watch shows diffusion unmasking; this AR model's answers are printed whole", file=sys.stderr)
    tty_in, tty_out = sys.stdin.isatty(), sys.stdout.isatty()

    def show(step, tokens, committed, edited=None):
        partial = render_partial(model.tokenizer, tokens[0].tolist(), model.mask_token_id, args.mask_symbol)
        partial = partial.replace("\n", "⏎")
        if edited is not None and bool(edited[0].any()):  # the editing sampler rewrote committed tokens
            new = [model.tokenizer.decode([t]) for t in tokens[0][edited[0]].tolist()]
            partial += f"  [edited {len(new)}: {' '.join(repr(w) for w in new)}]"
        if tty_out:
            sys.stdout.write(f"\r\x1b[2Kmodel [{step + 1}]> {partial}")
        else:
            sys.stdout.write(f"[step {step + 1}] {partial}\n")
        sys.stdout.flush()
        if args.watch_delay > 0:
            time.sleep(args.watch_delay)

    gen = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, sampler=args.sampler,
               threshold=args.threshold, cache=args.cache, temperature=args.temperature, cfg_scale=args.cfg_scale,
               repetition_penalty=args.repetition_penalty, seed=args.seed, callback=show if watch else None)
    if args.sampler == "edit":
        gen.update(editing_threshold=args.editing_threshold, max_post_steps=args.max_post_steps, preset=args.preset,
                   top_k=args.top_k, top_p=args.top_p)

    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if tty_in:
        print(f"{model!r}. /reset clears the conversation, /quit exits.")
    while True:
        try:
            line = input("you> ") if tty_in else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not tty_in and not line:
            break
        text = line.strip()
        if not text:
            continue
        try:
            validate.check_text("message", text)
        except ValueError as e:
            print(f"error: {e}; message skipped", file=sys.stderr)
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        messages, dropped = fit(model, history + [{"role": "user", "content": text}], args.gen_length)
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to fit max_seq_len {model.config.max_seq_len})")
        try:
            answer = model.chat(messages, **gen)
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # cancel this answer only; the conversation stays as it was
            if watch and tty_out:
                sys.stdout.write("\r\x1b[2K")
            print("\n(answer cancelled; Ctrl-C at the prompt or /quit exits)", flush=True)
            continue
        if watch and tty_out:
            sys.stdout.write("\r\x1b[2K")
        print(f"model> {answer}", flush=True)
        history = messages + [{"role": "assistant", "content": answer}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
