"""tools/chat.py under a hostile user (issue 20): Ctrl-C while an answer is generated cancels it and keeps the
conversation, Ctrl-C at the prompt exits cleanly, bytes that are not UTF-8 are reported and skipped, out-of-range
sampling flags exit 2 in one line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada_scale.api import Model
from llada_scale.testing import controlling_tty, read_pty_until

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import chat  # noqa: E402


@pytest.fixture(scope="module")
def dm(tiny_checkpoint):
    return tiny_checkpoint(False, 160)


def test_ctrl_c_cancels_the_answer_and_keeps_the_conversation(dm, monkeypatch, capsys):
    calls = []
    real = Model.chat

    def chat_once_interrupted(self, messages, **kw):
        calls.append(list(messages))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, messages, **kw)

    monkeypatch.setattr(Model, "chat", chat_once_interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\nthird\n"))
    assert chat.main([dm, "--gen_length", "8", "--block_length", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "(answer cancelled" in out
    # the cancelled turn left no trace: the third message follows the first answer
    assert [m["content"] for m in calls[2]][:2] == ["first", out.split("model> ")[1].split("\n")[0]]
    assert [m["content"] for m in calls[2]][2] == "third" and len(calls[2]) == 3


def test_ctrl_c_at_the_prompt_and_bad_flags(dm, monkeypatch, capsys):
    class Interrupting(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupting())
    assert chat.main([dm, "--gen_length", "8"]) == 0
    for flags, msg in ((["--steps", "0"], "steps must be an integer >= 1"),
                       (["--temperature", "nan"], "temperature must be a finite number"),
                       (["--gen_length", "8", "--steps", "99"], "steps must be an integer >= 1 and <= 8"),
                       (["--block_length", "0"], "block_length must be")):
        assert chat.main([dm, *flags]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_invalid_utf8_is_reported_and_skipped(dm):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "chat.py"), dm, "--gen_length", "8", "--block_length",
                        "8"], input=b"bad \xff\xfe bytes\nhello\n", capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "message is not valid Unicode" in err and "skipped" in err
    assert r.stdout.decode().count("model> ") == 1


def test_ctrl_c_in_a_terminal(dm):
    """Through a pty as a user types it: Ctrl-C during a slow --watch answer, then again at the prompt."""
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, str(REPO / "tools" / "chat.py"), dm, "--gen_length", "8", "--block_length",
                          "8", "--watch", "--watch_delay", "1"], stdin=slave, stdout=slave, stderr=slave,
                         close_fds=True, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=controlling_tty)
    os.close(slave)
    out = bytearray()

    def read_until(token: bytes, timeout: float = 120) -> bool:
        return read_pty_until(master, out, token, timeout)

    try:
        assert read_until(b"you> "), out[-2000:]
        os.write(master, b"hi\n")
        assert read_until(b"model [1]> "), out[-2000:]
        os.write(master, b"\x03")  # the terminal sends SIGINT to the foreground process
        assert read_until(b"answer cancelled"), out[-2000:]
        assert read_until(b"cancelled; Ctrl-C at the prompt or /quit exits)\r\nyou> "), out[-2000:]
        os.write(master, b"\x03")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert b"Traceback" not in out, bytes(out[-2000:])
