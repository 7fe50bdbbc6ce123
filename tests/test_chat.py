"""tools/chat.py driven through stdin: multi-turn history through the chat template, /reset, --watch frames,
history trimmed to max_seq_len, one-line errors; and once as a real subprocess with piped stdin."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from llada_scale.api import Model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import chat  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"dm": tiny_checkpoint(False, 160), "ar": tiny_checkpoint(True, 160)}


def run_chat(monkeypatch, capsys, argv, lines):
    calls = []
    real = Model.chat
    monkeypatch.setattr(Model, "chat", lambda self, messages, **kw: (calls.append(list(messages)),
                                                                     real(self, messages, **kw))[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    rc = chat.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err, calls


def test_multi_turn_reset_and_quit(ckpts, monkeypatch, capsys):
    rc, out, _, calls = run_chat(monkeypatch, capsys, [ckpts["dm"], "--gen_length", "8", "--block_length", "8",
                                                       "--system", "Be brief."],
                                 ["hello", "", "and then?", "/reset", "again", "/quit", "never read"])
    assert rc == 0
    assert out.count("model> ") == 3 and "(conversation cleared)" in out
    assert [[m["role"] for m in c] for c in calls] == [["system", "user"], ["system", "user", "assistant", "user"],
                                                       ["system", "user"]]
    assert calls[1][2]["content"] == out.split("model> ")[1].split("\n")[0]  # the answer went into the history


def test_watch_frames_and_history_trimming(ckpts, monkeypatch, capsys):
    rc, out, _, calls = run_chat(monkeypatch, capsys, [ckpts["dm"], "--gen_length", "8", "--block_length", "8",
                                                       "--steps", "4", "--watch", "--mask_symbol", "#"],
                                 ["word " * 40, "word " * 40, "word " * 40])
    assert rc == 0
    frames = [line for line in out.splitlines() if line.startswith("[step")]
    assert len(frames) == 12 and "#" in frames[0] and not frames[3].count("#")
    assert "dropped the 1 oldest turn(s) to fit max_seq_len 160" in out
    assert len(calls[2]) < 5


def test_ar_sampler_flags_and_errors(ckpts, monkeypatch, capsys, tmp_path):
    rc, out, err, _ = run_chat(monkeypatch, capsys, [ckpts["ar"], "--gen_length", "8", "--watch",
                                                     "--repetition_penalty", "1.2"], ["hi", "word " * 300])
    assert rc == 0 and out.count("model> ") == 1 and "note: --watch" in err
    assert "error: " in err and "max_seq_len" in err  # a single message beyond the context is refused, once
    rc, _, err, _ = run_chat(monkeypatch, capsys, [str(tmp_path / "missing")], [])
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_in_a_pseudo_terminal(ckpts):
    """As a user sees it: a real terminal (pty) gets the 'you> ' prompt and the --watch frames redrawn in place."""
    import os
    import select

    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, str(REPO / "tools" / "chat.py"), ckpts["dm"], "--gen_length", "8",
                          "--block_length", "8", "--steps", "2", "--watch", "--sampler", "threshold", "--cache", "dual"],
                         stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    os.write(master, b"hi\n/quit\n")
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            p.kill()
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=30) == 0, out[-2000:]
    os.close(master)
    text = out.decode(errors="replace")
    assert "you> " in text and "\x1b[2Kmodel [1]> " in text and "model> " in text
