"""Checkpoints: the atomic DeepSpeed checkpointer of training runs (:mod:`.checkpointer`), weight I/O for every
format we produce or import (:mod:`.weights`, :mod:`.files`), the Hugging Face config mapping (:mod:`.hf`),
conversions (:mod:`.convert`) and foreign formats (:mod:`.nano_llada`). The names below are the public API."""

from llada_scale.checkpoint.files import (CONFIG_FILE, FORMAT, META_FILE, SAFE_INDEX, SAFE_SINGLE, CheckpointError,
                                          atomic_write_text, copy_tokenizer_files, parse_dtype, parse_size,
                                          save_safetensors)
from llada_scale.checkpoint.hf import hf_config_from_model_config, model_config_from_hf, yarn_hf_mismatch
from llada_scale.checkpoint.weights import (build_model_from_checkpoint, check_state_dict, load_model_state,
                                            model_config_from_meta, resolve_checkpoint, tokenizer_path_from_meta)

__all__ = ["CONFIG_FILE", "FORMAT", "META_FILE", "SAFE_INDEX", "SAFE_SINGLE", "CheckpointError", "atomic_write_text",
           "build_model_from_checkpoint", "check_state_dict", "copy_tokenizer_files", "hf_config_from_model_config",
           "load_model_state", "model_config_from_hf", "model_config_from_meta", "parse_dtype", "parse_size",
           "resolve_checkpoint", "save_safetensors", "tokenizer_path_from_meta", "yarn_hf_mismatch"]
