#!/usr/bin/env python
"""Loader throughput vs. what the model presets consume on one H100.

Measures, for ``num_workers`` in {0, 1, 2}, the tokens/s a ``StatefulDataLoader`` over
:class:`llada_scale.data.loader.PackedDataset` delivers, where each worker process reads tar shards,
unpacks the .npy arrays, packs rows AND builds the dense boolean document attention mask
``[B, 1, L, L]`` (``mask[b, 0, i, j] = doc[b, i] == doc[b, j]``, ``& j <= i`` with ``--causal``).
Prints a markdown table with total tokens/s and tokens/s per worker process, then the tokens/s the
30M and 1B presets consume on one H100 at 45% MFU and how many loader worker cores that takes.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022) appendix B:
``6 * N_params + 12 * n_layers * hidden * seq_len`` (N_params counted from the shapes: input embedding
and untied output head, q/k/v/o projections, SwiGLU FFN (3 matrices), RMSNorm weights).

Examples::

    python benchmarks/loader_throughput.py                       # builds shards from a poetry slice
    python benchmarks/loader_throughput.py --shards data/poetry  # existing shard directory
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*set_vital.*")

import torch  # noqa: E402

from llada_scale.data.loader import PackedDataset, build_dataloader  # noqa: E402
from llada_scale.data.build import build_shards  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM
MFU = 0.45
PRESETS = {  # name: (hidden, layers, heads, ffn, vocab, seq_len)
    "30M": (512, 8, 8, 1408, 6464, 512),
    "1B": (2048, 16, 16, 5632, 6464, 2048),
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = os.path.join(os.path.dirname(_REPO), "shared", "data")


def n_params(hidden: int, layers: int, ffn: int, vocab: int) -> int:
    """Parameter count (int) of a LLaMA-style decoder: embedding + untied head + layers + final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def flops_per_token(hidden: int, layers: int, ffn: int, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 n_layers hidden seq_len (PaLM app. B)."""
    return 6.0 * n_params(hidden, layers, ffn, vocab) + 12.0 * layers * hidden * seq_len


class MaskedPackedDataset(PackedDataset):
    """PackedDataset that also builds the dense document attention mask in the worker.

    Adds ``attention_mask``: bool ``[B, 1, L, L]``, True where query i may attend key j.
    """

    causal = False
    build_mask = True

    def __iter__(self):
        tril = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril() if self.causal else None
        for batch in super().__iter__():
            if self.build_mask:
                doc = batch["document_ids"]
                mask = (doc[:, :, None] == doc[:, None, :]).unsqueeze(1)
                if tril is not None:
                    mask &= tril
                batch["attention_mask"] = mask
            yield batch


def measure(shard_dir: str, seq_len: int, micro_batch_size: int, num_workers: int, batches: int,
            causal: bool, build_mask: bool = True) -> dict:
    """Tokens/s of one loader configuration (first batch excluded: worker start-up, first shard read)."""
    ds = MaskedPackedDataset(shard_dir, "train", seq_len, micro_batch_size, num_workers=num_workers)
    ds.causal = causal
    ds.build_mask = build_mask
    dl = build_dataloader(ds, num_workers)
    it = iter(dl)
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["input_ids"].numel()
    dt = time.perf_counter() - t0
    del it, dl
    return {"tokens_per_s": n / dt, "startup_s": startup, "batches": batches}


def main(argv=None) -> int:
    """CLI entry point (see --help). Returns 0, or 2 with an ``error:`` line on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", default=None, help="existing pretraining shard directory (skips building)")
    p.add_argument("--input", default=os.path.join(_DATA, "pretrain", "zh_poetry.jsonl.gz"),
                   help="jsonl(.gz) to build shards from when --shards is not given")
    p.add_argument("--tokenizer", default=os.path.join(_DATA, "tokenizer", "minimind"), help="tokenizer path")
    p.add_argument("--max_tokens", type=int, default=3_000_000, help="tokens to take from --input")
    p.add_argument("--shard_tokens", type=int, default=250_000, help="tokens per built shard")
    p.add_argument("--seq_len", type=int, nargs="+", default=[512, 2048], help="row lengths to measure")
    p.add_argument("--tokens_per_batch", type=int, default=8192, help="micro batch size = this // seq_len")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values to measure")
    p.add_argument("--batches", type=int, default=60, help="timed batches per configuration")
    p.add_argument("--causal", action="store_true", help="build a causal document mask (AR) instead of bidirectional")
    args = p.parse_args(argv)

    tmp = None
    try:
        shard_dir = args.shards
        if shard_dir is None:
            tmp = tempfile.mkdtemp(prefix="loader_bench_")
            shard_dir = os.path.join(tmp, "shards")
            s = build_shards([args.input], args.tokenizer, shard_dir, "pretrain", val_docs=0,
                             shard_tokens=args.shard_tokens, max_tokens=args.max_tokens,
                             num_workers=min(2, os.cpu_count() or 1), progress=False, log=lambda m: None)
            print(f"built {s['tokens']:,} tokens / {s['documents']:,} docs into {s['splits']['train']['shards']} "
                  f"shards in {s['seconds']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s, "
                  f"{min(2, os.cpu_count() or 1)} tokenizer processes)\n")
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; mask "
              f"{'causal' if args.causal else 'bidirectional'} document mask [B,1,L,L] built in the worker\n")
        print("| seq_len | micro batch | num_workers | dense mask | loader tokens/s | tokens/s per worker process "
              "| first batch (s) |")
        print("|---:|---:|---:|:-:|---:|---:|---:|")
        per_worker = {}
        for L in args.seq_len:
            B = max(1, args.tokens_per_batch // L)
            for build_mask in (False, True):
                for w in args.workers:
                    r = measure(shard_dir, L, B, w, args.batches, args.causal, build_mask)
                    pw = r["tokens_per_s"] / max(1, w)
                    if build_mask:  # the spec'd per-worker cost includes the mask
                        per_worker.setdefault(L, {})[w] = pw
                    print(f"| {L} | {B} | {w} | {'yes' if build_mask else 'no'} | {r['tokens_per_s']:,.0f} | "
                          f"{pw:,.0f} | {r['startup_s']:.2f} |")
        print()
        print("| preset | params | FLOPs/token | H100 tokens/s at 45% MFU | loader worker cores needed |")
        print("|---|---:|---:|---:|---:|")
        for name, (d, layers, heads, ffn, vocab, L) in PRESETS.items():
            f = flops_per_token(d, layers, ffn, vocab, L)
            need = MFU * H100_BF16_PEAK / f
            rates = per_worker.get(L)
            if rates:
                # one worker beside the main process is the cleanest per-process figure on a 2-core box
                w = 1 if 1 in rates else max(rates, key=lambda k: rates[k])
                cores = f"{need / rates[w]:.1f} (at {rates[w]:,.0f} tokens/s/worker, num_workers={w}, seq {L})"
            else:
                cores = f"n/a (measure --seq_len {L})"
            print(f"| {name} (d{d} x{layers}, {heads} heads, ffn {ffn}, seq {L}) | "
                  f"{n_params(d, layers, ffn, vocab) / 1e6:.1f} M | {f / 1e9:.3f} G | {need:,.0f} | {cores} |")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
