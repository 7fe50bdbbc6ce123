"""Framework overhead: training tokens/s of llada_scale's DeepSpeed loop vs a bare PyTorch loop.

Same model, same batches (random tokens, one document per row), same objective, one process on CPU.
The bare loop is forward + loss + backward + grad clipping + AdamW. Our loop is ``Trainer.train_step``
(DeepSpeed engine at the given ZeRO stage, the per-micro-step all-ranks flag collective, stats).
All loops are built first, then take one step each in turn (the order rotated every round) and the table
shows median step times: on the shared CPU machines single runs vary by tens of percent, and a burst of load
then hits every loop alike instead of whichever ran during it.

    python benchmarks/framework_overhead.py [--preset tiny] [--steps 60] [--objective diffusion]
        [--stages zero2,zero1] [--engine_only] [--removed_syncs]
"""

from __future__ import annotations

import argparse
import copy
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


def bare_loop(cfg):
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    gen = torch.Generator().manual_seed(0)
    it = batches(10**9, cfg.train.micro_batch_size, cfg.data.seq_len)

    def step():
        loss, _ = compute_loss(model, next(it), cfg.objective, cfg.model.causal, cfg.model.mask_token_id, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: None


def deepspeed_loop(cfg, ds_config):
    """DeepSpeed's engine alone at the same stage and config: forward + loss, ``engine.backward``,
    ``engine.step`` (clipping inside). Splits the overhead into DeepSpeed's part and the Trainer's."""
    import deepspeed

    from llada_scale.training.engine import build_ds_config, param_groups

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ds = build_ds_config(ds_config, cfg, 1, torch.device("cpu"))
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    gen = torch.Generator().manual_seed(0)
    it = batches(10**9, cfg.train.micro_batch_size, cfg.data.seq_len)

    def step():
        loss, _ = compute_loss(engine, next(it), cfg.objective, cfg.model.causal, cfg.model.mask_token_id, gen)
        engine.backward(loss)
        engine.step()

    return step, engine.destroy


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


def ours(cfg, ds_config, removed_syncs=False):
    import llada_scale.training.trainer as trainer_module

    cfg = copy.deepcopy(cfg)
    cfg.run_dir = tempfile.mkdtemp()
    trainer = Trainer(cfg, ds_config, loader_factory=lambda: Loader(cfg.train.micro_batch_size, cfg.data.seq_len))
    it = iter(trainer.loader)
    original = trainer_module.compute_loss

    def step():
        if removed_syncs:
            trainer_module.compute_loss = with_removed_syncs(original)
        try:
            trainer.train_step(it)
        finally:
            trainer_module.compute_loss = original

    return step, trainer.engine.destroy


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--objective", default="diffusion", choices=["ar", "diffusion"], help="training objective")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--micro_batch_size", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=60, help="timed steps per loop (taken in turns)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--stages", default="zero1,zero2,zero3", help="DeepSpeed configs to compare (ds_configs/NAME.json)")
    p.add_argument("--removed_syncs", action="store_true",
                   help="add a row: the first stage's loop plus the host reads issue 9 removed (sync cost)")
    p.add_argument("--engine_only", action="store_true",
                   help="add a row: DeepSpeed's engine alone at the first stage (no Trainer), to split the overhead")
    args = p.parse_args()
    init_distributed()
    tmp = tempfile.mkdtemp()
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.causal={args.objective == 'ar'}",
                             f"objective.name={args.objective}", f"data.seq_len={args.seq_len}",
                             f"model.max_seq_len={args.seq_len}",
                             f"train.micro_batch_size={args.micro_batch_size}",
                             f"train.global_batch_size={args.micro_batch_size}", "train.wandb=off",
                             f"run_dir={tmp}", "train.resume=none", "optim.warmup_steps=1"])
    cfg.model.mask_token_id = 6400
    stages = args.stages.split(",")
    names = ["bare PyTorch (AdamW, clip)"] + [f"llada_scale Trainer, DeepSpeed {ds}" for ds in stages]
    if args.engine_only:
        names.append(f"DeepSpeed engine alone, {stages[0]}")
    if args.removed_syncs:
        names.append(f"llada_scale Trainer, DeepSpeed {stages[0]}, + removed host syncs")
    loops = [bare_loop(cfg)] + [ours(cfg, f"ds_configs/{ds}.json") for ds in stages]
    if args.engine_only:
        loops.append(deepspeed_loop(cfg, f"ds_configs/{stages[0]}.json"))
    if args.removed_syncs:
        loops.append(ours(cfg, f"ds_configs/{stages[0]}.json", removed_syncs=True))
    for step, _ in loops:
        for _ in range(args.warmup):
            step()
    # one step of each loop in turn, the order rotated every round: a burst of load on the shared machine hits
    # every loop alike, and medians over steps ignore it
    times: list[list[tuple[float, float]]] = [[] for _ in loops]
    for r in range(args.steps):
        for i in [(r + j) % len(loops) for j in range(len(loops))]:
            t0, c0 = time.perf_counter(), time.process_time()
            loops[i][0]()
            times[i].append((time.perf_counter() - t0, time.process_time() - c0))
    for _, close in loops:
        close()
    tokens = args.micro_batch_size * args.seq_len
    print(f"\n{args.preset} model, {args.objective}, micro batch {args.micro_batch_size} x seq {args.seq_len}, "
          f"1 process, {torch.get_num_threads()} thread(s), {args.steps} interleaved steps per loop; median over "
          "steps [quartiles]\n")
    print("| loop | ms/step wall | tokens/s wall | vs bare (wall) | ms/step CPU time | vs bare (CPU time) |\n"
          "|---|---:|---:|---:|---:|---:|")
    result = {}
    for name, t in zip(names, times):
        cells, result[name] = [], {}
        for i, kind in ((0, "wall"), (1, "cpu")):
            xs = sorted(x[i] for x in t)
            q1, med, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
            bare = statistics.median(x[i] for x in times[0])
            result[name][kind] = {"ms_per_step": 1e3 * med, "vs_bare": bare / med}
            cells.append(f"{1e3 * med:.1f} [{1e3 * q1:.1f}-{1e3 * q3:.1f}]")
            if i == 0:
                cells.append(f"{tokens / med:,.0f}")
            cells.append(f"{bare / med:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
