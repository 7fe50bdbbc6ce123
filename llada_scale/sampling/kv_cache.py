"""Per-layer key/value caches and the one cached forward shared by every fast sampler: the exact cache of
finished blocks (block diffusion, :mod:`~llada_scale.sampling.block`), Fast-dLLM's prefix and dual caches
(LLaDA sampling, :mod:`~llada_scale.sampling.diffusion`) and AR decoding (:mod:`~llada_scale.sampling.ar`).

The model module has no cache API (it knows nothing of sampling). :func:`cached_hidden` walks a
:class:`~llada_scale.model.transformer.Transformer`'s submodules (HF Llama names) in the order of its forward,
projects through ``Attention.qkv`` (the code path of ``Attention.forward``, so q/k/v biases, QK-norm, GQA and
any head_dim come for free), and lets the caller choose which positions are recomputed and which cached keys
and values they attend to. Every submodule is called as a module (so DeepSpeed ZeRO-3 hooks gather its
weights); :func:`lm_head` applies the final norm and the output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_scale.model import attention
from llada_scale.model.rope import rotary_cos_sin

__all__ = ["KVCache", "core_of", "cached_hidden", "lm_head", "key_mask", "rope_tables"]


def core_of(model):
    """The :class:`llada_scale.model.transformer.Transformer` inside ``model`` (itself, or a wrapper's ``.module``).

    Raises:
        TypeError: ``model`` is neither (a hand-made test model, an HF model...).
    """
    if hasattr(model, "model") and hasattr(model, "output_weight"):
        return model
    inner = getattr(model, "module", None)
    if inner is not None and hasattr(inner, "output_weight"):
        return inner
    raise TypeError(f"{type(model).__name__} is not a llada_scale Transformer (needs .model and .output_weight())")


class KVCache:
    """Keys and values of every layer for ``max_len`` positions, preallocated.

    ``k[i]``, ``v[i]``: [batch, num_kv_heads, max_len, head_dim] (RoPE already applied to keys), in the
    model's dtype; ``length``: the number of filled leading positions, for callers that fill left to right
    (block diffusion, AR). The prefix / dual caches fill all positions at once and ignore ``length``.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """An empty cache shaped for ``model`` (our Transformer or a wrapper of one), on its device and dtype."""
        core = core_of(model)
        cfg = core.config
        w = core.model.embed_tokens.weight
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, w.dtype, w.device)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def key_mask(document_ids: torch.Tensor, kv_len: int | None = None) -> torch.Tensor | None:
    """bool [B, 1, 1, kv_len]: True at the keys a generated (document id 1) position may attend to, i.e. every
    non-padding position of a left-padded batch (:func:`llada_scale.sampling.common.left_pad`); None (attend to
    everything, the cheaper attention call) when there is no padding."""
    doc = document_ids if kv_len is None else document_ids[:, :kv_len]
    ok = doc == 1
    return None if bool(ok.all()) else ok[:, None, None, :]


def rope_tables(model, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)`` [B, 1, L, rotary dims] float32 of ``position_ids`` for ``model`` (the model's own
    ``rope()`` tables when it has one, e.g. LLaDA2's partial rotary; rotation runs in float32 whatever the model's
    dtype, as in training), to compute once per generation and pass (sliced along dim 2) to :func:`cached_hidden`
    instead of recomputing them every forward."""
    core = core_of(model)
    cfg = core.config
    if hasattr(core, "rope"):  # a backbone with its own tables (LLaDA2: partial rotary)
        return core.rope(position_ids, torch.float32)
    return rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, torch.float32, cfg.rope_scaling)


def cached_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, start: int, *,
                  mask=None, store: bool = False, kv_len: int | None = None, rope=None) -> torch.Tensor:
    """Hidden states (before the final norm) of positions ``start .. start + n - 1`` attending to the cache.

    The new positions' keys and values replace cache positions ``start .. start + n - 1`` in the key set; the
    other key positions ``0 .. kv_len - 1`` come from the cache as they are (stale where their tokens changed
    since they were stored: that is the approximation of the prefix/dual caches, none for finished blocks or
    AR). With ``store`` the new keys/values are also written into the cache.

    Args:
        model: our Transformer (or a wrapper with ``.module``).
        input_ids, position_ids: int64 [B, n] tokens and RoPE positions of the recomputed positions.
        cache: per-layer keys/values (batch B).
        start: cache index of the first recomputed position.
        mask: None (attend to every key) or bool broadcastable to [B, 1, n, kv_len], True = may attend.
        store: write the new keys/values into ``cache[start:start + n]``.
        kv_len: number of key positions (default ``cache.max_len``); must be >= ``start + n``.
        rope: precomputed ``(cos, sin)`` of ``position_ids`` (:func:`rope_tables`), else computed here.
    Returns:
        [B, n, hidden_size] in the model's dtype.
    Raises:
        TypeError: ``model`` is not our Transformer; ValueError: positions outside the cache.
    """
    core = core_of(model)
    b, n = input_ids.shape
    end = start + n
    kv_len = cache.max_len if kv_len is None else kv_len
    if start < 0 or end > kv_len or kv_len > cache.max_len:
        raise ValueError(f"positions {start}..{end - 1} / kv_len {kv_len} outside the cache ({cache.max_len})")
    x = core.model.embed_tokens(input_ids)
    cos, sin = rope if rope is not None else rope_tables(core, position_ids)
    for i, layer in enumerate(core.model.layers):
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
        if store:
            cache.k[i][:, :, start:end] = k
            cache.v[i][:, :, start:end] = v
            keys, values = cache.k[i][:, :, :kv_len], cache.v[i][:, :, :kv_len]
        else:
            keys = torch.cat([cache.k[i][:, :, :start], k, cache.k[i][:, :, end:kv_len]], 2)
            values = torch.cat([cache.v[i][:, :, :start], v, cache.v[i][:, :, end:kv_len]], 2)
        out = attention.attend(q, keys, values, mask)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [..., vocab_size] of hidden states from :func:`cached_hidden` (final norm + head; the head
    is called as a module when it is one, so ZeRO-3 gathers it; a tied head, the embedding's weight, is gathered
    explicitly when ZeRO-3 partitions it: ``GatheredParameters``, a collective, every rank decodes in lockstep)."""
    core = core_of(model)
    h = core.model.norm(hidden)
    if core.lm_head is not None:
        return core.lm_head(h).float()
    w = core.output_weight()
    if not hasattr(w, "ds_id"):
        return F.linear(h, w).float()
    import deepspeed

    with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
        return F.linear(h, w).float()
