"""Llama-style decoder backbone shared by AR and masked-diffusion (LLaDA) models.

RMSNorm, rotary position embeddings (:mod:`llada_scale.model.rope`), SwiGLU MLP and grouped-query attention, with module names that
follow Hugging Face ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj`` ...) so a state dict
exports to HF Llama without renaming. The only difference between an AR model and a LLaDA mask
predictor is ``ModelConfig.causal`` (LLaDA GUIDELINES.md, "Model Architecture": remove the causal mask).

This module knows nothing about distribution, objectives or data; attention masks come from
:mod:`llada_scale.model.attention`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llada_scale.model import attention
from llada_scale.model.head import head_forward
from llada_scale.model.rope import apply_rotary, normalize_rope_scaling, rotary_cos_sin


@dataclass
class ModelConfig:
    """Shape and switches of the backbone.

    vocab_size is the embedding/head row count (the tokenizer's vocabulary plus the mask token, padded to
    a multiple of 64, or an imported model's own row count). ``num_kv_heads < num_heads`` gives grouped-query
    attention. ``head_dim`` (None = hidden_size // num_heads) may differ from hidden_size / num_heads (Qwen3:
    hidden 1024, 16 heads, head_dim 128); q/o project between hidden_size and num_heads x head_dim.
    ``qk_norm`` (per-head RMSNorm of q and k before RoPE: Qwen3, minimind) and ``norm_weight=False`` exist to
    import Qwen3 / Nano-LLaDA / minimind variants; ``attention_bias`` adds biases to q, k and v (not o; Qwen2 /
    Qwen2.5, LLaDA's ``include_qkv_bias``).

    ``rope_scaling``: None = plain RoPE with base ``rope_theta``. ``{"type": "yarn", "factor": s,
    "original_max_position_embeddings": L, "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}``
    (HF Llama key names; ``rope_type`` is accepted for ``type``) = YaRN frequency interpolation as computed by
    minimind / Nano-LLaDA (see :func:`llada_scale.model.rope.rope_inv_freq`). ``type``, ``factor`` (>= 1) and
    ``original_max_position_embeddings`` are required; the others default to minimind's values (note: HF's
    default ``attention_factor`` is 0.1 ln(s) + 1, minimind's is 1.0). The dict is normalised to all six keys.
    ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``
    = Llama 3.1's frequency scaling (all four keys required).
    """

    vocab_size: int = 6464
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    causal: bool = True
    qk_norm: bool = False
    norm_weight: bool = True
    mask_token_id: int | None = None
    init_std: float = 0.02
    attention_backend: str = "auto"  # auto | sdpa | flex
    attention_bias: bool = False
    head_dim: int | None = None  # None: hidden_size // num_heads (resolved in __post_init__)

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                                 "set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim < 2:
            raise ValueError(f"head_dim must be >= 2, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        return asdict(self)


# Named shapes. FFN sizes follow Llama's round(8/3 * hidden) to a multiple of 64 except where a
# reference fixes them (LLaDA-8B: 12288).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, max_seq_len=256),
    "small": dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=704, max_seq_len=512),
    # Nano-LLaDA size (~30M with vocab 6464).
    "30m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408, max_seq_len=512),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=5632, max_seq_len=2048),
    # GSAI-ML/LLaDA-8B-Base / -Instruct config.json, exactly what import-llada reads from it: 32 layers,
    # d_model 4096, 32 heads (no GQA), mlp_hidden_size 12288, embedding_size 126464, rope_theta 5e5,
    # rms_norm_eps 1e-5, no weight tying, bidirectional, mask_token_id 126336.
    "llada-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=12288,
                     vocab_size=126464, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
                     causal=False, mask_token_id=126336),
    # Qwen/Qwen2.5-0.5B config.json as import-hf reads it (AR; ar-to-diffusion keeps the shape).
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                         vocab_size=151936, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True, attention_bias=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Return the :class:`ModelConfig` for a named preset with ``overrides`` applied.

    Raises:
        ValueError: unknown preset name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight.

    Computed in float32 and cast back. ``elementwise_affine=False`` gives the weightless variant.
    Input/output: [..., dim], any float dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, RoPE, optional q/k/v biases and optional QK-norm
    (per-head RMSNorm before RoPE, as Qwen3 and minimind)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_weight)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_weight)

    def qkv(self, x, cos, sin):
        """Queries [B, num_heads, L, head_dim] and keys, values [B, num_kv_heads, L, head_dim] of ``x``
        [B, L, hidden_size], RoPE applied to q and k (the one code path of :meth:`forward` and of KV caches)."""
        b, l, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, l, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, mask):
        q, k, v = self.qkv(x, cos, sin)
        out = attention.attend(q, k, v, mask)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, eq. 6): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PreNormLayer(nn.Module):
    """Pre-norm decoder layer of both model families: x + self_attn(input_layernorm(x), cos, sin, mask), then
    x + mlp(post_attention_layernorm(x)); x [B, L, hidden_size] in and out, in the weights' dtype.

    The four modules are registered in that order (parameter order: state-dict order and the init RNG order).
    ``self_attn`` has ``qkv(x, cos, sin)`` and ``o_proj`` (the KV-cache walk and the sequence-parallel rebinding
    use them); activation checkpointing and compile wrap this class's ``forward`` per layer instance.
    """

    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module, post_attention_layernorm: nn.Module,
                 mlp: nn.Module):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLayer(PreNormLayer):
    """Llama layer: RMSNorm, grouped-query :class:`Attention`, RMSNorm, SwiGLU :class:`MLP`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weight), Attention(cfg),
                         RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weight), MLP(cfg))


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm (HF name: ``model``), given as modules (both model families)."""

    def __init__(self, embed_tokens: nn.Embedding, layers, norm: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def decode(self, x, cos, sin, mask):
        """Final-norm hidden states [B, L, hidden_size] of embeddings ``x`` [B, L, hidden_size]: every layer in
        order, then ``norm``. A plain method, not a module call: no hooks of its own."""
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class Transformer(nn.Module):
    """Llama-style language model; ``cfg.causal`` picks AR (True) or LLaDA mask predictor (False).

    ``forward(input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None)``

    Args:
        input_ids: int64 [B, L].
        position_ids: int64 [B, L]; default ``arange(L)`` for every row.
        document_ids: int [B, L] segment ids of packed documents; tokens attend only within their
            document (and causally when ``cfg.causal``). Ignored when ``attention_mask`` is given.
        attention_mask: a prebuilt mask from :mod:`llada_scale.model.attention` (dense bool [B, 1, Lq, Lk],
            True = attend, or a FlexAttention ``BlockMask``) for custom patterns such as block diffusion.
        labels: optional int64 [B, L] target of every position, ``IGNORE_INDEX`` (-100) where there is no loss.
    Returns:
        without ``labels``: logits [B, L, vocab_size] in the dtype of the weights. With ``labels``: float32
        [B, L] per-position cross-entropy, 0 where the label is ``IGNORE_INDEX`` (what
        ``F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")`` returns), computed by
        running the head only on the labelled positions, in chunks (:func:`llada_scale.model.head.linear_cross_entropy`):
        the [B, L, vocab_size] logits never exist. The head weight is read only inside this forward, which
        is where DeepSpeed ZeRO-3 gathers it.
    """

    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                              [DecoderLayer(cfg) for _ in range(cfg.num_layers)],
                              RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weight))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if init_weights:  # False: the caller runs init_weights() itself (partitioned parameters) or loads weights
            self.init_weights()

    def init_weights(self, materialize: Callable[[list], ContextManager] | None = None) -> None:
        """Random initialisation: N(0, init_std^2) for every Linear/Embedding weight, zero biases, and the
        residual output projections (``o_proj``, ``down_proj``) N(0, (init_std / sqrt(2 * num_layers))^2)
        (GPT-2 / OLMo). Draws from torch's global RNG in module order, so the same seed gives the same weights.

        ``materialize(params)``: a context manager inside which ``params`` hold their full tensors and whose
        changes persist (for partitioned parameters, e.g. DeepSpeed ZeRO-3's ``GatheredParameters(params,
        modifier_rank=0)``); default: none needed.
        """
        ctx = materialize or (lambda params: contextlib.nullcontext())
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with ctx(list(module.parameters(recurse=False))):
                    self._init_weights(module)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                with ctx([p]):
                    nn.init.normal_(p, std=self.config.init_std / math.sqrt(2 * self.config.num_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def output_weight(self) -> torch.Tensor:
        """The [vocab_size, hidden_size] head matrix (the input embedding when ``tie_embeddings``)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, attention_mask=None):
        """Final-norm hidden states [B, L, hidden_size]; arguments as :meth:`forward`."""
        cfg = self.config
        b, l = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        mask = attention_mask
        if mask is None:
            mask = attention.build_mask(document_ids, causal=cfg.causal, q_len=l, kv_len=l, batch_size=b,
                                        device=input_ids.device, backend=cfg.attention_backend)
        x = self.model.embed_tokens(input_ids)
        # float32 tables: apply_rotary rotates in float32 and casts back (LLaDA's modeling code does the same)
        cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, torch.float32, cfg.rope_scaling)
        return self.model.decode(x, cos, sin, mask)

    def forward(self, input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None):
        return head_forward(lambda: self.hidden_states(input_ids, position_ids, document_ids, attention_mask),
                            self.output_weight, labels)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` drops the input embedding (kept if tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.lm_head is not None:
            n -= self.model.embed_tokens.weight.numel()
        return n


def resize_vocab(state_dict: dict, new_vocab_size: int, std: float = 0.02, seed: int = 0,
                 init_rows: str = "mean") -> dict:
    """Return ``state_dict`` with embedding/head rows grown (or cut) to ``new_vocab_size``.

    New rows (e.g. the mask token added for AR -> diffusion) are initialised to the mean of the
    existing rows (``init_rows="mean"``) or N(0, std^2) (``"normal"``); existing rows are unchanged.
    Keys touched: ``model.embed_tokens.weight`` and ``lm_head.weight`` when present.
    """
    out = dict(state_dict)
    gen = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key not in out:
            continue
        w = out[key]
        old = w.shape[0]
        if old >= new_vocab_size:
            out[key] = w[:new_vocab_size].clone()
            continue
        if init_rows == "mean":
            extra = w.float().mean(0, keepdim=True).expand(new_vocab_size - old, -1).to(w.dtype)
        else:
            extra = (torch.randn(new_vocab_size - old, w.shape[1], generator=gen) * std).to(w.dtype)
        out[key] = torch.cat([w, extra], 0)
    return out


def state_dict_mismatch(expected: dict[str, tuple], state_dict: dict, source: str = "checkpoint",
                        target: str = "model") -> str | None:
    """Describe how ``state_dict`` differs from the key -> shape map ``expected``, or None when it fits.

    One line naming missing keys, unexpected keys and shape mismatches (first 4 of each), e.g.
    ``missing keys ['model.norm.weight']; model.layers.0.mlp.up_proj.weight: checkpoint [704, 256] vs model [384, 128]``.
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    bad = [f"{k}: {source} {list(state_dict[k].shape)} vs {target} {list(expected[k])}"
           for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    problems += bad[:4] + (["..."] if len(bad) > 4 else [])
    return "; ".join(problems) or None


def load_weights(model: Transformer, state_dict: dict, source: str = "checkpoint") -> None:
    """Copy ``state_dict`` into ``model`` after checking every key and shape.

    Raises:
        ValueError: one line naming missing / unexpected keys and shape mismatches, e.g.
            ``checkpoint does not fit the model: model.layers.0.mlp.up_proj.weight: checkpoint [704, 256] vs model [384, 128]``.
    """
    own = model.state_dict()
    problems = state_dict_mismatch({k: tuple(v.shape) for k, v in own.items()}, state_dict, source)
    if problems:
        raise ValueError(f"{source} does not fit the model ({problems}); check the model preset/overrides "
                         "match the checkpoint's config")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state_dict[k].to(v.dtype))
