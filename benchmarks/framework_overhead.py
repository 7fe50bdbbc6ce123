"""Framework overhead: training tokens/s of llada_scale's DeepSpeed loop vs a bare PyTorch loop.

Same model, same batches (random tokens, one document per row), same objective, one process on CPU.
The bare loop is forward + loss + backward + grad clipping + AdamW. Our loop is ``Trainer.train_step``
(DeepSpeed engine at the given ZeRO stage, the per-micro-step all-ranks flag collective, stats).

    python benchmarks/framework_overhead.py [--preset tiny] [--steps 30] [--objective diffusion]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from llada_scale.training.config import load_config  # noqa: E402
from llada_scale.model.transformer import Transformer  # noqa: E402
from llada_scale.objectives.losses import compute_loss  # noqa: E402
from llada_scale.training.engine import init_distributed  # noqa: E402
from llada_scale.training.trainer import Trainer  # noqa: E402


def batches(n, micro, seq_len, vocab=6400, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(3, vocab, (micro, seq_len), generator=g)
        yield {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(micro, seq_len).clone(),
               "document_ids": torch.zeros(micro, seq_len, dtype=torch.int32),
               "prompt_mask": torch.zeros(micro, seq_len, dtype=torch.bool),
               "padding_mask": torch.zeros(micro, seq_len, dtype=torch.bool)}


class Loader:
    def __init__(self, micro, seq_len):
        self.micro, self.seq_len = micro, seq_len

    def __iter__(self):
        return batches(10**9, self.micro, self.seq_len)

    def state_dict(self):
        return {}


def bare_loop(cfg, steps, warmup):
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    gen = torch.Generator().manual_seed(0)
    it = batches(steps + warmup, cfg.train.micro_batch_size, cfg.data.seq_len)
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _ = compute_loss(model, next(it), cfg.objective, cfg.model.causal, cfg.model.mask_token_id, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.train.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def ours(cfg, ds_config, steps, warmup):
    trainer = Trainer(cfg, ds_config, loader_factory=lambda: Loader(cfg.train.micro_batch_size, cfg.data.seq_len))
    it = iter(trainer.loader)
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        trainer.train_step(it)
    tps = steps * cfg.train.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - t0)
    trainer.engine.destroy()
    return tps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--objective", default="diffusion", choices=["ar", "diffusion"], help="training objective")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--micro_batch_size", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = p.parse_args()
    init_distributed()
    tmp = tempfile.mkdtemp()
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.causal={args.objective == 'ar'}",
                             f"objective.name={args.objective}", f"data.seq_len={args.seq_len}",
                             f"train.micro_batch_size={args.micro_batch_size}",
                             f"train.global_batch_size={args.micro_batch_size}", "train.wandb=off",
                             f"run_dir={tmp}", "train.resume=none", "optim.warmup_steps=1"])
    cfg.model.mask_token_id = 6400
    rows = [("bare PyTorch (AdamW, clip)", bare_loop(cfg, args.steps, args.warmup))]
    for ds in ("zero1", "zero2", "zero3"):
        rows.append((f"llada_scale Trainer, DeepSpeed {ds}", ours(cfg, f"ds_configs/{ds}.json", args.steps, args.warmup)))
    base = rows[0][1]
    print(f"\n{args.preset} model, {args.objective}, micro batch {args.micro_batch_size} x seq {args.seq_len}, 1 process, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| loop | tokens/s | vs bare |\n|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} |")
    print(json.dumps({name: round(tps) for name, tps in rows}))


if __name__ == "__main__":
    main()
