"""GPU self-check: correctness of the CUDA path, speed (tokens/s, MFU) and peak memory, in one command.

    python benchmarks/gpu_check.py --out DIR             # one GPU, ~8 minutes: DIR/gpu_check.json + gpu_check.md
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # the same code at tiny sizes on CPU (CI runs it)

Sections (``--sections``, default all, in this order), each with its own time budget (``--budgets``: a section
starts no new row after its budget; rows are ordered by value so a cut loses the least useful ones). The rows
are in :mod:`gpu_check_rows`:

* ``correctness``: float32 attention outputs of FlexAttention (compiled ``create_block_mask``, compiled kernel)
  vs SDPA with the dense mask of the same ``mask_mod``, at 1e-4, for every mask (document causal and
  bidirectional, AR causal, block diffusion training ``[x_t ; x_0]`` and inference ``[x ; x]``) at L = 2048;
  compile x full checkpointing (graphs > 0, no graph break); bf16 model losses and gradients flex vs SDPA (a
  coarse second row: a wrong mask can hide in a loss difference); compiled vs eager loss; every mask again at
  L = 160 (2L not a tile multiple). On CPU FlexAttention has no backward (torch 2.13): forward only.
* ``speed``: tokens/s, tokens/s per GPU, MFU (dense bf16 datasheet peak) and peak memory of a training step
  (forward, backward, fused AdamW on bf16 weights; no DeepSpeed) for the 1b preset (AR, LLaDA diffusion, block
  diffusion 32; checkpointing off and full), the LLaDA-8B shape (vocab 126,464) with 4 and 2 layers at seq 4096,
  and the 30m preset.
* ``trainer``: the 1b diffusion row through the real Trainer (DeepSpeed ZeRO-1, bf16 with fp32 master weights).
* ``loss_memory``: peak memory of the output head + loss at vocab 126,464, seq 2048 (hidden 4096): full
  logits + cross-entropy vs the memory-lean loss (masked positions only, chunked).
* ``llada2`` (rows in :mod:`gpu_check_llada2`): the LLaDA2 MoE backbone. Checks: a tiny LLaDA2's
  block-diffusion loss and gradients in bf16 vs float32 (loss 1e-2 relative, gradients 5e-2 relative L2), and
  one MoE layer at LLaDA2-mini's widths through ``torch._grouped_mm`` vs the per-expert loop (bf16, 1e-2).
  Speed: a LLaDA2-mini-shaped slice (real widths, vocab 157,184, 2 layers: 1 dense + 1 MoE), block-diffusion
  training steps at 4 x 2048: tokens/s, MFU on ACTIVE parameters (the trainer's count: top-8 + shared experts,
  not all 256), peak memory; eager with the grouped path and with the per-expert loop, compiled (grouped)
  without and with full checkpointing. Its checks count in the exit status like ``correctness``'s.

Every row records its seconds and what dynamo did around it (graphs compiled, graph breaks, frames compiled;
speed rows also the frames compiled after warm-up, i.e. recompiles). A row that raises is recorded with its error
and the check goes on; the JSON and the markdown are rewritten after every row, so a killed run keeps what it
measured. Exit status 1 when a correctness row failed or raised.

The dry run sets ``LLADA_COMPILE_ON_CPU=1`` (the CPU twin, :func:`llada_scale.model.attention.cuda_paths`): its
correctness rows compile every mask and the flex forward with inductor exactly as on the GPU; its speed rows use
tiny shapes, 2 timed steps and the ``aot_eager`` backend (inductor takes minutes to compile on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import gpu_check_llada2 as l2  # noqa: E402
import gpu_check_rows as rows  # noqa: E402
from llada_scale.model import attention  # noqa: E402

SECTIONS = ("correctness", "speed", "trainer", "loss_memory", "llada2")
CHECKS = ("correctness", "llada2_correctness")  # result keys whose rows are ok / not ok checks (exit status)
# seconds, on a GPU: 510 in all as before the llada2 section came (~8.5 min, plus the overrun of a section's last
# row: a row that starts before its section's budget is spent runs to its end)
BUDGETS = {"correctness": 160.0, "speed": 165.0, "trainer": 75.0, "loss_memory": 15.0, "llada2": 95.0}


def _dynamo_counts() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), counters["frames"]["total"])


class Recorder:
    """Runs rows, records each (or its failure) with its seconds and dynamo counts, and rewrites the JSON and the
    markdown after every row (temporary name then rename)."""

    def __init__(self, out: Path, result: dict, budgets: dict):
        self.out, self.result, self.budgets, self.started = out, result, budgets, {}
        out.mkdir(parents=True, exist_ok=True)

    def row(self, section: str, label: str, fn, key: str | None = None) -> dict | None:
        """Run ``fn`` unless ``section``'s budget is spent; the row goes to ``result[key or section]``."""
        key = key or section
        self.result.setdefault(key, [])
        t_section = self.started.setdefault(section, time.perf_counter())
        if time.perf_counter() - t_section > self.budgets[section]:
            self.result["skipped"].append(f"{key}: {label} (time budget)")
            self.write()
            return None
        graphs, breaks, frames = _dynamo_counts()
        t0 = time.perf_counter()
        try:
            row = {"label": label, **fn(), "error": None}
        except torch.OutOfMemoryError:
            row = {"label": label, "ok": False, "error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - recorded, and the check goes on with the next row
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            row = {"label": label, "ok": False, "error": f"{type(e).__name__}: {first}"}
        g2, b2, f2 = _dynamo_counts()
        row.update(seconds=time.perf_counter() - t0, graphs=row.get("graphs", g2 - graphs), graph_breaks=b2 - breaks,
                   frames_compiled=f2 - frames)
        self.result[key].append(row)
        self.write()
        print(f"[{time.perf_counter() - self.result['_t0']:.0f} s] {key}: {label}: "
              f"{row['error'] or 'done'}", flush=True)
        return row

    def write(self):
        result = {k: v for k, v in self.result.items() if not k.startswith("_")}
        result["seconds"] = time.perf_counter() - self.result["_t0"]
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(self.out / "gpu_check.json")
        tmp = self.out / "gpu_check.md.tmp"
        tmp.write_text(markdown(result))
        tmp.rename(self.out / "gpu_check.md")


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    def fmt(v, spec=".3g"):
        return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def dyn(r):
        return f"{r.get('graphs', '-')} / {r.get('graph_breaks', '-')} / {r.get('recompiles_after_warmup', '-')}"

    out = [f"# gpu_check: {result['device']} ({'CPU dry run' if result['dry_run'] else 'GPU'}), "
           f"{result['seconds']:.0f} s\n"]
    checks = [r for key in CHECKS for r in result.get(key, [])]
    if checks:
        out += ["| check | length | max rel. diff | grad rel. L2 | graphs / breaks | s | ok |",
                "|---|---:|---:|---:|---|---:|---|"]
        out += [f"| {r.get('check', r['label'])} | {r.get('length', '-')} | {fmt(r.get('max_rel_diff'), '.2e')} | "
                f"{fmt(r.get('grad_rel_l2'), '.2e')} | {r['graphs']} / {r['graph_breaks']} | {r['seconds']:.0f} | "
                f"{'yes' if r['ok'] else 'NO: ' + (r['error'] or 'over tolerance')} |" for r in checks]
        out.append("")
    speed = [r for key in ("speed", "trainer", "llada2_speed") for r in result.get(key, [])]
    if speed:
        out += ["| model | params (M) | objective | act. ckpt | micro x seq | step (s) | tokens/s/GPU | MFU | "
                "MFU executed | attn. tiles | peak mem (GB) | warm-up (s) | graphs / breaks / recompiles |",
                "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in speed:
            if r["error"]:
                out.append(f"| {r['label']} | FAILED: {r['error']} |")
                continue
            params = f"{r['params_M']} ({r['active_params_M']} act.)" if "active_params_M" in r else r["params_M"]
            out.append(f"| {r['model']} | {params} | {r['objective']} | {r['activation_checkpointing']} | "
                       f"{r['micro_batch']} x {r['seq']} | {fmt(r['step_s'])} | {r['tokens_per_s_per_gpu']:,.0f} | "
                       f"{pct(r['mfu'])} | {pct(r.get('mfu_executed'))} | {pct(r.get('attention_tile_density'))} | "
                       f"{fmt(r['peak_memory_gb'])} | {fmt(r['warmup_s'])} | {dyn(r)} |")
        out += ["", "MFU counts attention dense (12 n_layer d s per position, s = 2L for block diffusion); MFU executed "
                "scales that term by the share of 128-tiles the mask leaves (attn. tiles). MoE (LLaDA2) rows count "
                "active parameters (act.: per token, incl. the head), as the trainer does.", ""]
    if result.get("skipped"):
        out += [f"skipped: {', '.join(result['skipped'])}", ""]
    if result.get("loss_memory"):
        out += ["| head + loss | positions | vocab | hidden | peak extra memory (GB) | seconds |",
                "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['label']} | {r.get('positions', '-')} | {r.get('vocab', '-')} | {r.get('hidden', '-')} | "
                f"{fmt(r.get('peak_extra_gb'))} | {fmt(r['seconds'])} |" for r in result["loss_memory"]]
    return "\n".join(out) + "\n"


def correctness(rec: Recorder, device, dtype, dry: bool, compile_backend: str):
    """Rows in order of value (the budget cuts the tail): every mask at the long length, compile x checkpointing,
    the bf16 model rows, compiled vs eager, then every mask again at the short length."""
    lengths = (72,) if dry else (2048, 160)  # 2L = 144 / 4096 / 320: partial tiles, boundaries inside tiles
    for kind in rows.MASK_KINDS:
        rec.row("correctness", f"attention {kind} L={lengths[0]}",
                lambda: rows.attention_row(kind, lengths[0], device))
    rec.row("correctness", "compile x checkpointing",
            lambda: rows.compile_checkpoint_row(lengths[0], device, dtype, compile_backend))
    for kind in ("document causal", "document bidirectional", "block diffusion (training)"):
        rec.row("correctness", f"model {kind}", lambda: rows.model_row(kind, lengths[0], device, dtype))
    rec.row("correctness", "compiled vs eager", lambda: rows.compiled_row(lengths[0], device, dtype, compile_backend))
    for length in lengths[1:]:
        for kind in rows.MASK_KINDS:
            rec.row("correctness", f"attention {kind} L={length}", lambda: rows.attention_row(kind, length, device))


def speed(rec: Recorder, device, dtype, dry: bool, compile_backend: str, steps: int, warmup: int):
    last = None
    for name, cfg, objective, ac, micro, seq in rows.speed_plan(dry):
        if name != last:  # a fresh compile cache per model shape; rows of one shape share compiled layers
            torch._dynamo.reset()
            last = name
        rec.row("speed", f"{name} {objective} ac={ac}",
                lambda: rows.train_speed(name, cfg, objective, ac, micro, seq, steps, warmup, device, dtype,
                                         compile_backend))


def llada2(rec: Recorder, device, dry: bool, compile_backend: str, steps: int, warmup: int):
    """The LLaDA2 checks (into ``llada2_correctness``), then the mini-slice speed rows (``llada2_speed``); one
    budget for both."""
    rec.row("llada2", "llada2 bf16 vs fp32", lambda: l2.bf16_row(device, dry), key="llada2_correctness")
    rec.row("llada2", "llada2 grouped_mm vs loop", lambda: l2.grouped_row(device, dry), key="llada2_correctness")
    torch._dynamo.reset()  # a fresh compile cache for the slice; its compiled rows share compiled layers
    for label, ac, path, backend in l2.speed_plan(dry, compile_backend):
        rec.row("llada2", f"llada2-mini slice {label} ac={ac}",
                lambda: l2.speed_row(label, ac, path, backend, dry, steps, warmup, device), key="llada2_speed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: checks the code, not the GPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per speed row (default 10; dry run 2)")
    p.add_argument("--budgets", default=",".join(f"{k}={v:g}" for k, v in BUDGETS.items()),
                   help="seconds per section after which it starts no new row (default %(default)s; the dry run "
                        "has no budget)")
    p.add_argument("--ds_config", default="ds_configs/zero1.json", help="DeepSpeed JSON of the trainer row")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu-dry-run to check the code on CPU", file=sys.stderr)
        return 2
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"error: unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    try:
        budgets = {**BUDGETS, **{k: float(v) for k, v in (kv.split("=") for kv in args.budgets.split(","))}}
    except ValueError:
        print(f"error: --budgets must look like correctness=150,speed=240, not {args.budgets!r}", file=sys.stderr)
        return 2
    if dry:
        os.environ[attention.CPU_TWIN_ENV] = "1"  # the CUDA code paths on CPU inductor
        budgets = {k: float("inf") for k in budgets}
    torch._dynamo.config.recompile_limit = 64  # every mask_mod and shape compiles its own entry here
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16  # bf16 matmuls are ~200x slower on most CPUs
    backend = "aot_eager" if dry else "inductor"
    steps, warmup = args.steps or (2 if dry else 10), 1 if dry else 3
    result = {"device": "cpu" if dry else torch.cuda.get_device_name(), "dry_run": dry, "torch": torch.__version__,
              "dtype": str(dtype), "compile_backend": backend, "budgets_s": None if dry else budgets, "skipped": [],
              "_t0": time.perf_counter()}
    rec = Recorder(Path(args.out), result, budgets)
    rec.write()
    if "correctness" in sections:
        correctness(rec, device, dtype, dry, backend)
    if "speed" in sections:
        speed(rec, device, dtype, dry, backend, steps, warmup)
    if "trainer" in sections:
        rec.row("trainer", f"Trainer {Path(args.ds_config).stem}", lambda: rows.trainer_speed(dry, steps, warmup,
                                                                                             args.ds_config))
    if "loss_memory" in sections:
        positions, hidden, vocab = (256, 64, 4096) if dry else (2048, 4096, 126464)
        for variant in ("full logits + cross_entropy", "lean: masked positions, chunked"):
            rec.row("loss_memory", variant, lambda: rows.loss_memory(device, dtype, positions, hidden, vocab, variant))
    if "llada2" in sections:
        llada2(rec, device, dry, backend, steps, warmup)
    rec.write()
    print(markdown({**{k: v for k, v in result.items() if not k.startswith("_")},
                    "seconds": time.perf_counter() - result["_t0"]}))
    bad = [r["label"] for key in CHECKS for r in result.get(key, []) if not r["ok"]]
    failed = [f"{key}: {r['label']}" for key in ("speed", "trainer", "loss_memory", "llada2_speed")
              for r in result.get(key, []) if r.get("error")]
    if failed:
        print(f"rows that raised: {failed}", file=sys.stderr)
    if bad:
        print(f"FAILED checks: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
