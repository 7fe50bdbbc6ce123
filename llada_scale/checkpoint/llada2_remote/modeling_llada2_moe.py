"""LLaDA2 mixture-of-experts mask predictor for ``transformers`` (``trust_remote_code``), written by llada_scale's
export-llada2.

Module tree and parameter names are those of inclusionAI's LLaDA2.0/2.1 checkpoints::

    model.word_embeddings                                   token embedding [vocab, hidden]
    model.layers.N.input_layernorm / post_attention_layernorm     RMSNorm weights [hidden]
    model.layers.N.attention.query_key_value                fused projection [(H + 2 Hkv) head_dim, hidden]
    model.layers.N.attention.query_layernorm / key_layernorm      per-head RMSNorm [head_dim]
    model.layers.N.attention.dense                          output projection
    model.layers.N.mlp.{gate,up,down}_proj                  dense SwiGLU (N < first_k_dense_replace)
    model.layers.N.mlp.gate.weight / gate.expert_bias       router [E, hidden] and its selection bias [E]
    model.layers.N.mlp.experts.E.{gate,up,down}_proj        routed SwiGLU experts
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj   shared SwiGLU expert(s)
    model.norm, lm_head

Forward: pre-norm layers; q/k RMSNorm per head, rotary embeddings (rotate-half, base ``rope_theta``, float32
tables) on the first int(head_dim * partial_rotary_factor) dims of each head; bidirectional attention (a [B, L]
``attention_mask`` hides padded keys; a 4-D bool or additive mask is used as given); router scores
sigmoid(x W^T) in float32, expert choice by group-limited top-k on scores + expert_bias, weights the chosen
unbiased scores normalised to sum 1 (top-k > 1) times ``routed_scaling_factor``; written plainly, one expert at a
time. Only torch and transformers are imported.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada2_moe import LLaDA2MoeConfig


def _check(config):
    for key, want in (("hidden_act", "silu"), ("score_function", "sigmoid"), ("use_qk_norm", True),
                      ("tie_word_embeddings", False)):
        if getattr(config, key, want) != want:
            raise ValueError(f"this modeling_llada2_moe.py implements {key}={want!r}, not {getattr(config, key)!r}")
    rs = getattr(config, "rope_scaling", None)  # transformers 5 fills {"rope_type": "default", ...} itself
    if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"this modeling_llada2_moe.py implements plain RoPE, not rope_scaling={rs!r}")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in float32, cast back, times the weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate(x, cos, sin):
    r = cos.shape[-1]
    x1, x2 = x[..., :r // 2], x[..., r // 2:r]
    return torch.cat([x[..., :r] * cos + torch.cat([-x2, x1], -1) * sin, x[..., r:]], -1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.query_key_value = nn.Linear(c.hidden_size, (self.h + 2 * self.kv) * self.hd, bias=c.use_qkv_bias)
        self.query_layernorm = RMSNorm(self.hd, c.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.hd, c.rms_norm_eps)
        self.dense = nn.Linear(self.h * self.hd, c.hidden_size, bias=c.use_bias)

    def forward(self, x, cos, sin, mask):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.h + 2 * self.kv, self.hd).transpose(1, 2)
        q, k, v = qkv.split([self.h, self.kv, self.kv], dim=1)
        q = _rotate(self.query_layernorm(q), cos, sin)
        k = _rotate(self.key_layernorm(k), cos, sin)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, x):
        c, n = self.c, x.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores + self.expert_bias.float()
        per = c.num_experts // c.n_group
        group_score = biased.view(n, c.n_group, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(c.topk_group, dim=-1, sorted=False).indices, True)
        keep = keep[:, :, None].expand(n, c.n_group, per).reshape(n, -1)
        idx = biased.masked_fill(~keep, float("-inf")).topk(c.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        if c.num_experts_per_tok > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate = Gate(c)
        self.experts = nn.ModuleList(SwiGLU(c.hidden_size, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.shared_experts = SwiGLU(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        idx, w = self.gate(flat)
        y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                y.index_add_(0, rows, expert(flat[rows]).float() * w[rows, slot, None])
        return y.to(x.dtype).view(x.shape) + self.shared_experts(x)


class Layer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size) if i < c.first_k_dense_replace else MoE(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Gate):
            nn.init.normal_(module.weight, std=std)
            module.expert_bias.zero_()
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """Embedding, layers and final norm; ``forward(input_ids, attention_mask=None, position_ids=None)`` ->
    final hidden states [B, L, hidden]."""

    def __init__(self, config):
        super().__init__(config)
        _check(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        c = self.config
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(n, device=x.device)[None].expand(b, n)
        rot = int(c.head_dim * c.partial_rotary_factor)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, rot, 2, device=x.device, dtype=torch.float32) / rot))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], -1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:
            mask = None if bool(mask.bool().all()) else mask.bool()[:, None, None, :]
        elif mask is not None and mask.dtype != torch.bool:
            mask = mask.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """LLaDA2 mask predictor: ``forward(input_ids, attention_mask=None, position_ids=None).logits`` -> float32
    [B, L, vocab]. No KV cache and no loss (a masked-diffusion loss needs the noise level)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                return_dict=None, **kwargs):
        if labels is not None:
            raise ValueError("LLaDA2MoeModelLM here computes no loss: a masked-diffusion loss needs the noise level")
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids, inputs_embeds)).float()
        if return_dict is False:
            return (logits,)
        return CausalLMOutputWithPast(logits=logits)


__all__ = ["LLaDA2MoeConfig", "LLaDA2MoeModel", "LLaDA2MoeModelLM"]
