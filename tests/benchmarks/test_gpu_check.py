"""benchmarks/gpu_check.py --cpu-dry-run: the GPU self-check's code runs end to end at tiny sizes on CPU, so it
cannot rot between the rare runs on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "gc"),
                        "--cpu-dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    checks = {(row["check"], row["length"]) for row in result["correctness"]}
    assert len(checks) == 7 and all(row["ok"] for row in result["correctness"])
    assert {("flex vs sdpa, block mask", 80), ("flex vs sdpa, causal mask", 40)} <= checks
    speed = result["speed"]
    assert {(row["objective"], row["activation_checkpointing"].split()[0]) for row in speed} >= \
        {(o, a) for o in ("ar", "diffusion", "block") for a in ("none", "full")}
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in speed)  # no datasheet peak for a CPU
    assert any(row["model"].startswith("llada-8b shape") for row in speed)
    assert [row["variant"].split(":")[0] for row in result["loss_memory"]] == ["full logits + cross_entropy", "lean"]
    assert "| flex vs sdpa, block mask |" in (tmp_path / "gc" / "gpu_check.md").read_text()


def test_gpu_check_without_gpu_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cpu-dry-run" in r.stderr
