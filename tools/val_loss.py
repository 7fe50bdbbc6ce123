"""Validation loss of checkpoints under one objective, on the same batches and the same noise.

Compares models trained with different recipes on equal terms, e.g. plain LLaDA continual pretraining vs the
LLaDA 2.0 WSD block-diffusion recipe, both scored as full-sequence masked diffusion and as block diffusion:

    python tools/val_loss.py runs/diffusion_pretrain_tiny runs/llada2_wsd_diffusion_tiny \
        --shards data/shards/pretrain --objective diffusion --block_lengths 0 32

Prints a markdown table (one row per checkpoint, one column per block length; 0 = full sequence).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llada_scale.checkpoint import CheckpointError, build_model_from_checkpoint  # noqa: E402
from llada_scale.data.loader import PackedDataset  # noqa: E402
from llada_scale.objectives.config import ObjectiveConfig  # noqa: E402
from llada_scale.objectives.losses import compute_loss  # noqa: E402


def val_loss(model, shards: str, objective: ObjectiveConfig, seq_len: int, batches: int, micro_batch_size: int,
             seed: int = 0) -> float:
    """Mean loss of ``model`` over the first ``batches`` validation batches of ``shards`` (noise seeded by ``seed``)."""
    data = PackedDataset(shards, "val", seq_len, micro_batch_size, seed=0, infinite=True)
    gen = torch.Generator().manual_seed(seed)
    it = iter(data)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            loss, _ = compute_loss(model, next(it), objective, model.config.causal, model.config.mask_token_id, gen)
            total += float(loss)
    return total / batches


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
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    try:
        for ckpt in args.checkpoints:
            model = build_model_from_checkpoint(ckpt, progress=False).eval()
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
