"""A real two-node SLURM cluster on this machine, for tests/training/test_slurm.py (root only).

munged (own socket, pid and log under a temporary directory), slurmctld and two slurmd daemons started as
``slurmd -N n1`` / ``slurmd -N n2`` with their own ports and spool directories, partition ``debug`` of both
nodes. ``n1``/``n2`` are made resolvable with one /etc/hosts line that :meth:`LocalSlurm.stop` removes again.
Everything this module starts is ended by pid in :meth:`LocalSlurm.stop`, which never raises.

By hand (debugging)::

    python tests/training/slurm_cluster.py up      # prints the SLURM_CONF to export; state in /tmp/llada_slurm_*
    python tests/training/slurm_cluster.py down /tmp/llada_slurm_XXXX
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llada_scale.testing import free_port, pid_running

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged", "munge"]
NODES = ("n1", "n2")
HOSTS_FILE = Path("/etc/hosts")


class Unavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def _run(cmd, timeout=60, check=True, env=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def ensure_packages(packages=PACKAGES, binaries=BINARIES, timeout=900) -> None:
    """Install ``packages`` with apt when one of ``binaries`` is missing. Raises Unavailable when not root,
    without apt, or when apt fails (e.g. no network)."""
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to install {packages} (missing: {[b for b in binaries if not shutil.which(b)]})")
    if not shutil.which("apt-get"):
        raise Unavailable(f"no apt-get to install {packages}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{' '.join(cmd)} took more than {timeout} s") from None
        if r.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-800:]}")
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        raise Unavailable(f"installed {packages} but {missing} are still missing")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class LocalSlurm:
    """Start with :meth:`start`, always :meth:`stop`. ``env`` is the environment for sbatch/squeue/... ."""

    def __init__(self, root: str | None = None):
        self.dir = Path(root or tempfile.mkdtemp(prefix="llada_slurm_"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.hosts_line = None
        self.hosts_before = None
        self.hosts_after = None

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60) -> "LocalSlurm":
        for sub in ("state", "log", "spool/n1", "spool/n2", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # the munge user must reach its subdirectory
        self._add_hosts()
        self._start_munge()
        host = socket.gethostname().split(".")[0]
        ports = [free_port() for _ in range(3)]
        d = self.dir
        self.conf.write_text(f"""# written by tests/training/slurm_cluster.py
ClusterName=llada_test
SlurmctldHost={host}
SlurmctldPort={ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=20
# a requeued job may start again cred_expire s after it stopped (default 120 s; AuthInfo above)
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        _run(["slurmctld", "-c", "-f", str(self.conf)], env=self.env)
        for node in NODES:
            _run(["slurmd", "-N", node, "-f", str(self.conf)], env=self.env)
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            r = _run(["sinfo", "-N", "-h", "-o", "%N %t"], check=False, env=self.env)
            last = r.stdout + r.stderr
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not become idle in {timeout} s: {last.strip()}\n{self.logs()}")

    def _add_hosts(self):
        """Make n1/n2 resolvable: one marked line in /etc/hosts (removed by stop)."""
        try:
            before = HOSTS_FILE.read_text()
        except OSError:
            before = ""
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # llada_scale tests/training/slurm_cluster.py {self.dir.name}"
        after = before + ("" if before.endswith("\n") or not before else "\n") + self.hosts_line + "\n"
        with open(HOSTS_FILE, "w") as f:  # in place: /etc/hosts is often a bind mount
            f.write(after)
        self.hosts_before, self.hosts_after = before, after

    def _start_munge(self):
        m = self.dir / "munge"
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            creator = shutil.which("mungekey") or shutil.which("create-munge-key")
            if creator is None:
                raise Unavailable("no /etc/munge/munge.key and no mungekey to create one")
            _run([creator, "--create"] if creator.endswith("mungekey") else [creator])
        shutil.chown(m, "munge", "munge")
        os.chmod(m, 0o755)  # munged: the socket directory must be executable by all
        cmd = ["/usr/sbin/munged", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"]
        _run(["su", "-s", "/bin/sh", "munge", "-c", " ".join(cmd)])
        for _ in range(50):
            r = subprocess.run(f"munge -n -S {m}/munge.socket | unmunge -S {m}/munge.socket", shell=True,
                               capture_output=True, text=True)
            if "Success" in r.stdout:
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start: {r.stdout} {r.stderr}")

    # ------------------------------------------------------------------ use
    def run(self, cmd, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
        return _run(cmd, timeout=timeout, check=check, env={**self.env, **kw.pop("env", {})}, **kw)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...); {} when unknown."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        out = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def logs(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")) + [self.dir / "munge" / "munged.log"]:
            try:
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-40:]))
            except OSError:
                pass
        return "\n".join(out)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel jobs, shut the daemons down (by pid if needed), end munged, restore /etc/hosts, remove
        the directory. Never raises."""
        pids = [p for p in (_read_pid(self.dir / "slurmctld.pid"), *(_read_pid(self.dir / f"slurmd-{n}.pid")
                                                                     for n in NODES)) if p]
        if self.conf.is_file():
            for cmd in (["scancel", "--full", "--user=root"], ["scontrol", "shutdown"]):
                try:
                    _run(cmd, timeout=30, check=False, env=self.env)
                except Exception:  # noqa: BLE001 - best effort
                    pass
                if cmd[0] == "scancel":
                    self._wait_no_jobs(30)
        self._end(pids, 20)
        # job processes that outlived their slurmstepd (should not happen; only ours: they carry SLURM_CONF)
        self._end(self._job_processes(), 10)
        munged = _read_pid(self.dir / "munge" / "munged.pid")
        if munged:
            self._end([munged], 10)
        self._restore_hosts()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_no_jobs(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                r = _run(["squeue", "-h", "-o", "%i %T"], timeout=10, check=False, env=self.env)
            except Exception:  # noqa: BLE001
                return
            if r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(0.5)

    def _job_processes(self) -> list[int]:
        pids = []
        needle = f"SLURM_CONF={self.conf}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and b"SLURM_JOB_ID=" in env:
                pids.append(int(d.name))
        return pids

    @staticmethod
    def _end(pids, timeout):
        pids = [p for p in pids if p and pid_running(p)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
            deadline = time.time() + timeout
            while time.time() < deadline and any(pid_running(p) for p in pids):
                time.sleep(0.2)
            pids = [p for p in pids if pid_running(p)]
            if not pids:
                return

    def _restore_hosts(self):
        if self.hosts_line is None:
            return
        try:
            now = HOSTS_FILE.read_text()
            if now == self.hosts_after:
                restored = self.hosts_before
            else:  # someone else changed it meanwhile: drop only our line
                restored = "".join(line for line in now.splitlines(keepends=True)
                                   if line.rstrip("\n") != self.hosts_line)
            with open(HOSTS_FILE, "w") as f:
                f.write(restored)
        except OSError:
            pass
        self.hosts_line = None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "up":
        ensure_packages()
        c = LocalSlurm().start()
        print(f"export SLURM_CONF={c.conf}")
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        c = LocalSlurm(sys.argv[2])
        c.hosts_line = next((line.rstrip("\n") for line in HOSTS_FILE.read_text().splitlines()
                             if line.endswith(Path(sys.argv[2]).name)), None)
        if c.hosts_line:
            c.hosts_after = None
        c.stop()
    else:
        sys.exit(__doc__)
