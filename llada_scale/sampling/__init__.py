"""Sampling from trained models and scoring them, one file per method:

* :mod:`~llada_scale.sampling.diffusion`: LLaDA low-confidence / random remasking, Fast-dLLM threshold
  decoding and its approximate prefix / dual KV caches (:func:`diffusion_generate`);
* :mod:`~llada_scale.sampling.block`: block-by-block decoding of block-diffusion models with an exact KV cache
  (:func:`generate_blocks_batch`);
* :mod:`~llada_scale.sampling.edit`: LLaDA 2.1's editing decoder (threshold commits + token-to-token edits,
  :func:`edit_generate`);
* :mod:`~llada_scale.sampling.ar`: autoregressive decoding with an exact KV cache (:func:`ar_generate`);
* :mod:`~llada_scale.sampling.kv_cache`: the per-layer cache and the one cached forward all of them share;
* :mod:`~llada_scale.sampling.likelihood`: exact AR, Monte Carlo diffusion (optionally CFG) and block-NELBO
  log-likelihoods;
* :mod:`~llada_scale.sampling.common`: left padding, model calls, rank lockstep, Gumbel noise, the repetition
  penalty and the context-length check.
"""

from llada_scale.sampling.ar import ar_generate
from llada_scale.sampling.block import generate_blocks, generate_blocks_batch
from llada_scale.sampling.common import GenerationResult, add_gumbel_noise, left_pad, truncate_at
from llada_scale.sampling.diffusion import diffusion_generate, get_num_transfer_tokens
from llada_scale.sampling.likelihood import log_likelihood, log_likelihood_batch

__all__ = ["GenerationResult", "add_gumbel_noise", "ar_generate", "diffusion_generate", "generate_blocks",
           "generate_blocks_batch", "get_num_transfer_tokens", "left_pad", "log_likelihood", "log_likelihood_batch",
           "truncate_at"]
