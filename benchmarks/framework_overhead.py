"""Framework overhead: training tokens/s of llada_scale's DeepSpeed loop vs a bare PyTorch loop.

Same model, same batches (random tokens, one document per row), same objective, one process on CPU.
The bare loop is forward + loss + backward + grad clipping + AdamW. Our loop is ``Trainer.train_step``
(DeepSpeed engine at the given ZeRO stage, the per-micro-step all-ranks flag collective, stats).
``--repeat`` runs the whole comparison several times, interleaved, and reports the median and the range
(the CPU machines are shared: single runs vary by several percent).

    python benchmarks/framework_overhead.py [--preset tiny] [--steps 30] [--objective diffusion] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def timed(step, steps: int, warmup: int) -> tuple[float, float]:
    """Run ``step()`` warmup + steps times; (wall seconds, process CPU seconds) of the timed steps. CPU time
    is what a loaded shared machine distorts least (another job's work is not counted)."""
    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0, time.process_time() - c0


def bare_loop(cfg, steps, warmup):
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    gen = torch.Generator().manual_seed(0)
    it = batches(steps + warmup, cfg.train.micro_batch_size, cfg.data.seq_len)

    def step():
        loss, _ = compute_loss(model, next(it), cfg.objective, cfg.model.causal, cfg.model.mask_token_id, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, warmup)


def with_removed_syncs(compute):
    """``compute_loss`` plus the host reads that train_step and the objectives did per micro batch before
    issue 9 (``bool(isfinite(loss))``, ``float(loss)``, the random-length decision and its length)."""

    def run(*args, **kwargs):
        loss, stats = compute(*args, **kwargs)
        bool(torch.isfinite(loss))
        float(loss.detach())
        float(stats["tokens"])
        int(stats["model_tokens"])
        return loss, stats

    return run


def ours(cfg, ds_config, steps, warmup, removed_syncs=False):
    import llada_scale.training.trainer as trainer_module

    original = trainer_module.compute_loss
    if removed_syncs:
        trainer_module.compute_loss = with_removed_syncs(original)
    trainer = Trainer(cfg, ds_config, loader_factory=lambda: Loader(cfg.train.micro_batch_size, cfg.data.seq_len))
    it = iter(trainer.loader)
    try:
        return timed(lambda: trainer.train_step(it), steps, warmup)
    finally:
        trainer.engine.destroy()
        trainer_module.compute_loss = original


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--objective", default="diffusion", choices=["ar", "diffusion"], help="training objective")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--micro_batch_size", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--stages", default="zero1,zero2,zero3", help="DeepSpeed configs to compare (ds_configs/NAME.json)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of the whole comparison (median, range)")
    p.add_argument("--removed_syncs", action="store_true",
                   help="add a row: the first stage's loop plus the host reads issue 9 removed (sync cost)")
    args = p.parse_args()
    init_distributed()
    tmp = tempfile.mkdtemp()
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.causal={args.objective == 'ar'}",
                             f"objective.name={args.objective}", f"data.seq_len={args.seq_len}",
                             f"train.micro_batch_size={args.micro_batch_size}",
                             f"train.global_batch_size={args.micro_batch_size}", "train.wandb=off",
                             f"run_dir={tmp}", "train.resume=none", "optim.warmup_steps=1"])
    cfg.model.mask_token_id = 6400
    names = ["bare PyTorch (AdamW, clip)"] + [f"llada_scale Trainer, DeepSpeed {ds}" for ds in args.stages.split(",")]
    stages = args.stages.split(",")
    if args.removed_syncs:
        names.append(f"llada_scale Trainer, DeepSpeed {stages[0]}, + removed host syncs")
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(args.repeat):  # interleaved, so that load changes hit every loop alike
        runs[names[0]].append(bare_loop(cfg, args.steps, args.warmup))
        for name, ds in zip(names[1:], stages):
            runs[name].append(ours(cfg, f"ds_configs/{ds}.json", args.steps, args.warmup))
        if args.removed_syncs:
            runs[names[-1]].append(ours(cfg, f"ds_configs/{stages[0]}.json", args.steps, args.warmup, True))
    tokens = args.steps * args.micro_batch_size * args.seq_len
    print(f"\n{args.preset} model, {args.objective}, micro batch {args.micro_batch_size} x seq {args.seq_len}, "
          f"1 process, {torch.get_num_threads()} thread(s), {args.repeat} repetition(s); ratios are paired per "
          "repetition (median [min-max])\n")
    print("| loop | tokens/s wall | vs bare (wall) | tokens/s CPU time | vs bare (CPU time) |\n|---|---:|---:|---:|---:|")
    for name in names:
        cells = []
        for i in (0, 1):
            tps = [tokens / r[i] for r in runs[name]]
            ratio = [r[i] and b[i] / r[i] for r, b in zip(runs[name], runs[names[0]])]
            cells += [f"{statistics.median(tps):,.0f} [{min(tps):,.0f}-{max(tps):,.0f}]",
                      f"{statistics.median(ratio):.3f} [{min(ratio):.3f}-{max(ratio):.3f}]"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({name: [[round(x, 3) for x in r] for r in v] for name, v in runs.items()}))


if __name__ == "__main__":
    main()
