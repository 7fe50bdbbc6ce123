#!/usr/bin/env python
"""Generation throughput: tokens/s and forward passes of diffusion sampling (fixed steps vs Fast-dLLM threshold
decoding) and AR decoding (no KV cache) for batch sizes 1, 2, 4, ... 64.

By default a random model of the ``tiny`` preset is used with its output head scaled by ``--head_scale`` so
that its predictions are confident like a trained model's (with a near-uniform random head, threshold
decoding would commit one token per step and look like fixed steps). Pass ``--checkpoint`` to measure a
real model. Batch sizes stop growing once one call takes longer than ``--max_call_seconds``. Prints a
markdown table (and writes it as JSON with ``--output``).

  python benchmarks/generation_throughput.py                     # CPU defaults
  python benchmarks/generation_throughput.py --checkpoint runs/x/consolidated --device cuda --max_batch 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llada_scale.sampling import ar_generate, diffusion_generate  # noqa: E402
from llada_scale.model.transformer import Transformer, preset  # noqa: E402


def build_model(args, causal: bool) -> Transformer:
    if args.checkpoint:
        from llada_scale.checkpoint import build_model_from_checkpoint

        m = build_model_from_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device, progress=False)
        m.config.causal = causal  # same weights, both decoding modes (the mask differs only)
        return m
    torch.manual_seed(0)
    cfg = preset(args.preset, vocab_size=args.vocab_size, causal=causal, mask_token_id=args.vocab_size - 1)
    m = Transformer(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(args.head_scale)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return m.to(device=args.device, dtype=dt).eval()


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab - 64, (batch, length), generator=g).tolist()


def run(args) -> list[dict]:
    rows = []
    dm = build_model(args, causal=False)
    mask = dm.config.mask_token_id
    vocab = dm.config.vocab_size
    modes = [("diffusion fixed", dict(steps=args.steps, threshold=None)),
             (f"diffusion threshold {args.threshold}", dict(steps=args.steps, threshold=args.threshold))]
    if not args.no_ar:
        modes.append(("AR (no KV cache)", None))
    ar = build_model(args, causal=True) if not args.no_ar else None
    # warm-up (first-call allocations / kernel selection)
    diffusion_generate(dm, prompts_for(1, args.prompt_len, vocab), mask_token_id=mask, gen_length=args.block_length,
                       block_length=args.block_length, steps=args.block_length)
    for name, kw in modes:
        b = 1
        while b <= args.max_batch:
            prompts = prompts_for(b, args.prompt_len, vocab)
            res = None
            for _ in range(max(1, args.repeats)):
                if kw is None:
                    r = ar_generate(ar, prompts, max_new_tokens=args.gen_length)
                else:
                    r = diffusion_generate(dm, prompts, mask_token_id=mask, gen_length=args.gen_length,
                                           block_length=args.block_length, **kw)
                res = r if res is None or r.seconds < res.seconds else res
            toks = b * args.gen_length
            rows.append({"mode": name, "batch": b, "tokens_per_s": toks / res.seconds, "nfe": res.nfe,
                         "tokens_per_forward": toks / res.nfe / b, "seconds": res.seconds})
            print(f"{name:28s} batch {b:3d}: {toks / res.seconds:9.1f} tok/s, {res.nfe:3d} forwards, "
                  f"{res.seconds:.2f}s", flush=True)
            if res.seconds > args.max_call_seconds:
                break
            b *= 2
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | batch | tokens/s | forwards (NFE) | tokens per forward per row | s / call |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['nfe']} | "
                     f"{r['tokens_per_forward']:.2f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="measure this model instead of a random one")
    ap.add_argument("--preset", default="tiny", help="model preset of the random model (default tiny)")
    ap.add_argument("--vocab_size", type=int, default=6464, help="vocabulary of the random model (default 6464)")
    ap.add_argument("--head_scale", type=float, default=150.0,
                    help="multiply the random model's head by this so that its confidences are spread like a "
                         "trained model's (default 150: threshold 0.9 then needs ~0.6 forwards per token)")
    ap.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row (default 32)")
    ap.add_argument("--gen_length", type=int, default=64, help="generated tokens per row (default 64)")
    ap.add_argument("--block_length", type=int, default=32, help="diffusion block length (default 32)")
    ap.add_argument("--steps", type=int, default=64, help="fixed diffusion steps (default 64 = 1 token/step)")
    ap.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM confidence threshold (default 0.9)")
    ap.add_argument("--max_batch", type=int, default=64, help="largest batch size (default 64)")
    ap.add_argument("--max_call_seconds", type=float, default=20.0,
                    help="stop doubling the batch once one call takes longer than this (default 20)")
    ap.add_argument("--no_ar", action="store_true", help="skip the AR rows")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 avoids oversubscription on a busy machine)")
    ap.add_argument("--repeats", type=int, default=1, help="time each setting this many times, keep the fastest")
    ap.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.gen_length % args.block_length or args.steps % (args.gen_length // args.block_length):
        print("error: gen_length must be a multiple of block_length and steps of the number of blocks", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = run(args)
    print()
    print(f"model: {'checkpoint ' + args.checkpoint if args.checkpoint else 'random ' + args.preset}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, best of {args.repeats}, prompt {args.prompt_len}, "
          f"gen_length {args.gen_length}, block {args.block_length}, fixed steps {args.steps}")
    print(table(rows))
    if args.output:
        from llada_scale.checkpoint import atomic_write_text

        atomic_write_text(args.output, json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
