"""Helpers for the tests: a small harness to run real multi-process jobs (gloo on CPU, one process per rank), the
trainer's logged metrics, and the float comparison the tests' tolerance rule needs (tests/README.md).

Each rank is a separate ``python`` process with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set,
as torchrun or the SLURM scripts would set them, so the code under test takes its ordinary launch path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list[str], world_size: int, env: dict | None = None, timeout: float = 600,
              cwd: str | Path | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``python *argv`` as ``world_size`` ranks and wait for all of them.

    Returns one CompletedProcess per rank (stdout and stderr as text). Raises ``RuntimeError`` with the
    failing ranks' output if any rank exits non-zero or the run exceeds ``timeout`` seconds.
    """
    port = free_port()
    procs = []
    for rank in range(world_size):
        e = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
             "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, cwd=cwd or REPO_ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f"{argv} did not finish within {timeout} s")
    failed = [(i, r) for i, r in enumerate(results) if r.returncode != 0]
    if failed:
        detail = "\n".join(f"--- rank {i} exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}" for i, r in failed)
        raise RuntimeError(f"{argv} failed on ranks {[i for i, _ in failed]}:\n{detail}")
    return results


def child_pids(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (from /proc; Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def pid_running(pid: int | None) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launched_rank(launcher: int) -> int | None:
    """The training process below a launcher pid (``torchrun``, ``deepspeed``): the first descendant whose command
    line runs ``llada_scale.train`` / ``train.py`` itself (not ``deepspeed.launcher.launch``), or None."""
    todo = child_pids(launcher)
    while todo:
        pid = todo.pop(0)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"train.py") or c == b"llada_scale.train" for c in cmd) \
                and b"deepspeed.launcher.launch" not in cmd:
            return pid
        todo += child_pids(pid)
    return None


def train_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step -> the trainer's training-metrics row from ``run_dir/metrics.jsonl`` (rows with ``train/loss``;
    a step logged twice, e.g. around a resume, keeps its last row)."""
    rows = (json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if "train/loss" in r}


def train_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> ``train/loss`` from ``run_dir/metrics.jsonl`` (see :func:`train_metrics`)."""
    return {step: row["train/loss"] for step, row in train_metrics(run_dir).items()}


def assert_close_to_scale(actual, expected, rtol: float = 1e-5, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with every element's error measured against the tensor's scale:
    ``|actual - expected| <= rtol * |expected| + rtol * max|expected|``.

    For results of float reductions (matmuls, softmax, gradients summed over tokens) computed along two paths whose
    summation order differs (chunked vs whole, other SIMD kernels, another CPU): each element's rounding error is
    a fraction of the magnitudes summed into it, not of its own value, so an entry that cancels to near zero may
    carry an absolute error of a few ``eps * max|expected|`` (fp32 eps = 1.2e-7). With ``rtol=1e-5`` the tests'
    comparisons use at most ~10% of the tolerance, with and without vector kernels (docs/LOG.md, issue 16), while
    a real mistake (a wrong token, mask or factor) is off by far more than 1e-5 of the scale; differences below
    it (e.g. an RMSNorm eps of 1e-5 vs 1e-6 on unit-scale inputs) need a test built to magnify them.

    Args:
        actual, expected: float tensors of the same shape and dtype.
        rtol: relative tolerance, also applied to ``max|expected|`` as the absolute floor.
        msg: prefix of the failure message (e.g. the parameter name), followed by torch's own details.

    Raises:
        AssertionError: from ``torch.testing.assert_close``, naming the worst element.
    """
    import torch

    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=None if msg is None else lambda detail: f"{msg}: {detail}")


def controlling_tty() -> None:
    """``preexec_fn`` for a child whose stdin is a pty slave: a new session with that pty as its controlling
    terminal, so that Ctrl-C (``\\x03``) written to the master reaches it as SIGINT, as in a real terminal."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def read_pty_until(master: int, out: bytearray, token: bytes, timeout: float = 120) -> bool:
    """Append what the pty ``master`` prints to ``out`` until ``token`` appears in it; False after ``timeout``
    seconds or when the child closed the terminal first."""
    import select
    import time

    end = time.time() + timeout
    while token not in out and time.time() < end:
        if select.select([master], [], [], 0.5)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
    return token in out


def vector_kernels() -> bool:
    """False when ``ATEN_CPU_CAPABILITY=default`` turns off the CPU's vector kernels (the portability run of the
    suite, tests/README.md). torch's CPU FlexAttention lowering in inductor needs a vector ISA (``NotImplementedError:
    torch.compile on current platform is not supported for CPU``), so the flex CPU twins skip there."""
    return os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() != "default"

