"""Inference never builds a FlexAttention BlockMask (issue 21, finding 10: the block NELBO and the uncached block
sampler call the mask with a new shape every time, which recompiles flex until dynamo's limit and then runs eager
flex over the materialised [B, H, 2L, 2L] scores), and a generator on the wrong device is a one-line error
(finding 11)."""

import pytest
import torch

from llada_scale.model import block_attention as ba
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.sampling.block import generate_blocks
from llada_scale.sampling.common import check_generator
from llada_scale.sampling.likelihood import log_likelihood

MASK = 63


@pytest.fixture
def flex_model(monkeypatch):
    """A model whose config asks for flex (as ``auto`` resolves on CUDA); building a BlockMask fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("inference built a FlexAttention BlockMask")

    monkeypatch.setattr(ba, "flex_block_mask", refuse)
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, causal=False, mask_token_id=MASK,
                                   attention_backend="flex")).eval()


def test_uncached_block_sampler_uses_dense_mask(flex_model):
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate_blocks(flex_model, prompt, gen_length=8, block_length=4, steps_per_block=2, mask_token_id=MASK,
                          use_cache=False)
    cached = generate_blocks(flex_model, prompt, gen_length=8, block_length=4, steps_per_block=2, mask_token_id=MASK)
    assert torch.equal(out, cached)  # the KV-cached sampler is exact (tests/sampling/test_block_sampling.py)


def test_block_nelbo_uses_dense_mask(flex_model):
    ll = log_likelihood(flex_model, [1, 2, 3], [4, 5], causal=False, mask_token_id=MASK, mc_samples=2,
                        block_length=2, generator=torch.Generator().manual_seed(0))
    assert ll < 0


def test_generator_on_another_device_is_a_clear_error():
    check_generator(torch.Generator(), "cpu")
    check_generator(None, "cuda")
    with pytest.raises(ValueError, match="generator is on cpu but the model is on cuda"):
        check_generator(torch.Generator(), torch.device("cuda", 0))
    with pytest.raises(ValueError, match="torch.Generator\\(device=...\\)"):
        check_generator([torch.Generator(), torch.Generator()], "cuda")
