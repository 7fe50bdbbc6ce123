"""Validation loss of checkpoints under one objective, on the same batches and the same noise.

Compares models trained with different recipes on equal terms, e.g. plain LLaDA continual pretraining vs the
LLaDA 2.0 WSD block-diffusion recipe, both scored as full-sequence masked diffusion and as block diffusion:

    python tools/val_loss.py runs/diffusion_pretrain_tiny runs/llada2_wsd_diffusion_tiny \
        --shards data/shards/pretrain --objective diffusion --block_lengths 0 32

Prints a markdown table (one row per checkpoint, one column per block length; 0 = full sequence). Shards built
with another tokenizer than a checkpoint's (tokenizer.json hash in both records) are refused: the token ids
would mean other words and the losses nothing (``--any_tokenizer`` scores them anyway).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llada_scale.checkpoint import CheckpointError, build_model_from_checkpoint  # noqa: E402
from llada_scale.data.loader import PackedDataset  # noqa: E402
from llada_scale.data.shards import load_index  # noqa: E402
from llada_scale.objectives.config import ObjectiveConfig  # noqa: E402
from llada_scale.objectives.losses import compute_loss  # noqa: E402


def val_loss(model, shards: str, objective: ObjectiveConfig, seq_len: int, batches: int, micro_batch_size: int,
             seed: int = 0) -> float:
    """Mean loss of ``model`` over the first ``batches`` validation batches of ``shards`` (noise seeded by ``seed``)."""
    data = PackedDataset(shards, "val", seq_len, micro_batch_size, seed=0, infinite=True,
                         vocab_size=model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    it = iter(data)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            loss, _ = compute_loss(model, next(it), objective, model.config.causal, model.config.mask_token_id, gen)
            total += float(loss)
    return total / batches


def check_tokenizer(model, shards: str, ckpt: str) -> str | None:
    """Raise ValueError when ``shards`` were built with another tokenizer than the checkpoint's (both record the
    tokenizer.json hash); returns a warning when either record lacks it, else None."""
    theirs = (load_index(shards).get("tokenizer") or {})
    mine = (getattr(model, "checkpoint_meta", {}) or {}).get("tokenizer") or {}
    if not theirs.get("sha256") or not mine.get("sha256"):
        return (f"warning: cannot check that {shards} and {ckpt} share a tokenizer (no tokenizer hash in "
                f"{'the shard index' if not theirs.get('sha256') else 'the checkpoint'})")
    if theirs["sha256"] != mine["sha256"]:
        raise ValueError(f"{shards} was built with tokenizer {theirs.get('path')} but {ckpt} was trained with "
                         f"{mine.get('path')} (different tokenizer.json); score shards built with the checkpoint's "
                         "tokenizer, or pass --any_tokenizer")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="run dirs, checkpoint tag dirs or consolidated safetensors dirs")
    p.add_argument("--shards", required=True, help="shard directory whose 'val' split is scored")
    p.add_argument("--objective", default="diffusion", choices=["ar", "diffusion", "sft"],
                   help="objective to score with (default diffusion)")
    p.add_argument("--block_lengths", type=int, nargs="+", default=[0],
                   help="block lengths to score diffusion with; 0 = plain full-sequence LLaDA diffusion")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batches", type=int, default=16, help="validation batches (default 16)")
    p.add_argument("--micro_batch_size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, the same for every checkpoint (default 0)")
    p.add_argument("--any_tokenizer", action="store_true",
                   help="score shards even when they were built with another tokenizer than the checkpoint's")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    try:
        for ckpt in args.checkpoints:
            model = build_model_from_checkpoint(ckpt, progress=False).eval()
            if not args.any_tokenizer:
                warning = check_tokenizer(model, args.shards, ckpt)
                if warning:
                    print(warning, file=sys.stderr)
            losses = []
            for bl in args.block_lengths:
                obj = ObjectiveConfig(name=args.objective, block_length=bl, random_length_prob=0.0)
                losses.append(val_loss(model, args.shards, obj, args.seq_len, args.batches, args.micro_batch_size,
                                       args.seed))
            rows.append((ckpt, losses))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = " | ".join("full" if b == 0 else f"block {b}" for b in args.block_lengths)
    print(f"\n{args.objective} validation loss, {args.batches} x {args.micro_batch_size} rows of {args.seq_len} "
          f"tokens from {args.shards}, noise seed {args.seed}\n")
    print(f"| checkpoint | {head} |\n|---|{'---:|' * len(args.block_lengths)}")
    for ckpt, losses in rows:
        print(f"| {ckpt} | " + " | ".join(f"{v:.4f}" for v in losses) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
