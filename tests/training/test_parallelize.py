"""Activation checkpointing and torch.compile applied from outside the model (training/parallelize.py):
checkpointed gradients equal plain ones, and a compiled model trains like the eager one without recompiling,
cut (random-length) batches and validation included (static shapes)."""

import copy

import pytest
import torch

from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss
from llada_scale.training import parallelize as par
from llada_scale.training.config import ConfigError
from llada_scale.testing import assert_close_to_scale

MASK = 63


def tiny(layers=3):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, causal=False, mask_token_id=MASK, attention_backend="sdpa"))


def batch(seed, b=2, length=32):
    g = torch.Generator().manual_seed(seed)
    doc = (torch.arange(length) >= length // 3).int().expand(b, length).clone()  # two documents per row
    pos = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)]).expand(b, length).clone()
    return {"input_ids": torch.randint(0, MASK, (b, length), generator=g), "position_ids": pos, "document_ids": doc,
            "prompt_mask": torch.zeros(b, length, dtype=torch.bool),
            "padding_mask": torch.zeros(b, length, dtype=torch.bool)}


def test_checkpointed_layers():
    assert par.checkpointed_layers(5, "none") == []
    assert par.checkpointed_layers(5, "full") == [0, 1, 2, 3, 4]
    assert par.checkpointed_layers(5, "selective", 2) == [0, 2, 4]
    with pytest.raises(ConfigError, match="activation_checkpointing must be"):
        par.checkpointed_layers(5, "some")
    with pytest.raises(ConfigError, match="compile must be"):
        par.resolve_compile("maybe", torch.device("cpu"))
    assert par.resolve_compile("auto", torch.device("cpu")) is False
    assert par.resolve_compile("auto", torch.device("cuda"), zero_stage=2) is True
    assert par.resolve_compile("auto", torch.device("cuda"), zero_stage=3) is False  # DeepSpeed hooks in every layer
    assert par.resolve_compile(False, torch.device("cuda")) is False and par.resolve_compile("true", "cpu") is True


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("block_length", [0, 8])
def test_activation_checkpointing_gradients_equal_plain(mode, block_length):
    plain = tiny()
    ckpt = copy.deepcopy(plain)
    assert par.apply_activation_checkpointing(ckpt, mode, every=2) == ([0, 1, 2] if mode == "full" else [0, 2])
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]  # names unchanged
    cfg = ObjectiveConfig(random_length_prob=0.0, block_length=block_length)
    for model in (plain, ckpt):
        loss, _ = compute_loss(model, batch(1), cfg, causal=False, mask_token_id=MASK,
                               generator=torch.Generator().manual_seed(2))
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close_to_scale(q.grad, p.grad, msg=name)


def _train(model, steps=20, val_every=5):
    """``steps`` AdamW steps of LLaDA diffusion with half the batches cut to a random length, and a validation
    loss (eval mode, no grad, fixed noise) every ``val_every`` steps. Returns (losses, val losses, frames compiled
    after the first step and first validation)."""
    from torch._dynamo.utils import counters

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = ObjectiveConfig(random_length_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    losses, val, frames_after_first = [], [], None
    for step in range(steps):
        model.train()
        loss, _ = compute_loss(model, batch(step), cfg, causal=False, mask_token_id=MASK, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step % val_every == 0:
            model.eval()
            with torch.no_grad():
                v, _ = compute_loss(model, batch(999), cfg, causal=False, mask_token_id=MASK,
                                    generator=torch.Generator().manual_seed(5))
            val.append(float(v))
        if step == 0:
            frames_after_first = (counters["frames"]["total"], counters["stats"]["unique_graphs"])
    frames = (counters["frames"]["total"], counters["stats"]["unique_graphs"])
    return losses, val, frames_after_first, frames


@pytest.mark.parametrize("backend,ac", [("inductor", "none"), ("aot_eager", "full")])
def test_compiled_equals_eager_without_recompiling(backend, ac):
    """20 steps incl. cut batches and validation: compiled losses == eager to 1e-5, and dynamo compiles
    nothing after the first training step and the first validation. inductor is the backend the trainer uses
    (slow to compile on CPU, so the checkpointed variant runs on aot_eager: same graphs, no code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps them: an earlier compile in this process would satisfy the check below
    eager = tiny(layers=2)
    par.apply_activation_checkpointing(eager, ac)
    compiled = copy.deepcopy(eager)
    par.apply_compile(compiled, backend=backend)
    ref_losses, ref_val, _, _ = _train(eager)
    losses, val, first, last = _train(compiled)
    assert sum(1 for x in ref_losses if x) == 20
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    assert val == pytest.approx(ref_val, rel=1e-5, abs=1e-5) and len(val) == 4
    assert first[0] > 0, "nothing was compiled"
    assert last == first, f"recompiled after the first step: frames/graphs {first} -> {last}"
