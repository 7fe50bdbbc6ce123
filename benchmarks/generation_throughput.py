#!/usr/bin/env python
"""Generation throughput of the samplers on the same weights and prompts: LLaDA reference-equivalent decoding
(the exact sampler with steps = gen_length), Fast-dLLM threshold decoding, threshold with the prefix and the dual
KV cache, and AR decoding (the same weights run causally) with and without its KV cache.

For every mode and batch size it prints tokens/s (median and range over --repeats timed runs), the speed-up over
the exact sampler, forwards per generated token (NFE / gen_length) and the token agreement with the exact
sampler's output (same prompts, same batch). Without --checkpoint a random model of --preset is used with its
output head scaled by --head_scale so that its confidences are spread like a trained model's (a near-uniform
random head would make threshold decoding commit one token per step).

  python benchmarks/generation_throughput.py                                   # random small model, CPU
  python benchmarks/generation_throughput.py --checkpoint runs/sft_diffusion_tiny --allow_extrapolation
  python benchmarks/generation_throughput.py --checkpoint CKPT --device cuda --dtype bf16 --batch_sizes 1 16 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llada_scale.model.transformer import Transformer, preset  # noqa: E402
from llada_scale.sampling import ar_generate, diffusion_generate  # noqa: E402

QUESTIONS = ("Give three tips for staying healthy.", "What is the capital of France?", "Describe a sunset.",
             "Write a short poem about the sea.", "How do plants make food?", "Explain what a computer is.",
             "List four kinds of fruit.", "Why is the sky blue?")


def build(args):
    """(model, prompts, suppress ids, description)."""
    if args.checkpoint:
        import llada_scale

        m = llada_scale.load(args.checkpoint, device=args.device, dtype=args.dtype)
        if m.causal:
            raise SystemExit("error: --checkpoint must be a diffusion model (its weights also run causally for AR)")
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(max(args.batch_sizes))]
        sft = ((m.meta.get("config") or {}).get("objective") or {}).get("name") == "sft"
        prompts = [m.encode_prompt(t, chat=sft) for t in texts]  # chat template for SFT models, raw text otherwise
        return m.module, prompts, m.suppress_token_ids, f"checkpoint {args.checkpoint} ({'chat' if sft else 'raw'} prompts)"
    torch.manual_seed(0)
    cfg = preset(args.preset, vocab_size=args.vocab_size, causal=False, mask_token_id=args.vocab_size - 1,
                 max_seq_len=args.prompt_len + args.gen_length)
    m = Transformer(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(args.head_scale)
    m = m.to(device=args.device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or "fp32"]).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab_size - 64, (max(args.batch_sizes), args.prompt_len), generator=g).tolist()
    return m, prompts, [], f"random {args.preset} (head x{args.head_scale})"


def run(args) -> tuple[list[dict], str]:
    model, all_prompts, suppress, desc = build(args)
    mask = model.config.mask_token_id
    g, bl, th = args.gen_length, args.block_length, args.threshold
    common = dict(suppress_token_ids=suppress, allow_extrapolation=args.allow_extrapolation)
    modes = {
        "exact (steps = gen_length)": dict(steps=g),
        f"threshold {th}": dict(threshold=th),
        f"prefix cache + threshold {th}": dict(threshold=th, cache="prefix"),
        f"dual cache + threshold {th}": dict(threshold=th, cache="dual"),
        "AR, KV cache": "ar_cache",
        "AR, no cache": "ar",
    }

    def call(kw, prompts):
        if isinstance(kw, str):
            model.config.causal = True  # the same weights decoded left to right
            try:
                return ar_generate(model, prompts, max_new_tokens=g, use_cache=kw == "ar_cache", **common)
            finally:
                model.config.causal = False
        return diffusion_generate(model, prompts, mask_token_id=mask, gen_length=g, block_length=bl, **kw, **common)

    call(modes[f"dual cache + threshold {th}"], all_prompts[:1])  # warm-up
    if args.skip_ar_no_cache:
        del modes["AR, no cache"]
    rows = []
    for b in args.batch_sizes:
        prompts = all_prompts[:b]
        runs: dict[str, list] = {name: [] for name in modes}
        for _ in range(max(1, args.repeats)):  # round robin: load changes on a shared machine hit every mode alike
            for name, kw in modes.items():
                runs[name].append(call(kw, prompts))
        ref_tokens = runs["exact (steps = gen_length)"][0].tokens
        ref_tps = statistics.median(b * g / r.seconds for r in runs["exact (steps = gen_length)"])
        for name, rs in runs.items():
            tps = sorted(b * g / r.seconds for r in rs)
            agree = sum(x == y for a, r in zip(rs[0].tokens, ref_tokens) for x, y in zip(a, r)) / (b * g)
            rows.append({"mode": name, "batch": b, "tokens_per_s": statistics.median(tps), "min": tps[0],
                         "max": tps[-1], "speedup": statistics.median(tps) / ref_tps,
                         "forwards_per_token": rs[0].nfe / g, "agreement": agree, "extra": rs[0].extra})
            r = rows[-1]
            print(f"{name:34s} batch {b:3d}: {r['tokens_per_s']:8.1f} tok/s ({r['min']:.1f}-{r['max']:.1f}), "
                  f"x{r['speedup']:.1f}, {r['forwards_per_token']:.3f} fwd/token, agreement {agree:.3f}", flush=True)
    return rows, desc


def table(rows: list[dict]) -> str:
    lines = ["| mode | batch | tokens/s (median, range) | vs exact | forwards / token | agreement with exact |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | "
                     f"{r['speedup']:.1f}x | {r['forwards_per_token']:.3f} | {r['agreement']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a trained diffusion checkpoint (default: a random model)")
    ap.add_argument("--preset", default="small", help="model preset of the random model (default small)")
    ap.add_argument("--vocab_size", type=int, default=6464, help="vocabulary of the random model (default 6464)")
    ap.add_argument("--head_scale", type=float, default=50.0,
                    help="multiply the random model's head by this so that its confidences are spread like a "
                         "trained model's (default 50: threshold 0.9 then commits ~4 tokens per forward on the small "
                         "preset, in the range Fast-dLLM reports for LLaDA-8B)")
    ap.add_argument("--prompt_len", type=int, default=32, help="prompt tokens of the random model (default 32)")
    ap.add_argument("--gen_length", type=int, default=256, help="generated tokens per row (default 256)")
    ap.add_argument("--block_length", type=int, default=32, help="diffusion block length (default 32)")
    ap.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM confidence threshold (default 0.9)")
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per setting, modes interleaved (default 3; median and range)")
    ap.add_argument("--skip_ar_no_cache", action="store_true", help="skip the slow AR-without-cache rows")
    ap.add_argument("--allow_extrapolation", action="store_true",
                    help="let prompt + gen_length exceed the checkpoint's max_seq_len (speed is still meaningful)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="weights dtype (default fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.gen_length % args.block_length:
        print("error: gen_length must be a multiple of block_length", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        try:
            rows, desc = run(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"\nmodel: {desc}; device {args.device}, dtype {args.dtype or 'fp32'}, torch threads "
          f"{torch.get_num_threads()}, {args.repeats} runs each; gen_length {args.gen_length}, block "
          f"{args.block_length}, threshold {args.threshold}")
    print(table(rows))
    if args.output:
        from llada_scale.checkpoint import atomic_write_text

        atomic_write_text(args.output, json.dumps({"settings": vars(args), "model": desc, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
