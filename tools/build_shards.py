#!/usr/bin/env python
"""Tokenize jsonl / jsonl.gz files into llada_scale WebDataset token shards.

Example::

    python tools/build_shards.py --input ../shared/data/pretrain/en_classics.jsonl.gz \
        --tokenizer ../shared/data/tokenizer/minimind --output data/en_classics --kind pretrain

Exit status: 0 on success, 2 on bad input or a full disk (one ``error: ...`` line on stderr; a failed build
leaves an earlier build in --output as it was).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_scale.data.build import build_shards  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Tokenize jsonl/jsonl.gz documents into deterministic WebDataset tar shards plus index.json "
                    "(format llada_scale.shards.v1) for llada_scale.data.loader.PackedDataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input .jsonl or .jsonl.gz files, read in the order given. Pretraining rows are "
                        '{"text": str}; SFT rows are {"conversations": [{"role": ..., "content": ...}, ...]}')
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer directory (tokenizer.json [+ tokenizer_config.json]), tokenizer.json file, "
                        "or SentencePiece .model file; the <|mask|> token is added if absent")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory for {train,val}-NNNNNN.tar and index.json (created if missing)")
    p.add_argument("--kind", required=True, choices=["pretrain", "sft"],
                   help="pretrain: plain documents, packed by the loader; sft: chat conversations rendered with "
                        "the tokenizer's chat template, stored with an assistant-token mask")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val_fraction", type=float, default=0.01,
                   help="fraction of (shuffled) documents put in the val split (at least 1 if > 0)")
    g.add_argument("--val_docs", type=int, default=None, metavar="N",
                   help="exact number of documents in the val split (overrides --val_fraction)")
    p.add_argument("--shard_tokens", type=int, default=1_000_000,
                   help="approximate tokens per shard: a shard is closed once it reaches this many. Use smaller "
                        "shards when training on many ranks x loader workers (each needs at least one shard)")
    p.add_argument("--max_docs", type=int, default=None, metavar="N",
                   help="stop after N valid documents (in input order, before shuffling)")
    p.add_argument("--max_tokens", type=int, default=None, metavar="N",
                   help="stop once N tokens have been collected (in input order, before shuffling)")
    p.add_argument("--num_workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenizer processes (output is identical for any value)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the document shuffle and train/val split; same inputs + seed = identical bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing shard directory (one that has index.json)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first malformed row instead of reporting and skipping it")
    p.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")
    p.add_argument("--mask_token", default=None,
                   help="mask token string (default: tokenizer_config.json's mask_token, else <|mask|>, added after "
                        "the vocabulary when missing); the trainer's tokenizer resolves it the same way")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = parse_args(argv)
    try:
        summary = build_shards(
            args.input, args.tokenizer, args.output, args.kind, val_fraction=args.val_fraction,
            val_docs=args.val_docs, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
            max_tokens=args.max_tokens, num_workers=args.num_workers, seed=args.seed, overwrite=args.overwrite,
            strict=args.strict, progress=not args.no_progress, mask_token=args.mask_token)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or an unwritable output: the staging directory is already removed
        import errno

        what = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
            f"{type(exc).__name__}: {exc.strerror or exc}"
        print(f"error: {what} writing {args.output} ({exc.filename or 'output'}); shards already in {args.output} "
              "(if any) are left as they were", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {summary['documents']} documents, {summary['tokens']} tokens "
          f"({summary['bad_rows']} bad rows skipped) in {summary['seconds']:.1f} s "
          f"= {summary['tokens_per_s']:,.0f} tokens/s")
    for split, s in summary["splits"].items():
        print(f"  {split:5s}: {s['documents']:>9d} documents {s['tokens']:>12d} tokens {s['shards']:>5d} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
