"""benchmarks/gpu_check.py's machinery (issue 21): a row that raises is recorded and the check goes on, the JSON
is on disk after every row, a section stops at its budget; and its mask check can fail: the float32 attention
comparison sees a leak confined to one 128-row tile, which the old loss comparison did not."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_rows as rows  # noqa: E402


def test_failing_row_is_recorded_and_json_written_after_every_row(tmp_path):
    result = {"device": "cpu", "dry_run": True, "skipped": [], "_t0": 0.0}
    rec = gpu_check.Recorder(tmp_path, result, {"correctness": 1e9, "speed": -1.0})

    def boom():
        raise RuntimeError("kernel exploded\nsecond line")

    rec.row("correctness", "first", lambda: {"check": "first", "ok": True})
    assert json.loads((tmp_path / "gpu_check.json").read_text())["correctness"][0]["ok"]
    rec.row("correctness", "second", boom)
    rec.row("correctness", "third", lambda: {"check": "third", "ok": True})
    rec.row("speed", "over budget", lambda: {"never": "run"})
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["label"] for r in on_disk["correctness"]] == ["first", "second", "third"]
    assert on_disk["correctness"][1] | {"seconds": 0} == {"label": "second", "ok": False, "seconds": 0,
                                                         "error": "RuntimeError: kernel exploded", "graphs": 0,
                                                         "graph_breaks": 0, "frames_compiled": 0}
    assert on_disk["speed"] == [] and on_disk["skipped"] == ["speed: over budget (time budget)"]
    assert "NO: RuntimeError: kernel exploded" in (tmp_path / "gpu_check.md").read_text()


def test_attention_check_sees_a_one_tile_leak():
    """Finding 6: a document mask that leaks in one 128-row tile only (queries 0-127 see the next document):
    the float32 attention outputs differ by far more than the 1e-4 tolerance, while the loss of a model under
    the two masks (what gpu_check compared before) moves by less than its old 1e-2 threshold."""
    gen = torch.Generator().manual_seed(0)
    length = 512
    doc = (torch.arange(length) // 64).int().expand(1, length)  # 8 documents of 64 tokens
    batch = {"position_ids": (torch.arange(length) % 64).expand(1, length), "document_ids": doc}
    right, _ = rows.masks("document bidirectional", batch, "sdpa")
    leaky = right.clone()
    leaky[..., :128, :256] = True  # the first tile of queries sees documents 0-3
    q, k, v = (torch.randn(1, 4, length, 32, generator=gen) for _ in range(3))
    assert rows.attention_error(q, k, v, right, right) == 0.0
    assert rows.attention_error(q, k, v, leaky, right) > 100 * rows.ATTN_TOL
    logits_w = torch.randn(32, 64, generator=gen) * 0.1

    def loss(mask):  # one attention layer + a head, mean CE over all positions
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0].mean(0) @ logits_w
        return float(F.cross_entropy(out, torch.randint(0, 64, (length,), generator=torch.Generator())))

    assert abs(loss(leaky) - loss(right)) / loss(right) < 1e-2
