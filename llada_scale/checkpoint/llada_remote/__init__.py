"""The ``trust_remote_code`` files that ``convert_checkpoint.py export-llada`` copies next to the weights
(``configuration_llada.py``, ``modeling_llada.py``). They import only torch and transformers, never llada_scale,
so the exported directory loads anywhere with ``AutoModel.from_pretrained(DIR, trust_remote_code=True)``."""
