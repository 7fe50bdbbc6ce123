"""LLaDA2.x mixture-of-experts backbone (inclusionAI LLaDA2.0/2.1-mini and -flash, ``model_type: llada2_moe``):
its configuration, read from and written to the release's ``config.json`` keys, and the model.

Architecture as released (``modeling_llada2_moe.py`` of the Hugging Face release, also in ZHZisZZ/dllm and
inclusionAI/dFactory): pre-norm decoder layers; attention with one fused QKV projection, per-head QK RMSNorm,
rotary embeddings on the first ``rotary_dim = head_dim * partial_rotary_factor`` dims of each head only,
grouped-query heads and a ``head_dim`` independent of hidden/heads; the first ``first_k_dense_replace`` layers
have a dense SwiGLU, the others the MoE feed-forward of :mod:`llada_scale.model.moe`; untied embeddings; no
causal mask (a mask predictor). RMSNorm multiplies the weight after casting back to the input dtype, as the
release does.

:class:`LLaDA2MoeModel` has the interface of :class:`llada_scale.model.transformer.Transformer` (forward with
``document_ids`` / prebuilt ``attention_mask`` / ``labels`` -> chunked lean-head loss, ``hidden_states``,
``output_weight``, the ``model.embed_tokens / model.layers[i].{input_layernorm, self_attn.qkv, self_attn.o_proj,
post_attention_layernorm, mlp} / model.norm / lm_head`` walk used by the KV caches of
:mod:`llada_scale.sampling.kv_cache`), so objectives, samplers and the trainer use it unchanged. Module names are
ours; :mod:`llada_scale.checkpoint.llada2` maps them to the release's (``word_embeddings``, ``attention.
query_key_value``, ``attention.dense``, ``query_layernorm``, ``key_layernorm``, per-expert tensors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager

import torch
from torch import nn

from llada_scale.model import attention
from llada_scale.model.head import head_forward
from llada_scale.model.moe import MoEBlock
from llada_scale.model.rope import apply_rotary, rotary_cos_sin
from llada_scale.model.transformer import MLP, Backbone, ModelConfig, PreNormLayer, RMSNorm

MODEL_TYPE = "llada2_moe"
MOE_DEFAULTS = {"bias_update_rate": 0.0, "aux_loss_coef": 0.0}


@dataclass
class LLaDA2Config(ModelConfig):
    """:class:`ModelConfig` (vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
    intermediate_size = the dense layers' FFN, norm_eps, rope_theta, max_seq_len, mask_token_id ...) plus LLaDA2's
    keys, named as in its config.json: ``partial_rotary_factor``, ``first_k_dense_replace``,
    ``moe_intermediate_size``, ``num_experts``, ``num_shared_experts``, ``num_experts_per_tok``, ``n_group``,
    ``topk_group``, ``routed_scaling_factor``; ``output_bias`` is the release's ``use_bias`` (bias of the attention
    output projection), ``attention_bias`` its ``use_qkv_bias``. ``moe``: training-time balancing,
    ``{"bias_update_rate": r, "aux_loss_coef": c}`` (0 = off; see :mod:`llada_scale.training.moe_balance`).
    ``hf_extra``: the release keys that do not change the computation (dropouts of 0, ``use_cache``, ...), kept
    to write them back on export.

    Raises:
        ValueError: a shape the release cannot have (experts not divisible into groups, fewer than 2 experts per
            group, more chosen than eligible experts, an odd rotary dimension, ...), one line naming the key.
    """

    # routing / rotary values not visible in weight shapes: train.init_from must have the same (training/engine.py)
    SAME_AS_INIT: ClassVar[tuple] = ("partial_rotary_factor", "first_k_dense_replace", "num_experts_per_tok",
                                     "n_group", "topk_group", "routed_scaling_factor", "output_bias")
    # taken from the train.init_from model when the recipe leaves them empty (written back by export-llada2)
    INHERITED_FROM_INIT: ClassVar[tuple] = ("pad_token_id", "hf_extra")

    model_type: str = MODEL_TYPE
    partial_rotary_factor: float = 0.5
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 64
    num_experts: int = 8
    num_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    output_bias: bool = False
    pad_token_id: int | None = None
    moe: dict = field(default_factory=lambda: dict(MOE_DEFAULTS))
    hf_extra: dict = field(default_factory=dict)
    causal: bool = False
    qk_norm: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"LLaDA2Config.model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        if self.causal or not self.qk_norm or not self.norm_weight or self.tie_embeddings or self.rope_scaling:
            raise ValueError("LLaDA2 is bidirectional with QK-norm, weighted norms, untied embeddings and plain RoPE; "
                             "causal/qk_norm/norm_weight/tie_embeddings/rope_scaling cannot be changed")
        rot = self.rotary_dim
        if not 0 < self.partial_rotary_factor <= 1 or rot < 2 or rot % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} x head_dim {self.head_dim} gives "
                             f"rotary_dim {rot}; it must be an even number >= 2")
        e, g, k, kg = self.num_experts, self.n_group, self.num_experts_per_tok, self.topk_group
        if g < 1 or e % g or e // g < 2:
            raise ValueError(f"num_experts {e} must split into n_group {g} groups of >= 2 experts (the group score "
                             "sums each group's two best experts)")
        if not 1 <= kg <= g or not 1 <= k <= kg * (e // g):
            raise ValueError(f"need 1 <= topk_group ({kg}) <= n_group ({g}) and 1 <= num_experts_per_tok ({k}) <= "
                             f"the experts of the eligible groups ({kg * (e // g)})")
        if self.num_shared_experts < 1 or not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise ValueError(f"num_shared_experts must be >= 1 (got {self.num_shared_experts}) and "
                             f"first_k_dense_replace in [0, num_layers] (got {self.first_k_dense_replace})")
        unknown = sorted(set(self.moe) - set(MOE_DEFAULTS))
        if unknown:
            raise ValueError(f"model.moe has unknown key(s) {unknown}; known: {sorted(MOE_DEFAULTS)}")
        self.moe = {**MOE_DEFAULTS, **self.moe}
        if self.moe["bias_update_rate"] < 0 or self.moe["aux_loss_coef"] < 0:
            raise ValueError(f"model.moe.bias_update_rate and aux_loss_coef must be >= 0, got {self.moe}")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that are rotated: int(head_dim * partial_rotary_factor) (the release's rope_dim)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def active_params_per_token(self) -> int:
        """Parameters one token's forward multiplies by (FLOPs = 2 x this per token, forward): attention, dense
        FFNs, router, top-k routed and shared experts of MoE layers, norms and the head; not the input embedding
        (a lookup) nor the unchosen experts."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        moe = self.num_experts * d + 3 * d * self.moe_intermediate_size * (self.num_experts_per_tok
                                                                           + self.num_shared_experts)
        dense = 3 * d * self.intermediate_size
        n_moe = self.num_layers - self.first_k_dense_replace
        return self.num_layers * attn + n_moe * moe + self.first_k_dense_replace * dense + self.vocab_size * d


# LLaDA2.0-mini / LLaDA2.1-mini shape (dFactory configs/model_configs/llada2_mini/config.json); the mask token
# is read from the tokenizer on import (156895 in the release).
LLADA2_PRESETS: dict[str, dict] = {
    "llada2-mini": dict(vocab_size=157184, hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4,
                        head_dim=128, intermediate_size=5120, max_seq_len=16384, rope_theta=600000.0,
                        norm_eps=1e-6, partial_rotary_factor=0.5, first_k_dense_replace=1, moe_intermediate_size=512,
                        num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, pad_token_id=156892, mask_token_id=156895),
}
# LLaDA2.0/2.1-flash (dFactory configs/model_configs/llada2_flash/config.json): the mini keys with these widths
LLADA2_PRESETS["llada2-flash"] = dict(LLADA2_PRESETS["llada2-mini"], hidden_size=4096, num_layers=32, num_heads=32,
                                      intermediate_size=9216, moe_intermediate_size=1024)


class ReleaseRMSNorm(RMSNorm):
    """RMSNorm in the release's order: normalise in float32, cast to the input dtype, then multiply by the weight
    (:class:`RMSNorm` multiplies in float32 before the cast; identical in float32, one rounding apart in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [B, H, L, head_dim] (rotate-half), pass the rest."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)


class LLaDA2Attention(nn.Module):
    """Fused-QKV grouped-query attention with QK RMSNorm and partial rotary embeddings.

    ``qkv_proj``: [(num_heads + 2 num_kv_heads) head_dim, hidden] (rows: all query heads, then keys, then
    values); ``o_proj``: [hidden, num_heads head_dim] (bias when ``output_bias``).
    """

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=cfg.attention_bias)
        self.q_norm = ReleaseRMSNorm(hd, cfg.norm_eps)
        self.k_norm = ReleaseRMSNorm(hd, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=cfg.output_bias)

    def qkv(self, x, cos, sin):
        """q [B, num_heads, L, head_dim], k, v [B, num_kv_heads, L, head_dim] of ``x`` [B, L, hidden]; cos/sin
        [B, 1, L, rotary_dim] from :meth:`LLaDA2MoeModel.rope`."""
        cfg = self.cfg
        b, l, _ = x.shape
        qkv = self.qkv_proj(x).view(b, l, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k, v = qkv.split([cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
        q, k = self.q_norm(q), self.k_norm(k)
        return apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, mask):
        q, k, v = self.qkv(x, cos, sin)
        out = attention.attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _feed_forward(cfg: LLaDA2Config, index: int) -> nn.Module:
    """Layer ``index``'s FFN: dense SwiGLU (layer < first_k_dense_replace) or MoE with shared experts."""
    if not cfg.is_moe_layer(index):
        return MLP(cfg)
    shared = MLP(ModelConfig(hidden_size=cfg.hidden_size, num_heads=1, num_kv_heads=1, head_dim=2,
                             intermediate_size=cfg.moe_intermediate_size * cfg.num_shared_experts))
    block = MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                     cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, shared)
    block.gate.aux_loss_coef = float(cfg.moe["aux_loss_coef"])
    return block


class LLaDA2DecoderLayer(PreNormLayer):
    """x + attn(norm(x)), then x + ffn(norm(x)) (:class:`PreNormLayer`) with release norms and fused-QKV attention."""

    def __init__(self, cfg: LLaDA2Config, index: int):
        super().__init__(ReleaseRMSNorm(cfg.hidden_size, cfg.norm_eps), LLaDA2Attention(cfg),
                         ReleaseRMSNorm(cfg.hidden_size, cfg.norm_eps), _feed_forward(cfg, index))


class LLaDA2MoeModel(nn.Module):
    """LLaDA2.x mask predictor; same call contract as :class:`llada_scale.model.transformer.Transformer`.

    ``forward(input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None)``: input_ids
    int64 [B, L]; without labels returns logits [B, L, vocab_size] in the weights' dtype; with labels (int64
    [B, L], -100 = no loss) float32 [B, L] per-position cross-entropy from the chunked head
    (:func:`llada_scale.model.head.linear_cross_entropy`). Masks as the Transformer's (document ids ->
    bidirectional within documents; a prebuilt dense/Flex mask for block diffusion ``[x_t ; x_0]``).
    """

    def __init__(self, cfg: LLaDA2Config, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        # embedding, decoder layers, final norm (our name ``model``; the release's ``model`` too)
        self.model = Backbone(nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                              [LLaDA2DecoderLayer(cfg, i) for i in range(cfg.num_layers)],
                              ReleaseRMSNorm(cfg.hidden_size, cfg.norm_eps))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if init_weights:  # False: the caller runs init_weights() itself (partitioned parameters) or loads weights
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, materialize: Callable[[list], ContextManager] | None = None) -> None:
        """N(0, init_std^2) for every projection, embedding and expert (the release's ``_init_weights`` with
        ``initializer_range``), zero biases, unit norms; the float32 ``expert_bias`` buffers start at zero
        (set in the router's constructor). Draws from torch's global RNG in parameter order, so the same seed
        gives the same weights.

        ``materialize(params)``: a context manager inside which ``params`` hold their full tensors and whose
        changes persist (DeepSpeed ZeRO-3's ``GatheredParameters(params, modifier_rank=0)``); default: none.
        """
        ctx = materialize or (lambda params: contextlib.nullcontext())
        std = self.config.init_std
        for name, p in self.named_parameters():
            with ctx([p]):
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)

    def moe_layers(self) -> list[tuple[int, MoEBlock]]:
        """``(layer index, MoEBlock)`` of every MoE layer."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoEBlock)]

    def output_weight(self) -> torch.Tensor:
        """The [vocab_size, hidden_size] head matrix."""
        return self.lm_head.weight

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, 1, L, rotary_dim] of ``position_ids`` (frequencies theta^(-2i / rotary_dim))."""
        return rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, dtype)

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, attention_mask=None):
        """Final-norm hidden states [B, L, hidden_size]; arguments as :meth:`forward`."""
        cfg = self.config
        b, l = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        mask = attention_mask
        if mask is None:
            mask = attention.build_mask(document_ids, causal=False, q_len=l, kv_len=l, batch_size=b,
                                        device=input_ids.device, backend=cfg.attention_backend)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, torch.float32)  # rotation in float32, cast back (model/rope.py)
        return self.model.decode(x, cos, sin, mask)

    def forward(self, input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None):
        return head_forward(lambda: self.hidden_states(input_ids, position_ids, document_ids, attention_mask),
                            self.output_weight, labels)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Total parameter count (every expert); ``exclude_embeddings`` drops the input embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n


__all__ = ["MODEL_TYPE", "LLaDA2Config", "LLADA2_PRESETS", "LLaDA2MoeModel", "ReleaseRMSNorm",
           "apply_partial_rotary"]
