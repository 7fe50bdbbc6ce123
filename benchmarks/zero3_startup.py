"""Peak host memory (RSS) per rank of the trainer's start-up at ZeRO-3 with ``train.init_from``: the whole model
built on every rank first (``train.zero3_init=false``) vs partitioned under ``deepspeed.zero.Init`` with the
weights streamed into the partitions (``true``, the default). Issue 19; results in docs/LOG.md.

    nice python benchmarks/zero3_startup.py                 # preset 1b, 2 CPU processes
    python benchmarks/zero3_startup.py --preset small       # a quick look
    python benchmarks/zero3_startup.py --preset 30m --sp 2  # under Ulysses sequence parallelism (SP 2, DP 1)

The parent writes a random consolidated checkpoint of the preset (bf16 safetensors, what import-hf /
convert-checkpoint write) as the ``init_from``, then runs the start-up (recipe
``configs/diffusion_pretrain_1b.yaml``, ``ds_configs/zero3.json``: tokenizer, model build, weight loading,
``deepspeed.initialize``; no data, no training step, so no optimizer state yet) on 2 ranks for each setting.
Each rank reports ``ru_maxrss`` (peak resident memory of the process, which counts the pages of the
memory-mapped checkpoint it touched), the peak of ``RssAnon`` (sampled every 20 ms: the process's own memory,
without file and shared-memory pages) and the resident memory after start-up, both for the model build +
init_from (up to the call of ``deepspeed.initialize``: what ``train.zero3_init`` changes) and for the whole
start-up (``deepspeed.initialize`` then allocates the ZeRO-3 optimizer's fp32 partitions and gradient buffers,
O(parameters / world) either way).
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

from memory import peak_rss_gb, rss_gb  # noqa: E402  (benchmarks/memory.py, beside this script)


def _anon_gb() -> float:
    """RssAnon: resident memory that is not a file mapping (the memory-mapped checkpoint's pages are page cache)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("RssAnon:")) / 2**20


class _AnonPeak:
    """Largest RssAnon seen by a thread sampling every 20 ms."""

    def __init__(self):
        import threading

        self.peak, self._stop = _anon_gb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _anon_gb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_gb())


def child(init_from: str, zero3_init: str, preset: str, run_dir: str, sp: str) -> None:
    import torch

    from llada_scale.training.config import load_config
    from llada_scale.training.engine import init_distributed
    from llada_scale.training.trainer import Trainer

    torch.set_num_threads(1)
    rank, _, world = init_distributed()
    cfg = load_config("configs/diffusion_pretrain_1b.yaml", [
        f"model.preset={preset}", f"train.init_from={init_from}", f"train.zero3_init={zero3_init}",
        f"run_dir={run_dir}", "train.wandb=off", "train.micro_batch_size=1", f"train.global_batch_size={world}",
        "train.compile=false", "data.train_shards=unused", "data.seq_len=64", "train.val_every=0",
        f"train.sequence_parallel_size={sp}"])
    import deepspeed

    before = rss_gb()
    sampler = _AnonPeak()
    build: dict = {}
    initialize = deepspeed.initialize

    def measured_initialize(*a, **kw):  # the model is built and init_from loaded: what zero3_init changes
        build.update(peak=peak_rss_gb(), anon=sampler.peak)
        return initialize(*a, **kw)

    deepspeed.initialize = measured_initialize
    t0 = time.perf_counter()
    trainer = Trainer(cfg, "ds_configs/zero3.json", loader_factory=lambda: None)
    seconds = time.perf_counter() - t0
    anon_peak = sampler.stop()
    peak = peak_rss_gb()
    print(json.dumps({"rank": rank, "zero3_init": zero3_init, "sp": int(sp), "params": trainer.num_params,
                      "rss_before_gb": before, "peak_rss_gb": peak, "peak_anon_gb": anon_peak,
                      "build_peak_rss_gb": build["peak"], "build_peak_anon_gb": build["anon"], "rss_after_gb": rss_gb(),
                      "startup_s": seconds}))
    trainer.engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--sp", type=int, default=1, help="train.sequence_parallel_size (1 or 2 on the 2 ranks)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    import llada_scale.checkpoint as cio
    from llada_scale.data.tokenizer import Tokenizer
    from llada_scale.model.transformer import Transformer, preset
    from llada_scale.testing import run_ranks
    from llada_scale.training.config import load_config

    tok = Tokenizer.load(load_config("configs/diffusion_pretrain_1b.yaml").tokenizer)
    with tempfile.TemporaryDirectory(prefix="zero3_startup_") as tmp:
        cfg = preset(args.preset, vocab_size=tok.padded_vocab_size(), causal=False, mask_token_id=tok.mask_token_id)
        torch.manual_seed(0)
        model = Transformer(cfg)
        meta = {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": tok.identity()}
        cio.save_safetensors(model.state_dict(), f"{tmp}/init", meta, dtype="bf16", progress=False)
        n = model.num_params()
        largest = max(p.numel() for p in model.parameters())
        del model
        rows = []
        for flag in ("false", "true"):
            out = run_ranks([__file__, "--child", f"{tmp}/init", flag, args.preset, f"{tmp}/run_{flag}",
                             str(args.sp)], 2, timeout=1800)
            rows += [json.loads(r.stdout.strip().splitlines()[-1]) for r in out]
    print(f"\npreset {args.preset}: {n / 1e9:.3f}B parameters (fp32 {4 * n / 2**30:.2f} GiB), largest tensor "
          f"{largest / 1e6:.1f}M (fp32 {4 * largest / 2**30:.2f} GiB); ZeRO-3, 2 CPU ranks, SP {args.sp}, "
          "init_from bf16 safetensors")
    print("\n| train.zero3_init | rank | RSS before (GiB) | model built + init_from: peak RSS / RssAnon (GiB) | "
          "whole start-up: peak RSS / RssAnon (GiB) | RSS after start-up (GiB) | start-up (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['zero3_init']} | {r['rank']} | {r['rss_before_gb']:.2f} | {r['build_peak_rss_gb']:.2f} / "
              f"{r['build_peak_anon_gb']:.2f} | {r['peak_rss_gb']:.2f} / {r['peak_anon_gb']:.2f} | "
              f"{r['rss_after_gb']:.2f} | {r['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
