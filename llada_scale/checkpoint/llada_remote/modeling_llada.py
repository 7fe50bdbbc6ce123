"""LLaDA mask predictor for ``transformers`` (``trust_remote_code``), written by llada_scale's export-llada.

The module tree and parameter names are those of GSAI-ML/LLaDA-8B's checkpoints::

    model.transformer.wte                                   token embedding [embedding_size, d_model]
    model.transformer.blocks.N.attn_norm / ff_norm          RMSNorm weights [d_model]
    model.transformer.blocks.N.{q,k,v}_proj                 attention projections (biases if include_qkv_bias)
    model.transformer.blocks.N.attn_out                     attention output projection
    model.transformer.blocks.N.ff_proj / up_proj / ff_out   MLP: ff_out(silu(ff_proj(x)) * up_proj(x))
    model.transformer.ln_f                                  final RMSNorm
    model.transformer.ff_out                                output head (absent with weight_tying)

Forward (LLaDA, Nie et al. 2025, "Large Language Diffusion Models", Sec. 2: a Transformer mask predictor
without the causal mask): pre-norm blocks x + attn(norm(x)), x + mlp(norm(x)), RoPE on q and k (rotate-half,
base ``rope_theta``, computed in float32), bidirectional attention. ``attention_mask`` ([B, L], 1 = token,
0 = padding) hides padded keys. Only torch and transformers are imported, so the exported directory loads with
``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` offline.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig

_SUPPORTED = {"block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",), "rope": (True,),
              "alibi": (False,), "attention_layer_norm": (False,), "include_bias": (False,),
              "scale_logits": (False,), "input_emb_norm": (False,), "block_group_size": (1,)}


def _check(config):
    for key, allowed in _SUPPORTED.items():
        if getattr(config, key, allowed[0]) not in allowed:
            raise ValueError(f"this modeling_llada.py implements {key} in {allowed}, not {getattr(config, key)!r}")
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model {config.d_model} is not divisible by n_heads {config.n_heads}")


def _kv_heads(config):
    if config.n_kv_heads is not None:
        return config.n_kv_heads
    return 1 if config.multi_query_attention else config.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in float32, cast back, times the weight (LLaDA's order of operations)."""

    def __init__(self, dim, eps, affine):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LLaDABlock(nn.Module):
    """One pre-norm transformer block of the llama block type."""

    def __init__(self, config):
        super().__init__()
        d, hd, kv = config.d_model, config.d_model // config.n_heads, _kv_heads(config)
        ff = config.mlp_hidden_size or config.mlp_ratio * d
        bias = bool(config.include_qkv_bias)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, kv, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, config.layer_norm_with_affine)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, config.layer_norm_with_affine)
        self.ff_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.ff_out = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = _rotate(q.float(), cos, sin).to(v.dtype)
        k = _rotate(k.float(), cos, sin).to(v.dtype)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """Embedding, blocks, final norm and head under ``transformer`` (LLaDA's names)."""

    def __init__(self, config):
        super().__init__()
        _check(config)
        self.config = config
        rows = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps, config.layer_norm_with_affine)))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, rows, bias=False)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=False):
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        hd = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=x.device,
                                                                  dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(n, device=x.device, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask.bool().view(b, 1, 1, n)
        hidden = []
        for block in self.transformer.blocks:
            hidden.append(x)
            x = block(x, cos, sin, mask)
        x = self.transformer.ln_f(x)
        hidden.append(x)
        head = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(x, head), tuple(hidden) if output_hidden_states else None


class LLaDAModelLM(PreTrainedModel):
    """LLaDA mask predictor: ``forward(input_ids, attention_mask=None).logits`` -> [B, L, embedding_size].

    No KV cache and no loss (a masked-diffusion loss needs the noise level; see LLaDA's GUIDELINES.md).
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config, "init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if labels is not None:
            raise ValueError("LLaDAModelLM computes no loss: a masked-diffusion loss needs the noise level t")
        logits, hidden = self.model(input_ids, inputs_embeds, attention_mask, bool(output_hidden_states))
        if return_dict is False:
            return (logits,) if hidden is None else (logits, hidden)
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden)


__all__ = ["LLaDAConfig", "LLaDAModelLM", "LLaDAModel", "LLaDABlock", "RMSNorm"]
