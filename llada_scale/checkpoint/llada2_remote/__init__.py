"""The ``trust_remote_code`` files that ``convert_checkpoint.py export-llada2`` copies next to the weights
(``configuration_llada2_moe.py``, ``modeling_llada2_moe.py``). They import only torch and transformers, never
llada_scale, so the exported directory loads anywhere with ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``."""
