"""The integrity cases of the hostile sweep (issue 20), run by ``benchmarks/hostile_sweep.py`` (``--only integrity``
runs just these): flipped bytes in every checkpoint file kind, imported checksums, two trainers in one run dir,
``--force`` over a run / foreign files / the input, a full disk (1 MiB tmpfs, needs root) at each writer, a LoRA
base swapped under its run, API argument fuzzing, Ctrl-C and bad bytes in the chat through a pty.

Every case drives the checkout under test through subprocesses only (``s.repo``), so the same cases run against
an older checkout for a before/after table. Each function takes the :class:`hostile_sweep.Sweep`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llada_scale.testing import controlling_tty, read_pty_until

ZERO2 = "ds_configs/zero2.json"
T = 600  # seconds per process: the sweep shares a busy machine
CONV = [sys.executable, "tools/convert_checkpoint.py"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 5] ^= 0xFF
    path.write_bytes(bytes(data))


def _py(s, code: str, timeout: float = T) -> tuple[int | None, str]:
    c, out, _ = s.run([sys.executable, "-c", code], timeout)
    return c, out


def _tiny_model(s, out: Path, seed: int, causal: bool = False) -> None:
    """A consolidated tiny model (the sweep's shape, minimind's padded vocab), written with the checkout's code."""
    code = (f"import torch, llada_scale.checkpoint as c; from llada_scale.model.transformer import ModelConfig, "
            f"Transformer; torch.manual_seed({seed}); m = ModelConfig(vocab_size=6464, hidden_size=64, num_layers=2, "
            f"num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=256, causal={causal}, "
            f"mask_token_id={None if causal else 6400}); c.save_safetensors(Transformer(m).state_dict(), "
            f"{str(out)!r}, {{'format': 'llada_scale', 'model': m.to_dict()}}, dtype='fp32', progress=False)")
    code_, text = _py(s, code)
    assert code_ == 0, text[-1500:]


def case_integrity_corrupt(s) -> None:
    """A byte flipped (same size) in the newest checkpoint's model / optimizer file; in a consolidated copy that
    llada_scale.load reads; in an HF directory that brings a SHA256SUMS."""
    for victim in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        run = s.work / f"flip_{victim[:4]}"
        s.train(run, "train.max_steps=6", "train.save_every=3", ds=ZERO2, timeout=T)
        _flip(run / "checkpoints" / "step00000006" / victim)
        code, out, _ = s.train(run, "train.max_steps=8", "train.keep_last=1", ds=ZERO2, timeout=T)
        s.row(f"flipped byte in newest {victim.split('_')[-2]} file, resume (keep_last=1)",
              "warns, resumes from step 3, exit 0", f"exit {code}, "
              f"{'resumed at step 3' if 'at step 3' in out else 'resumed at step 6' if 'at step 6' in out else s.err_line(out)[:70]}",
              code == 0 and "at step 3" in out)
    src = s.work / "flip_mp_r"  # its newest checkpoint (keep_last=1 removed the others)
    cons = s.work / "flip_cons"
    s.run([*CONV, "consolidate", str(src), str(cons), "--quiet", "--tokenizer", str(s.tok)], T)
    _flip(cons / "model.safetensors")
    code, out = _py(s, f"import llada_scale; llada_scale.load({str(cons)!r}, device='cpu'); print('LOADED')")
    s.row("llada_scale.load of a consolidated dir with a flipped byte", "refused, naming model.safetensors",
          "loaded silently" if "LOADED" in out else f"exit {code}, {out.strip().splitlines()[-1][:80]}",
          "LOADED" not in out and "model.safetensors" in out and "SHA-256" in out)
    hf = s.work / "flip_hf"
    _tiny_model(s, hf, 0, causal=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                "vocab_size": 6464, "hidden_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                                "intermediate_size": 128, "max_position_embeddings": 256,
                                                "rms_norm_eps": 1e-6, "rope_theta": 1e4, "hidden_act": "silu"}))
    digest = hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()
    (hf / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    _flip(hf / "model.safetensors")
    code, out, _ = s.run([*CONV, "import-hf", str(hf), str(s.work / "flip_hf_out"), "--quiet"], T)
    s.row("import-hf of a dir whose SHA256SUMS does not match", "exit 2 naming the file",
          f"exit {code}, {s.err_line(out)[:80]}", code == 2 and "model.safetensors" in s.err_line(out))
    hf2 = s.work / "trunc_hf"
    hf2.mkdir()
    (hf2 / "config.json").write_text((hf / "config.json").read_text())
    (hf2 / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:12])
    code, out, _ = s.run([*CONV, "import-hf", str(hf2), str(s.work / "trunc_out"), "--quiet"], T)
    s.row("import-hf of a truncated safetensors header", "exit 2, one line", f"exit {code}, {s.err_line(out)[:80]}",
          code == 2 and "Traceback" not in out)


def case_integrity_concurrent(s) -> None:
    run = s.work / "twice"
    s.n += 1
    first = s.start(s.train_argv(run, "train.max_steps=400", "train.save_every=0"), s.work / "first.txt")
    m = run / "metrics.jsonl"
    deadline = time.time() + T
    while not (m.exists() and m.read_text().count("train/loss") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    code, out, secs = s.run(s.train_argv(run, "train.max_steps=400", "train.save_every=0"), T)
    alive = first.poll() is None
    first.send_signal(signal.SIGTERM)
    s.wait(first, 60)
    steps = [json.loads(x)["step"] for x in m.read_text().splitlines() if x.strip()] if m.exists() else []
    dup = len(steps) - len(set(steps))
    s.row("second trainer in the same run_dir", "exit 2 at once naming host/PID, first unharmed",
          f"{s.exited(code, secs)}, first {'running' if alive else 'gone'}, {dup} steps logged twice",
          code == 2 and "another trainer" in out and "PID" in out and alive and dup == 0)


def case_integrity_force(s) -> None:
    run = s.work / "forced_run"
    s.train(run, "train.max_steps=2", "train.save_every=2", timeout=T)
    shutil.copytree(run, s.work / "src_run")  # the other cases read this copy: a checkout may delete `run`
    tag = run / "checkpoints" / "step00000002"
    code, out, _ = s.run([*CONV, "consolidate", str(tag), str(run), "--force", "--quiet"], T)
    intact = tag.is_dir() and (run / "metrics.jsonl").is_file()
    s.row("consolidate CKPT RUN_DIR --force (output holds the input)", "exit 2, run intact",
          f"exit {code}, run {'intact' if intact else 'DELETED'}", code == 2 and intact)
    tag = s.work / "src_run" / "checkpoints" / "step00000002"
    out_dir = s.work / "foreign"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    code, out, _ = s.run([*CONV, "consolidate", str(tag), str(out_dir), "--force", "--quiet"], T)
    kept = (out_dir / "notes.txt").is_file()
    s.row("consolidate --force into a dir with a foreign file", "exit 0, foreign file kept",
          f"exit {code}, notes.txt {'kept' if kept else 'DELETED'}", code == 0 and kept)
    code, out, _ = s.run([*CONV, "consolidate", str(out_dir), str(out_dir), "--any_source", "--force", "--quiet"], T)
    s.row("consolidate X X --any_source --force (output is the input)", "exit 2", f"exit {code}, "
          f"{s.err_line(out)[:70]}", code == 2 and (out_dir / "notes.txt").is_file())
    code, out, _ = s.run([*CONV, "consolidate", str(tag), str(s.work / "named"), "--quiet"], T)
    final = out.strip().splitlines()[-1] if out.strip() else ""
    s.row("converter's final line", "names the real output dir", final[:90].replace("|", "/"),
          code == 0 and final.endswith(str(s.work / "named")))


def case_integrity_enospc(s) -> None:
    mnt = s.work / "tiny_fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        s.row("ENOSPC at each writer", "one line, previous intact", "not run (cannot mount tmpfs)", True)
        return
    try:
        tag = s.work / "src_run" / "checkpoints" / "step00000002"
        for cmd in ("consolidate", "export-hf"):
            out_dir = mnt / cmd
            out_dir.mkdir()
            (out_dir / "keep.txt").write_text("previous output")
            code, out, _ = s.run([*CONV, cmd, str(tag), str(out_dir), "--force", "--quiet", "--dtype", "fp32"], T)
            kept = (out_dir / "keep.txt").is_file()
            s.row(f"{cmd} onto a full 1 MiB tmpfs", "exit 2, one line, previous kept",
                  f"exit {code}, {s.err_line(out)[:60]}, keep.txt {'kept' if kept else 'gone'}",
                  code == 2 and "Traceback" not in out and "space" in out and kept)
        gz = s.work / "docs.jsonl"
        code, out, _ = s.run([sys.executable, "tools/build_shards.py", "--kind", "pretrain", "--tokenizer", str(s.tok),
                              "--no_progress", "--num_workers", "1", "--input", str(gz), "--output",
                              str(mnt / "shards")], T)
        s.row("build_shards onto a full 1 MiB tmpfs", "exit 2, one line", f"exit {code}, {s.err_line(out)[:70]}",
              code == 2 and "Traceback" not in out and "space" in out)
        for f in mnt.iterdir():
            subprocess.run(["rm", "-rf", str(f)])
        run = mnt / "run"
        run.mkdir()
        (mnt / "filler").write_bytes(b"\0" * (1024 * 1024 - 2 * 4096))  # two pages: the lock file, ~10 lines
        code, out, _ = s.train(run, "train.max_steps=40", "train.save_every=0", timeout=T)
        text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
        whole = not text or text.endswith("\n")
        s.row("metrics.jsonl on a disk that fills up", "never ends in a half line; save fails in one line",
              f"exit {code}, {text.count(chr(10))} whole lines, {'ends whole' if whole else 'HALF LINE'}",
              whole and code == 2 and "Traceback" not in out)
    finally:
        subprocess.run(["umount", str(mnt)])


def case_integrity_lora_base(s) -> None:
    base, other = s.work / "lora_base", s.work / "lora_other"
    _tiny_model(s, base, 1)
    _tiny_model(s, other, 2)
    lora = ["train.lora.rank=4", "train.lora.alpha=8", "train.lora.target_modules=[q_proj,v_proj]",
            "train.micro_batch_size=2", "train.global_batch_size=4"]
    run = s.work / "lora_run"
    s.train(run, f"train.init_from={base}", *lora, "train.max_steps=2", "train.stop_at_step=1", ds=ZERO2, timeout=T)
    code, out, _ = s.train(run, f"train.init_from={other}", *lora, "train.max_steps=2", ds=ZERO2, timeout=T)
    s.row("LoRA resume after train.init_from changed to another base", "exit 2 naming both bases",
          f"exit {code}, {s.err_line(out)[:70]}", code == 2 and "was trained on the base" in out)
    code, out, _ = s.run([*CONV, "merge-lora", str(run), str(s.work / "lora_merged"), "--base", str(other),
                          "--quiet"], T)
    s.row("merge-lora with another base", "exit 2", f"exit {code}, {s.err_line(out)[:70]}", code == 2)


FUZZ = r"""
import math, sys, torch, llada_scale, llada_scale.checkpoint as c
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.data.tokenizer import Tokenizer
tok = Tokenizer.load(sys.argv[1]); torch.manual_seed(0)
m = ModelConfig(vocab_size=tok.padded_vocab_size(), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=64, max_seq_len=256, causal=False, mask_token_id=tok.mask_token_id)
c.save_safetensors(Transformer(m).state_dict(), sys.argv[2], {"format": "llada_scale", "model": m.to_dict(),
                   "tokenizer": tok.identity()}, dtype="fp32", progress=False)
model = llada_scale.load(sys.argv[2], device="cpu")
cases = [dict(gen_length=0), dict(steps=0), dict(block_length=0), dict(gen_length=8, steps=800),
         dict(temperature=math.nan), dict(temperature=-1.0), dict(cfg_scale=math.inf), dict(threshold=0.0),
         dict(repetition_penalty=0.0), dict(gen_length=8.5), dict(batch_size=0), dict(seed=1.5),
         dict(gen_length=10**7, allow_extrapolation=True)]  # 258 GB of logits: refused, or a failed malloc
good = 0
for kw in cases:
    try:
        model.generate("hello", **kw); print("ACCEPTED", kw)
    except ValueError as e:
        good += "\n" not in str(e)
    except Exception as e:
        print("OTHER", kw, type(e).__name__)
for fn in (lambda: model.generate("bad \udcff"), lambda: model.log_likelihood("a", "b", mc_samples=0),
           lambda: model.chat([{"role": "user", "content": "\ud800"}]), lambda: model.log_likelihood("a", "\udc80")):
    try:
        fn(); print("ACCEPTED text/likelihood case")
    except ValueError:
        good += 1
    except Exception as e:
        print("OTHER", type(e).__name__)
print(f"REFUSED {good}/{len(cases) + 4}")
"""


def case_integrity_api(s) -> None:
    code, out = _py(s, FUZZ.replace("sys.argv[1]", repr(str(s.tok))).replace("sys.argv[2]",
                                                                            repr(str(s.work / "fuzz_model"))), 600)
    line = [x for x in out.splitlines() if x.startswith("REFUSED")]
    s.row("API fuzz: 17 bad arguments (0, NaN, inf, steps >> length, 1e7 tokens, lone surrogates)",
          "17/17 one-line ValueError", line[0] if line else f"exit {code}, {out.strip().splitlines()[-1][:60]}",
          bool(line) and line[0] == "REFUSED 17/17")


def case_integrity_chat(s) -> None:
    model = s.work / "fuzz_model"
    if not model.is_dir():
        s.row("chat through a pty", "runs", "skipped: no fuzz_model (run case_integrity_api first)", False)
        return
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "tools/chat.py", str(model), "--gen_length", "8", "--block_length", "8",
                          "--watch", "--watch_delay", "1"], cwd=s.repo, env=s.env, stdin=slave, stdout=slave,
                         stderr=slave, close_fds=True, preexec_fn=controlling_tty)
    os.close(slave)
    buf = bytearray()

    def until(token: bytes, timeout: float = 120) -> bool:
        return read_pty_until(master, buf, token, timeout)

    until(b"you> ")
    os.write(master, b"hello\n")
    until(b"model [1]> ")
    os.write(master, b"\x03")
    until(b"cancel", 15)
    cancelled = p.poll() is None and b"cancel" in buf
    os.write(master, b"\x03")
    try:
        code = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        code = None
    until(b"\0", 1)
    os.close(master)
    tb = b"Traceback" in buf
    s.row("chat (pty): Ctrl-C during an answer, then at the prompt", "answer cancelled, prompt back; exit 0, no traceback",
          f"{'cancelled, prompt back' if cancelled else 'process ended'}; exit {code}; {'traceback' if tb else 'no traceback'}",
          cancelled and code == 0 and not tb)
    r = subprocess.run([sys.executable, "tools/chat.py", str(model), "--gen_length", "8", "--block_length", "8"],
                       cwd=s.repo, env=s.env, input=b"bad \xff\xfe bytes\nhello\n", capture_output=True, timeout=300)
    answers = r.stdout.count(b"model> ")
    s.row("chat: a line of invalid UTF-8, then a good one", "the bad line reported, the good one answered",
          f"exit {r.returncode}, {answers} answer(s), {'traceback' if b'Traceback' in r.stderr else 'no traceback'}",
          r.returncode == 0 and answers == 1 and b"Traceback" not in r.stderr)


def case_integrity_gzip(s) -> None:
    docs = [json.dumps({"text": f"doc {i} " + "words and more words " * 20}) for i in range(60)]
    gz = bytearray(gzip.compress(("\n".join(docs) + "\n").encode()))
    gz[-8] ^= 0xFF  # the CRC32 of the trailer
    (s.work / "crc.jsonl.gz").write_bytes(bytes(gz))
    code, out, _ = s.run([sys.executable, "tools/build_shards.py", "--kind", "pretrain", "--tokenizer", str(s.tok),
                          "--no_progress", "--num_workers", "1", "--val_docs", "1", "--input",
                          str(s.work / "crc.jsonl.gz"), "--output", str(s.work / "b_crc")], T)
    s.row("build_shards: .gz whose checksum fails", "exit 2 (rows may be garbled)", f"exit {code}, "
          f"{s.err_line(out)[:70]}", code == 2 and "Traceback" not in out)


INTEGRITY_CASES = [case_integrity_corrupt, case_integrity_concurrent, case_integrity_force, case_integrity_enospc,
                   case_integrity_lora_base, case_integrity_api, case_integrity_chat, case_integrity_gzip]
