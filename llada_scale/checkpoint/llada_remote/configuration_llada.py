"""LLaDA configuration for ``transformers`` (``trust_remote_code``), written by llada_scale's export-llada.

The keys are those of GSAI-ML/LLaDA-8B-Base's ``config.json`` (an OLMo-style model config: ``d_model``,
``n_heads``, ``n_kv_heads``, ``n_layers``, ``mlp_hidden_size``, ``embedding_size``, ``rope_theta``,
``rms_norm_eps``, ``weight_tying``, ``include_qkv_bias``, ``mask_token_id``, ...), so LLaDA's own loaders
read the same file. Only the variant llada_scale exports is implemented by ``modeling_llada.py``
(llama block, SiLU-gated MLP, RMSNorm, RoPE, no other biases); it refuses any other.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """LLaDA mask-predictor configuration (``model_type = "llada"``)."""

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, d_model=4096, n_heads=32, n_kv_heads=None, n_layers=32, mlp_hidden_size=None, mlp_ratio=4,
                 vocab_size=126464, embedding_size=None, max_sequence_length=4096, rope_theta=500000.0,
                 rms_norm_eps=1e-5, weight_tying=False, include_bias=False, include_qkv_bias=False,
                 layer_norm_with_affine=True, mask_token_id=126336, block_type="llama", activation_type="silu",
                 layer_norm_type="rms", rope=True, alibi=False, attention_layer_norm=False, scale_logits=False,
                 input_emb_norm=False, block_group_size=1, multi_query_attention=None, init_std=0.02,
                 use_cache=False, **kwargs):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.layer_norm_with_affine = layer_norm_with_affine
        self.mask_token_id = mask_token_id
        self.block_type = block_type
        self.activation_type = activation_type
        self.layer_norm_type = layer_norm_type
        self.rope = rope
        self.alibi = alibi
        self.attention_layer_norm = attention_layer_norm
        self.scale_logits = scale_logits
        self.input_emb_norm = input_emb_norm
        self.block_group_size = block_group_size
        self.multi_query_attention = multi_query_attention
        self.init_std = init_std
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", bool(weight_tying))
        super().__init__(**kwargs)

    # transformers' generic names
    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def num_hidden_layers(self):
        return self.n_layers
