"""MFU accounting (issue 9, defect 4): FLOPs come from the positions each micro batch processed, peaks from the
datasheets of known GPUs, and no MFU without a known peak (CPU, unknown GPUs)."""

import pytest
import torch

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss, model_input_length
from llada_scale.training.metrics import (FlopCounter, device_peak_flops, flops_per_token, peak_flops_for,
                                          t_bucket_metrics, throughput)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H800", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA L40S", 362e12), ("Tesla T4", None)])
def test_datasheet_peaks(name, peak):
    assert peak_flops_for(name) == peak


def test_cpu_has_no_mfu_unless_told():
    peak, why = device_peak_flops(0.0, "cpu")
    assert peak is None and "train.peak_flops" in why
    assert device_peak_flops(1e12, "cpu")[0] == 1e12
    assert throughput(1000, 5e12, 2.0, 2, None)["mfu"] is None
    assert throughput(1000, 4e12, 2.0, 2, 1e12)["mfu"] == pytest.approx(1.0)


def test_flop_counter_matches_palm_formula():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64))
    emb, head = model.model.embed_tokens.weight.numel(), model.lm_head.weight.numel()
    fc = FlopCounter(model.num_params(), emb, head, 2, 32)
    # head on every position: the PaLM 6N + 12 n d L per token, with N without the input embedding
    assert fc(10, 16, 10) == pytest.approx(10 * flops_per_token(model.num_params() - emb, 2, 32, 16))
    assert fc(10, 16, 4) < fc(10, 16, 10)  # the head counted only where it ran


@pytest.mark.parametrize("phase_step,model_len", [(0, 64), (1, 32)])
def test_block_diffusion_counts_the_positions_it_ran(phase_step, model_len):
    """WSD schedule [[8, 1], [full, 1]]: the 8-block phase runs [x_t ; x_0] (2L positions), the full phase L
    positions -- also for a batch cut to a random length (the cut once reported block_length < seq_len and
    doubled the MFU although no 2L pass ran)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64, causal=False, mask_token_id=63))
    cfg = ObjectiveConfig(random_length_prob=1.0, block_schedule=[[8, 1], ["full", 1]])
    seen = []
    record = lambda *a, **k: (seen.append(a[0].shape[1]), model(*a, **k))[1]  # noqa: E731
    b = 2
    batch = {"input_ids": torch.randint(0, 63, (b, 32)), "position_ids": torch.arange(32).expand(b, 32),
             "document_ids": torch.zeros(b, 32, dtype=torch.int32),
             "prompt_mask": torch.zeros(b, 32, dtype=torch.bool), "padding_mask": torch.zeros(b, 32, dtype=torch.bool)}
    _, stats = compute_loss(record, batch, cfg, causal=False, mask_token_id=63,
                            generator=torch.Generator().manual_seed(3), step=phase_step)
    assert seen == [model_len] == [model_input_length(cfg, False, 32, phase_step)]
    assert float(stats["model_tokens"]) == b * model_len
    assert float(stats["block_length"]) == (8 if phase_step == 0 else 32)  # the full row, cut or not


def test_empty_t_buckets_are_missing_not_zero():
    metrics, line = t_bucket_metrics([4.0, 0.0, 3.0, 0.0, 1.0], [2, 0, 3, 0, 4])
    assert metrics == {"train/ce_t0.0-0.2": 2.0, "train/ce_t0.4-0.6": 1.0, "train/ce_t0.8-1.0": 0.25}
    assert line == "2.00/-/1.00/-/0.25"


@pytest.mark.parametrize("length,block", [(32, 8), (30, 8), (64, 1), (40, 40)])
def test_block_diffusion_attention_density_counts_the_mask(length, block):
    """The executed-FLOP share of block diffusion (issue 21 finding 14) equals the kept share of the dense
    [x_t ; x_0] mask built by the model's own mask_mod (one document; a shorter last block included)."""
    from llada_scale.model import block_attention as ba
    from llada_scale.training.metrics import FlopCounter, block_diffusion_attention_density

    pos, doc = torch.arange(length)[None], torch.zeros(1, length, dtype=torch.int32)
    mask = ba.block_diffusion_mask(ba.block_ids(pos, doc, block), doc, backend="sdpa")
    density = block_diffusion_attention_density(length, block)
    assert density == pytest.approx(int(mask.sum()) / mask.numel(), rel=1e-12)  # exact integer count
    n = -(-length // block)
    if length % block == 0:
        assert density == pytest.approx((n + 1) / (4 * n), rel=1e-12)
    fc = FlopCounter(1000, 100, 100, num_layers=2, hidden_size=16)
    attention = 12 * 2 * 16 * 2 * length  # per model token at input length 2L
    assert fc(10.0, 2 * length, 0.0) - fc(10.0, 2 * length, 0.0, density) == pytest.approx(
        10 * attention * (1 - density), rel=1e-12)
