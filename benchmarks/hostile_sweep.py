"""The hostile-user sweep of issues 11 and 20, rerunnable: bad inputs to every tool, signals through each launcher,
kills, damaged checkpoints, a full disk, absurd learning rates, resumes; and (benchmarks/hostile_integrity.py)
flipped bytes, two trainers in one run dir, --force over foreign files, ENOSPC at each writer, API fuzzing, Ctrl-C
in the chat. Prints one table row per case
(case, expected, observed, pass). Not part of the tests (several minutes); tests/ holds the fast versions.

    python benchmarks/hostile_sweep.py                       # this checkout
    python benchmarks/hostile_sweep.py --repo /path/to/other # another checkout (e.g. main, for a before/after)
    python benchmarks/hostile_sweep.py --only launcher       # cases whose name contains a word

Everything runs on CPU with a tiny model (2 layers, hidden 64, seq 64) on shards built from the project's data
(``LLADA_DATA``); the cases about how a run ends use one loader worker, the others none. The disk-full case
mounts a 24 MiB tmpfs (needs root; skipped otherwise). Every process gets a timeout: a run that hangs is
reported as ``hung`` and killed with its whole session.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from llada_scale.testing import (free_port, launched_rank, pid_running,  # noqa: E402  (this checkout's helpers)
                                  train_metrics)
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "data.seq_len=64",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.log_every=1", "train.init_from=",
        "train.wandb=off", "train.num_samples=0", "train.val_every=0", "data.num_workers=0", "train.keep_last=0",
        "train.save_every=0"]
WORKERS = "data.num_workers=1"  # the cases about how runs end use a loader worker (a hang there used to be forever)
RECIPE = ["--config", "configs/diffusion_pretrain_tiny.yaml"]


class Sweep:
    def __init__(self, repo: Path, work: Path, data: Path):
        self.repo, self.work, self.data = repo, work, data
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "WANDB_MODE": "offline",
                    "LLADA_DATA": str(data)}
        self.rows: list[tuple[str, str, str, bool]] = []
        self.n = 0

    # -- processes
    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=self.repo, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def wait(self, p: subprocess.Popen, timeout: float) -> int | None:
        """Exit code, or None after killing the session at ``timeout`` (hung)."""
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None

    def run(self, argv: list[str], timeout: float = 150) -> tuple[int | None, str, float]:
        self.n += 1
        log = self.work / f"log{self.n}.txt"
        t0 = time.time()
        code = self.wait(self.start(argv, log), timeout)
        return code, log.read_text(errors="replace"), time.time() - t0

    def train_argv(self, run: Path, *extra: str, ds: str | None = None, shards: Path | None = None,
                   recipe: list[str] = RECIPE, opts: tuple = ()) -> list[str]:
        """``python -m llada_scale.train`` with options first (older checkouts cannot intermix them with the
        key=value overrides), then the tiny recipe and ``extra`` overrides."""
        return [sys.executable, "-m", "llada_scale.train", *recipe, *(["--deepspeed_config", ds] if ds else []),
                *opts, *TINY, f"run_dir={run}", f"data.train_shards={shards or self.pre}", *extra]

    def train(self, run: Path, *extra: str, timeout: float = 150, **kw) -> tuple[int | None, str, float]:
        return self.run(self.train_argv(run, *extra, **kw), timeout)

    def stop_run(self, argv: list[str], run: Path, kill, at_step: int = 3, timeout: float = 150):
        """Start, wait for ``at_step`` in metrics.jsonl, call ``kill(proc)``, wait; returns (code, output, seconds
        from the kill to the exit)."""
        self.n += 1
        log = self.work / f"log{self.n}.txt"
        p = self.start(argv, log)
        deadline = time.time() + timeout
        m = run / "metrics.jsonl"
        while not (m.exists() and sum('"train/loss"' in x for x in m.read_text().splitlines()) >= at_step):
            if p.poll() is not None or time.time() > deadline:
                self.wait(p, 1)
                return p.returncode, log.read_text(errors="replace"), float("nan")
            time.sleep(0.1)
        kill(p)
        t0 = time.time()
        code = self.wait(p, timeout)
        return code, log.read_text(errors="replace"), time.time() - t0

    # -- reporting
    def row(self, case: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append((case, expected, observed, ok))
        print(f"| {case} | {expected} | {observed} | {'yes' if ok else '**no**'} |", flush=True)

    @staticmethod
    def err_line(out: str) -> str:
        lines = [x for x in out.strip().splitlines() if x.startswith("error")]
        tb = "Traceback" in out
        if lines:
            return ("traceback + " if tb else "") + lines[-1][:110].replace("|", "/")
        return "traceback: " + out.strip().splitlines()[-1][:100].replace("|", "/") if tb else "no error line"

    @staticmethod
    def ckpts(run: Path) -> list[str]:
        d = run / "checkpoints"
        return sorted(p.name for p in d.iterdir() if p.name.startswith("step") and (p / "llada_scale.json").exists()) \
            if d.is_dir() else []

    def exited(self, code, seconds) -> str:
        return "hung (killed)" if code is None else f"exit {code} after {seconds:.0f} s"

    # -- data
    def shards(self) -> None:
        tok = self.data / "tokenizer" / "minimind"
        self.tok = tok
        src = self.work / "docs.jsonl"
        with gzip.open(self.data / "pretrain" / "en_classics.jsonl.gz", "rt") as f:
            rows = [next(f) for _ in range(400)]
        src.write_text("".join(rows))
        self.pre, self.sft, self.noval = self.work / "pre", self.work / "sft", self.work / "noval"
        common = [sys.executable, "tools/build_shards.py", "--tokenizer", str(tok), "--no_progress", "--num_workers",
                  "1"]
        for out, extra in ((self.pre, ["--kind", "pretrain", "--input", str(src), "--max_tokens", "120000",
                                       "--shard_tokens", "15000", "--val_docs", "2"]),
                           (self.noval, ["--kind", "pretrain", "--input", str(src), "--max_tokens", "30000",
                                         "--shard_tokens", "15000", "--val_docs", "0"]),
                           (self.sft, ["--kind", "sft", "--input", str(self.data / "sft" / "alpaca_en.jsonl.gz"),
                                       "--max_docs", "300", "--shard_tokens", "8000", "--val_docs", "10"])):
            code, out_text, _ = self.run([*common, "--output", str(out), *extra], 300)
            assert code == 0, out_text[-2000:]


# ---------------------------------------------------------------------------------------------- cases
def case_exit_with_workers(s: Sweep) -> None:
    for ds in (None, "ds_configs/zero1.json", "ds_configs/zero2.json", "ds_configs/zero3.json"):
        run = s.work / f"exit_{ds and Path(ds).stem}"
        code, out, secs = s.train(run, "train.max_steps=3", WORKERS, ds=ds, timeout=120)
        stage = Path(ds).stem if ds else "zero0"
        s.row(f"workers=1, {stage}, normal end", "exit 0, checkpoint step 3", f"{s.exited(code, secs)}, "
              f"{s.ckpts(run)}", code == 0 and s.ckpts(run) == ["step00000003"])
    run = s.work / "exit_sigterm"
    code, out, secs = s.stop_run(s.train_argv(run, "train.max_steps=500", WORKERS, ds="ds_configs/zero2.json"), run,
                                 lambda p: p.send_signal(signal.SIGTERM))
    s.row("workers=1, zero2, SIGTERM", "exit 75 within seconds, checkpoint", f"{s.exited(code, secs)}, "
          f"{len(s.ckpts(run))} ckpt", code == 75 and len(s.ckpts(run)) == 1 and secs < 30)
    run = s.work / "exit_sigint"
    code, out, secs = s.stop_run(s.train_argv(run, "train.max_steps=500", WORKERS, ds="ds_configs/zero3.json"), run,
                                 lambda p: p.send_signal(signal.SIGINT))
    s.row("workers=1, zero3, Ctrl-C (SIGINT)", "exit 130, checkpoint", f"{s.exited(code, secs)}, "
          f"{len(s.ckpts(run))} ckpt", code == 130 and len(s.ckpts(run)) == 1)


def case_nonfinite(s: Sweep) -> None:
    for ds in (None, "ds_configs/zero2.json"):
        run = s.work / f"lr_{ds and Path(ds).stem}"
        code, out, secs = s.train(run, "train.max_steps=60", "optim.lr=1e6", "optim.warmup_steps=1", ds=ds,
                                  timeout=120)
        stage = Path(ds).stem if ds else "zero0"
        s.row(f"optim.lr=1e6, {stage}", "exit 2 (diverged), last good state saved",
              f"{s.exited(code, secs)}, {s.ckpts(run)[-1:]}, {s.err_line(out)[:70]}",
              code == 2 and bool(s.ckpts(run)) and "diverged" in out)


def case_resume(s: Sweep) -> None:
    run = s.work / "other_run"
    s.train(run, "train.max_steps=20", "train.save_every=10")
    code, out, _ = s.train(run, "train.max_steps=12", "train.save_every=5", "train.keep_last=1",
                           opts=("--resume", "none"))
    s.row("--resume none over another run (keep_last=1)", "exit 2, nothing deleted",
          f"exit {code}, checkpoints {s.ckpts(run)}", code == 2 and s.ckpts(run) == ["step00000010", "step00000020"]
          and "already holds checkpoints" in out)
    code, out, _ = s.train(run, "train.max_steps=21", opts=("--init_from", str(run)))
    s.row("--init_from on the command line + checkpoint", "exit 2 (ask for --resume)", s.err_line(out)[:90],
          code == 2 and "was given, but" in out)
    code, out, _ = s.train(run, "train.max_steps=21", opts=("--init_from", str(run), "--resume", "auto"))
    s.row("... with --resume auto", "exit 0, init_from ignored (logged)", f"exit {code}",
          code == 0 and "is ignored" in out)
    for what in ("truncate optimizer shard", "delete model file"):
        run = s.work / f"damaged_{what.split()[0]}"
        s.train(run, "train.max_steps=6", "train.save_every=3", ds="ds_configs/zero2.json")
        tag = run / "checkpoints" / "step00000006"
        if what.startswith("truncate"):
            f = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            (tag / "mp_rank_00_model_states.pt").unlink()
        code, out, _ = s.train(run, "train.max_steps=8", ds="ds_configs/zero2.json")
        s.row(f"resume, newest checkpoint damaged ({what})", "warns, resumes from step 3, exit 0",
              f"exit {code}, {'resumed at step 3' if 'at step 3' in out else s.err_line(out)[:80]}",
              code == 0 and "at step 3" in out)


def case_disk_full(s: Sweep) -> None:
    mnt = s.work / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        s.row("disk full during a save", "no space left writing PATH, previous kept", "not run (cannot mount tmpfs)",
              True)
        return
    try:
        run = s.work / "diskfull"
        run.mkdir()
        (mnt / "ckpts").mkdir()
        (run / "checkpoints").symlink_to(mnt / "ckpts")
        code, out, _ = s.train(run, "train.max_steps=6", "train.save_every=2", "model.hidden_size=128",
                               "model.intermediate_size=256")
        s.row("disk full during a save (24 MiB tmpfs)", "exit 2, 'no space left ... PATH', previous intact",
              f"exit {code}, {s.err_line(out)[:80]}, kept {s.ckpts(run)}",
              code == 2 and "no space left" in out and bool(s.ckpts(run)))
    finally:
        subprocess.run(["umount", str(mnt)])


def case_bad_config(s: Sweep) -> None:
    def check(case, extra, expect, ds=None, shards=None, recipe=RECIPE):
        run = s.work / f"bad{s.n}"  # its own run dir: a checkout that accepts the input trains (and saves) there
        code, out, _ = s.run([*s.train_argv(run, *extra, ds=ds, shards=shards, recipe=recipe)], 120)
        one = s.err_line(out)
        s.row(case, f"exit 2, one line: {expect}", f"exit {code}, {one[:90]}",
              code == 2 and "Traceback" not in out and expect in out)

    check("model.causal='\"false\"'", ['model.causal="false"'], "a YAML bool")
    check("train.max_steps=2.5", ["train.max_steps=2.5"], "must be an integer")
    check("train.max_steps=-5", ["train.max_steps=-5"], "must be >= 1")
    check("optim.schedule=cosin", ["optim.schedule=cosin"], "one of wsd, cosine, constant")
    check("optim.betas=0.9", ["optim.betas=0.9"], "list of two numbers")
    check("data.seq_len=512 (max_seq_len 256)", ["data.seq_len=512"], "longer than the model's max_seq_len")
    check("val split missing, val_every=2", ["train.val_every=2"], "needs the val split", shards=s.noval)
    check("SFT recipe on pretraining shards", [], "trains on sft shards",
          recipe=["--config", "configs/sft_diffusion_tiny.yaml"])
    typo = s.work / "typo.json"
    typo.write_text(json.dumps({"zero_optimizaton": {"stage": 2}}))
    check("DeepSpeed key typo zero_optimizaton", [], "did you mean 'zero_optimization'", ds=str(typo))
    stage = s.work / "stage.json"
    stage.write_text(json.dumps({"zero_optimization": {"stage": "2"}}))
    check("DeepSpeed stage \"2\" (string)", [], "must be the integer 0, 1, 2 or 3", ds=str(stage))
    lst = s.work / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    check("recipe YAML is a list", [], "must hold a mapping", recipe=["--config", str(lst)])
    check("model.hidden_size=100 model.num_heads=3", ["model.hidden_size=100", "model.num_heads=3"],
          "not divisible")
    code, out, _ = s.train(s.work / "e4", "train.max_steps=1e4", "train.stop_at_step=1")
    s.row("train.max_steps=1e4", "accepted as 10000", f"exit {code}", code == 0 and "/10000" in out)


def case_vocab(s: Sweep) -> None:
    """Shards whose ids exceed the model's vocabulary (built with a bigger tokenizer): the shard is named."""
    import io
    import tarfile

    import numpy as np

    big = s.work / "bigvocab"
    shutil.copytree(s.pre, big)
    for shard in sorted(big.glob("train-*.tar")):  # first token of every document := 9000
        with tarfile.open(shard) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as t:
            for m, data in members:
                if m.name.endswith("input_ids.npy"):
                    arr = np.load(io.BytesIO(data)).copy()
                    arr[0] = 9000
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    data = buf.getvalue()
                    m.size = len(data)
                t.addfile(m, io.BytesIO(data))
        shard.write_bytes(out.getvalue())
    code, out_text, _ = s.train(s.work / "vocab", "train.max_steps=30", WORKERS, shards=big)
    s.row("token id 9000 in a shard (vocab 6464)", "exit 2, one line naming the shard",
          f"exit {code}, {s.err_line(out_text)[:90]}", code == 2 and "Traceback" not in out_text and
          ".tar" in s.err_line(out_text))


def case_early_stop(s: Sweep) -> None:
    run = s.work / "early"
    code, out, _ = s.train(run, "train.max_steps=100", "train.val_every=2", "train.val_batches=1",
                           "train.early_stop_patience=2", "train.early_stop_min_delta=10", "train.log_every=5")
    s.row("early stopping (patience 2, min_delta 10)", "exit 0 at step 6, checkpoint, reason logged",
          f"exit {code}, {s.ckpts(run)}", code == 0 and s.ckpts(run) == ["step00000006"] and "early stopping" in out)
    run = s.work / "stoplog"
    s.train(run, "train.max_steps=20", "train.log_every=5", "train.stop_at_step=7")
    steps = sorted(train_metrics(run))
    s.row("stop at step 7 with log_every=5", "step 7 logged", f"logged steps {steps}", steps == [5, 7])


def case_launchers(s: Sweep) -> None:
    ds_cmd = shutil.which("deepspeed")
    port = str(free_port())  # both launchers default to 29500, which another job on the machine may hold
    launchers = {"deepspeed": [sys.executable, ds_cmd or "deepspeed", "--num_gpus", "1", "--master_port", port,
                               "llada_scale/train.py"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                              port, "-m", "llada_scale.train"]}
    for name, target, sig in (("deepspeed", "launcher", signal.SIGTERM), ("deepspeed", "launcher", signal.SIGUSR1),
                              ("deepspeed", "rank", signal.SIGUSR1), ("deepspeed", "group", signal.SIGINT),
                              ("torchrun", "launcher", signal.SIGUSR1), ("torchrun", "launcher", signal.SIGTERM),
                              ("torchrun", "rank", signal.SIGUSR1), ("torchrun", "group", signal.SIGINT)):
        run = s.work / f"{name}_{target}_{sig.name}"
        argv = [*launchers[name], *RECIPE, *TINY, f"run_dir={run}", f"data.train_shards={s.pre}",
                "train.max_steps=3000", WORKERS]
        box = {}

        def kill(p):
            box["rank"] = launched_rank(p.pid)
            if target == "group":  # Ctrl-C in a terminal: the whole foreground process group
                os.killpg(p.pid, sig)
            else:
                os.kill(p.pid if target == "launcher" else box["rank"], sig)
        code, out, secs = s.stop_run(argv, run, kill, at_step=2)
        deadline = time.time() + 60
        while pid_running(box.get("rank")) and time.time() < deadline:
            time.sleep(0.2)
        alive = pid_running(box.get("rank"))
        ck = s.ckpts(run)
        exp = "checkpoint, rank gone" + (", exit 75" if (name, target) == ("deepspeed", "rank") else "")
        s.row(f"{name} + {sig.name} to the {target}" + (" (Ctrl-C)" if target == "group" else ""), exp, f"launcher {s.exited(code, secs)}, "
              f"{'rank STILL RUNNING' if alive else 'rank gone'}, {ck[-1:] or 'no checkpoint'}",
              not alive and bool(ck) and (code == 75 or (name, target) != ("deepspeed", "rank")))
        if alive:
            os.kill(box["rank"], signal.SIGKILL)


def case_build(s: Sweep) -> None:
    tok = str(s.tok)
    docs = [json.dumps({"text": f"doc {i} " + "words and more words " * 20}) for i in range(60)]
    gz = gzip.compress(("\n".join(docs) + "\n").encode())
    (s.work / "t.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (s.work / "c.jsonl.gz").write_bytes(b"garbage, not gzip" * 30)
    (s.work / "sur.jsonl").write_text("\n".join(docs[:10] + ['{"text": "x \\ud800 y"}'] + docs[10:20]) + "\n")
    (s.work / "mask.jsonl").write_text("\n".join(docs[:10] + [json.dumps({"text": "a <|mask|> b"})]) + "\n")
    base = [sys.executable, "tools/build_shards.py", "--kind", "pretrain", "--tokenizer", tok, "--no_progress",
            "--num_workers", "1", "--val_docs", "1"]

    def build(inp, out, *extra):
        return s.run([*base, "--input", str(s.work / inp), "--output", str(s.work / out), *extra], 120)
    code, out, _ = build("t.jsonl.gz", "b_t")
    s.row("build_shards: truncated .gz", "exit 0, one skipped-row line", f"exit {code}, {out.count('warning')} warning",
          code == 0 and "truncated gzip" in out and "Traceback" not in out)
    code, out, _ = build("c.jsonl.gz", "b_c")
    s.row("build_shards: corrupt .gz", "exit 2, one line", f"exit {code}, {s.err_line(out)[:60]}",
          code == 2 and "Traceback" not in out)
    code, out, _ = build("sur.jsonl", "b_s")
    s.row("build_shards: lone surrogate row", "exit 0, one skipped row", f"exit {code}, "
          f"{'1 skipped' if 'lone surrogate' in out else s.err_line(out)[:60]}", code == 0 and "lone surrogate" in out)
    code, out, _ = build("mask.jsonl", "b_m")
    ids_have_mask = None
    if code == 0:
        chk = (f"import sys; sys.path.insert(0, {str(s.repo)!r}); from llada_scale.data.shards import shard_paths, "
               f"read_shard; print(any(6400 in d for p, _, _ in shard_paths({str(s.work / 'b_m')!r}, 'train') "
               "for _, d, _ in read_shard(p)))")
        ids_have_mask = subprocess.run([sys.executable, "-c", chk], capture_output=True, text=True).stdout.strip()
    s.row("build_shards: literal <|mask|> in a document", "no mask id in the shards (warning)",
          f"exit {code}, mask id in shards: {ids_have_mask}", code == 0 and ids_have_mask == "False")
    # interrupted --overwrite: kill the rebuild while it tokenizes the full corpus
    big = [sys.executable, "tools/build_shards.py", "--kind", "pretrain", "--tokenizer", tok, "--no_progress",
           "--num_workers", "1", "--output", str(s.work / "b_o")]
    s.run([*big, "--input", str(s.work / "docs.jsonl")], 120)
    p = s.start([*big, "--overwrite", "--input", str(s.data / "pretrain" / "en_classics.jsonl.gz"),
                 str(s.data / "pretrain" / "zh_poetry.jsonl.gz")], s.work / "overwrite.log")
    time.sleep(8)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ok = (s.work / "b_o" / "index.json").exists()
    s.row("build_shards --overwrite killed midway", "old shards still usable", f"index.json present: {ok}", ok)


def case_nano(s: Sweep) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    d, ff, vocab = 64, 192, 6401
    sd = {"token_emb.weight": torch.randn(vocab, d, generator=g), "lm_head.weight": torch.randn(vocab, d, generator=g)}
    for i in range(2):
        for n in ("c_q", "c_k", "c_v", "c_proj"):
            sd[f"blocks.{i}.attn.{n}.weight"] = torch.randn(d, d, generator=g) * 0.2
        sd[f"blocks.{i}.mlp.gate_proj.weight"] = torch.randn(ff, d, generator=g) * 0.2
        sd[f"blocks.{i}.mlp.up_proj.weight"] = torch.randn(ff, d, generator=g) * 0.2
        sd[f"blocks.{i}.mlp.down_proj.weight"] = torch.randn(d, ff, generator=g) * 0.2
    ar_args = {"num_attention_heads": 4, "rope_theta": 1e4, "rms_norm_eps": 1e-6, "hidden_act": "silu",
               "inference_rope_scaling": False, "max_position_embeddings": 32768, "max_seq_len": 256, "lr": 3e-4}
    torch.save(sd, s.work / "bare.pt")
    torch.save({"model_state_dict": sd, "args": ar_args}, s.work / "ar.pt")
    conv = [sys.executable, "tools/convert_checkpoint.py", "import-nano-llada", "--quiet"]
    code, out, _ = s.run([*conv, str(s.work / "bare.pt"), str(s.work / "n1")], 120)
    s.row("import-nano-llada: bare state dict, no flags", "exit 2: pass --num_heads (no guess)",
          f"exit {code}, {s.err_line(out)[:80]}", code == 2)
    code, out, _ = s.run([*conv, str(s.work / "ar.pt"), str(s.work / "n2")], 120)
    cfg = json.loads((s.work / "n2" / "config.json").read_text()).get("model", {}) if code == 0 else {}
    got = {k: cfg.get(k) for k in ("num_heads", "rope_theta", "norm_eps", "causal")}
    s.row("import-nano-llada: Nano-LLaDA AR .pt with args", "heads 4, theta 1e4, eps 1e-6, causal",
          f"exit {code}, {got}", code == 0 and got == {"num_heads": 4, "rope_theta": 1e4, "norm_eps": 1e-6,
                                                       "causal": True})
    code, out, _ = s.run([*conv, str(s.work / "ar.pt"), str(s.work / "n3"), "--num_heads", "8"], 120)
    s.row("import-nano-llada: --num_heads 8 vs recorded 4", "exit 2 naming both", f"exit {code}, "
          f"{s.err_line(out)[:80]}", code == 2 and "8" in out and "4" in out)


CASES = [case_exit_with_workers, case_nonfinite, case_resume, case_disk_full, case_bad_config, case_vocab,
         case_early_stop, case_launchers, case_build, case_nano]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_integrity import INTEGRITY_CASES  # noqa: E402  (issue 20: checksums, lock, --force, ENOSPC, API, chat)

CASES += INTEGRITY_CASES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(HERE), help="checkout to test (default: this one)")
    p.add_argument("--data", default=os.environ.get("LLADA_DATA", str(HERE.parent / "shared" / "data")),
                   help="the project's data directory (tokenizer/, pretrain/, sft/)")
    p.add_argument("--only", default="", help="run only the case groups whose function name contains this")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hostile_sweep_"))
    s = Sweep(Path(args.repo).resolve(), work, Path(args.data))
    t0 = time.time()
    try:
        s.shards()
        print(f"\nhostile sweep of {s.repo} (work dir {work})\n\n| case | expected | observed | pass |\n|---|---|---|---|")
        for case in CASES:
            if args.only in case.__name__:
                try:
                    case(s)
                except Exception as e:  # noqa: BLE001 - a broken case is a row, not the end of the sweep
                    s.row(case.__name__, "runs", f"sweep error {type(e).__name__}: {e}"[:120], False)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = sum(r[3] for r in s.rows)
    print(f"\n{ok}/{len(s.rows)} cases pass, {time.time() - t0:.0f} s")
    return 0 if ok == len(s.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
