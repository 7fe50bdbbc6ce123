"""benchmarks/gpu_check.py --cpu-dry-run: the GPU self-check's code runs end to end at tiny sizes on CPU, so it
cannot rot between the rare runs on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llada_scale.testing import vector_kernels

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not vector_kernels(), reason="the dry run compiles FlexAttention on CPU inductor, which needs "
                    "AVX2/AVX-512 kernels; ATEN_CPU_CAPABILITY=default turns them off")
def test_gpu_check_cpu_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "gc"),
                        "--cpu-dry-run"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    # the CPU twin: every mask compiled (create_block_mask + flex forward on inductor) and equal to SDPA
    checks = {(row["check"], row["length"]) for row in result["correctness"]}
    assert len(checks) == 10 and all(row["ok"] and not row["error"] for row in result["correctness"])
    assert {("attention fp32 flex vs sdpa, block diffusion (training)", 144),
            ("attention fp32 flex vs sdpa, document causal", 72)} <= checks
    ckpt = [row for row in result["correctness"] if row["label"] == "compile x checkpointing"]
    assert ckpt[0]["graphs"] > 0 and ckpt[0]["graph_breaks"] == 0
    speed = result["speed"]
    assert not any(row["error"] for row in speed + result["trainer"] + result["loss_memory"])
    assert {(row["objective"], row["activation_checkpointing"].split()[0]) for row in speed} >= \
        {(o, a) for o in ("ar", "diffusion", "block") for a in ("none", "full")}
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in speed)  # no datasheet peak for a CPU
    assert all(row["recompiles_after_warmup"] == 0 and row["graph_breaks"] == 0 for row in speed)
    assert all(0 < row["attention_tile_density"] <= 1 for row in speed)
    assert speed[0]["model"] == "1b" and speed[2]["model"].startswith("llada-8b shape")  # ordered by value
    assert result["trainer"][0]["model"].startswith("Trainer (zero1.json)") and result["trainer"][0]["step_s"] > 0
    assert [row["label"].split(":")[0] for row in result["loss_memory"]] == ["full logits + cross_entropy", "lean"]
    md = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert "| attention fp32 flex vs sdpa, block diffusion (training) |" in md
    # LLaDA2 (issue 17): both checks pass; the mini-slice rows train with both expert paths, eager and compiled
    assert [row["label"] for row in result["llada2_correctness"]] == ["llada2 bf16 vs fp32",
                                                                      "llada2 grouped_mm vs loop"]
    assert all(row["ok"] and not row["error"] for row in result["llada2_correctness"])
    moe = result["llada2_speed"]
    assert len(moe) == 4 and not any(row["error"] for row in moe)
    assert [(row["expert_path"], row["compiled"], row["activation_checkpointing"].split()[0]) for row in moe] == [
        ("grouped_mm", False, "none"), ("loop", False, "none"), ("grouped_mm", True, "none"),
        ("grouped_mm", True, "full")]
    assert all(row["objective"] == "block" and row["tokens_per_s"] > 0 and row["recompiles_after_warmup"] == 0
               and 0 < row["active_params_M"] < row["params_M"] for row in moe)
    assert moe[2]["graphs"] > 0 and all(isinstance(row["graph_breaks"], int) for row in moe)
    assert "| llada2 MoE layer grouped_mm vs loop, bf16, 16 experts top-4 |" in md and "(0.1 act.)" in md


def test_gpu_check_without_gpu_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cpu-dry-run" in r.stderr
