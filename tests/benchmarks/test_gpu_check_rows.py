"""benchmarks/gpu_check.py's machinery (issue 21): a row that raises is recorded and the check goes on, the JSON
is on disk after every row, a section stops at its budget; and its mask check can fail: the float32 attention
comparison sees a leak confined to one 128-row tile, which the old loss comparison did not. The LLaDA2 rows
(issue 17): MFU counts the parameters a token is multiplied by, and the two LLaDA2 checks fail on a broken
grouped GEMM."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_llada2 as l2  # noqa: E402
import gpu_check_rows as rows  # noqa: E402
from llada_scale.model.llada2_moe import LLaDA2MoeModel  # noqa: E402
from llada_scale.model.moe import Experts  # noqa: E402
from llada_scale.model.transformer import ModelConfig, Transformer  # noqa: E402


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


def test_llada2_flops_count_active_parameters():
    """The speed rows' FLOP counter for the LLaDA2-mini slice (real widths, built on the meta device) counts,
    per token, the weight matrices found by walking the model: all but the input embedding, the routed experts
    scaled by top-k / experts; the head apart. (The config's count leaves out the norm weights, elementwise:
    10,752 of 403M here.) A dense model: every parameter but the embedding."""
    cfg = l2.mini_slice(dry=False)
    with torch.device("meta"):
        model = LLaDA2MoeModel(cfg, init_weights=False)
    routed = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    walked = (sum(p.numel() for p in model.parameters() if p.dim() >= 2) - model.model.embed_tokens.weight.numel()
              - routed + routed * cfg.num_experts_per_tok // cfg.num_experts)
    flops = rows.flop_counter(model, cfg)
    assert flops.body_params + flops.head_params == walked
    assert flops.head_params == cfg.vocab_size * cfg.hidden_size and walked < model.num_params() / 3
    dense_cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128)
    dense = Transformer(dense_cfg)
    counter = rows.flop_counter(dense, dense_cfg)
    assert counter.body_params + counter.head_params == dense.num_params() - dense.model.embed_tokens.weight.numel()


def test_llada2_checks_fail_on_a_broken_grouped_gemm(monkeypatch):
    """Both LLaDA2 checks pass (CPU twin of the grouped path, bf16) and fail when torch._grouped_mm multiplies
    each group by another expert's weights (the bf16 model takes the grouped path, its float32 reference the
    per-expert loop)."""
    cpu = torch.device("cpu")
    assert l2.grouped_row(cpu, dry=True)["ok"] and l2.bf16_row(cpu, dry=True)["ok"]
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: real(a, b.flip(0), offs=offs))
    broken = l2.grouped_row(cpu, dry=True)
    assert not broken["ok"] and broken["max_rel_diff"] > 50 * l2.GROUPED_TOL
    assert not l2.bf16_row(cpu, dry=True)["ok"]
