"""The model: a Llama-style backbone (:mod:`.transformer`), its rotary embeddings (:mod:`.rope`), attention
masks and the attention call (:mod:`.attention`) and the block-diffusion ``[x_t ; x_0]`` layout
(:mod:`.block_attention`). Nothing here knows about distribution, data or objectives."""
