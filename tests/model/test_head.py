"""The memory-lean loss: chunked linear + cross-entropy, and the Transformer's ``labels`` path, against the plain
full-logits computation (values and gradients, float32). The two paths sum in different orders (per chunk vs
whole), so they agree to float32 rounding relative to each tensor's scale (``assert_close_to_scale``), not
bit for bit: e.g. the tied embedding's gradient, a sum over tokens of entries ~5, differs by ~1e-6 on some CPUs."""

import pytest
import torch
import torch.nn.functional as F

from llada_scale.model.head import linear_cross_entropy
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.testing import assert_close_to_scale


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_linear_cross_entropy_equals_plain(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.rand(37, generator=g)  # a non-uniform upstream gradient (per-token loss weights)
    ce = linear_cross_entropy(h, w, y, chunk)
    (ce * up).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w), y, reduction="none")
    (ref * up).sum().backward()
    assert ce.dtype == torch.float32 and ce.shape == (37,)
    assert_close_to_scale(ce, ref)
    assert_close_to_scale(grads[0], h.grad)
    assert_close_to_scale(grads[1], w.grad)


def test_no_labelled_position_gives_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long)).sum().backward()
    assert w.grad is not None and not w.grad.any()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_transformer_labels_equal_full_logits(tie, causal):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, causal=causal, tie_embeddings=tie, attention_backend="sdpa")
    model = Transformer(cfg)
    ids = torch.randint(0, 100, (2, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    labels = torch.where(torch.rand(2, 24) < 0.4, torch.randint(0, 100, (2, 24)), -100)
    ce = model(ids, document_ids=doc, labels=labels)
    (ce * torch.linspace(0.5, 2, 24)).sum().backward()
    lean = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(ids, document_ids=doc).transpose(1, 2).float(), labels, reduction="none")
    (ref * torch.linspace(0.5, 2, 24)).sum().backward()
    assert ce.shape == (2, 24) and ce.dtype == torch.float32 and not ce[labels == -100].any()
    assert_close_to_scale(ce, ref)
    for n, p in model.named_parameters():
        assert_close_to_scale(lean[n], p.grad, msg=n)
