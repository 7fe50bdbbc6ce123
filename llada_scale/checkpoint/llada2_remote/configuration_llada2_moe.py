"""LLaDA2 MoE configuration for ``transformers`` (``trust_remote_code``), written by llada_scale's export-llada2.

The keys are those of inclusionAI's LLaDA2.0/2.1 ``config.json`` (``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``partial_rotary_factor``, ``num_experts``,
``num_experts_per_tok``, ``n_group``, ``topk_group``, ``routed_scaling_factor``, ``first_k_dense_replace``,
``moe_intermediate_size``, ``num_shared_experts``, ...) plus ``mask_token_id``. ``modeling_llada2_moe.py``
implements the released variant only (sigmoid router with expert bias, SiLU, QK-norm, no rope scaling).
"""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    """LLaDA2 mixture-of-experts mask-predictor configuration (``model_type = "llada2_moe"``)."""

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                 max_position_embeddings=16384, rope_theta=600000.0, partial_rotary_factor=0.5,
                 first_k_dense_replace=1, moe_intermediate_size=512, num_experts=256, num_shared_experts=1,
                 num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, use_qkv_bias=False,
                 use_bias=False, hidden_act="silu", score_function="sigmoid", use_qk_norm=True,
                 mask_token_id=None, initializer_range=0.02, use_cache=False, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.hidden_act = hidden_act
        self.score_function = score_function
        self.use_qk_norm = use_qk_norm
        self.mask_token_id = mask_token_id
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
