"""Peak host memory and time of import-llada / export-llada / import-hf on a LLaDA-shaped model, and the
extrapolation to LLaDA-8B (16.0 GB of bf16 weights in 6 shards of <= 5 GB on the hub).

Builds a random LLaDA-format checkpoint (bf16, HF-style shards), then runs each conversion in a fresh process and
reads its peak resident set size (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``) minus its RSS
after the imports (the baseline).

    python benchmarks/convert_memory.py [--d_model 1024] [--layers 8] [--vocab 32000] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))

CHILD = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/tools")
import convert_checkpoint, torch, safetensors, tokenizers  # the imports are the baseline

def kb(key):
    return int([ln for ln in open("/proc/self/status") if ln.startswith(key)][0].split()[1])

base = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t0 = time.perf_counter()
rc = convert_checkpoint.main({argv!r})
dt = time.perf_counter() - t0
print("RESULT", rc, dt, base, kb("VmHWM:"))
"""


def run(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        raise SystemExit(out.stderr[-3000:])
    _, rc, dt, base, peak = line[0].split()
    return {"rc": int(rc), "seconds": float(dt), "base_mb": int(base) / 1024, "peak_mb": int(peak) / 1024,
            "delta_mb": (int(peak) - int(base)) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out_shard", default="100MB", help="--max_shard_size of the outputs")
    args = ap.parse_args()
    import torch

    from tiny_models import llada_config, llada_state, make_tokenizer, save_sharded

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "llada"
        src.mkdir()
        specials = make_tokenizer(src)
        cfg = llada_config(d_model=args.d_model, n_heads=args.d_model // 128, n_kv_heads=args.d_model // 128,
                           n_layers=args.layers, mlp_hidden_size=args.d_model * 11 // 4, embedding_size=args.vocab,
                           vocab_size=args.vocab, mask_token_id=specials["<|mdm_mask|>"])
        (src / "config.json").write_text(json.dumps(cfg))
        save_sharded(llada_state(cfg), src, args.shards, dtype=torch.bfloat16)
        shard_mb = max(f.stat().st_size for f in src.glob("*.safetensors")) / 1e6
        total_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e6
        out_mb = min(float(args.out_shard.rstrip("MB")), total_mb)  # the largest output file
        print(f"checkpoint: {total_mb:.0f} MB bf16 in {args.shards} shards, largest {shard_mb:.0f} MB; "
              f"output shards <= {out_mb:.0f} MB")
        print(f"{'command':<14} {'s':>6} {'MB/s':>6} {'peak-base MB':>13} {'/(shard+out)':>13}")
        rows = [("import-llada", [str(src), f"{tmp}/ours", "--quiet", "--max_shard_size", args.out_shard]),
                ("export-llada", [f"{tmp}/ours", f"{tmp}/back", "--quiet", "--max_shard_size", args.out_shard])]
        for name, argv in rows:
            t = time.perf_counter()
            r = run([name, *argv])
            assert r["rc"] == 0, r
            ratio = r["delta_mb"] / (shard_mb + out_mb)
            print(f"{name:<14} {r['seconds']:>6.2f} {total_mb / r['seconds']:>6.0f} {r['delta_mb']:>13.0f} "
                  f"{ratio:>13.2f}   (wall incl. start {time.perf_counter() - t:.1f} s, base {r['base_mb']:.0f} MB)")
    print(f"peak RSS (VmHWM) includes the memory-mapped input pages touched (page cache, reclaimable); host: "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
