"""Generated samples printed at each validation: a few fixed prompts through the sampler that fits the run
(AR decoding, LLaDA low-confidence remasking, or block-by-block decoding for block-diffusion models)."""

from __future__ import annotations

import torch

from llada_scale.training.config import RunConfig

SFT_QUESTIONS = ("Give three tips for staying healthy.", "请介绍一下你自己。", "What is the capital of France?")
PRETRAIN_PROMPTS = ("ROMEO:\n", "床前明月光，", "The history of")


def sample_prompts(cfg: RunConfig, tokenizer) -> list[list[int]]:
    """Token ids of the fixed prompts: chat-rendered questions for SFT, text openings otherwise."""
    if cfg.objective.name == "sft":
        return [tokenizer.render_prompt([{"role": "user", "content": q}]) for q in SFT_QUESTIONS]
    return [tokenizer.encode(t) for t in PRETRAIN_PROMPTS]


@torch.no_grad()
def generate_samples(model, cfg: RunConfig, tokenizer, step: int) -> list[str]:
    """``train.num_samples`` lines ``'prompt' -> 'answer'`` (answers cut at EOS, ``train.sample_tokens`` long).

    Every rank must call this (ZeRO-3 gathers parameters in each forward); ``model`` is the engine's module.
    Diffusion models never produce the mask token or the embedding's padding rows.
    """
    from llada_scale import sampling as generate

    prompts = sample_prompts(cfg, tokenizer)[: cfg.train.num_samples]
    if not prompts:
        return []
    model.eval()
    t = cfg.train
    eos = tokenizer.eos_token_id
    mask_id = cfg.model.mask_token_id
    unused = list(range(tokenizer.vocab_size, cfg.model.vocab_size))  # the embedding's padding rows
    if cfg.model.causal:
        outs = generate.ar_generate(model, prompts, max_new_tokens=t.sample_tokens, eos_token_id=eos).tokens
    elif cfg.objective.block_diffusion:  # block-causal model: block-by-block decoding with a KV cache
        from llada_scale.sampling.block import generate_blocks_batch

        block = min(cfg.objective.block_length_at(step), t.sample_tokens)
        outs = generate_blocks_batch(model, prompts, mask_token_id=mask_id, gen_length=t.sample_tokens,
                                     block_length=block, steps_per_block=block, suppress_token_ids=unused).tokens
    else:  # LLaDA low-confidence remasking; small blocks (semi-AR) keep SFT models from flooding EOS
        block = t.sample_block_length or t.sample_tokens
        outs = generate.diffusion_generate(model, prompts, mask_token_id=mask_id, gen_length=t.sample_tokens,
                                           block_length=block, steps=t.sample_tokens,
                                           suppress_token_ids=unused).tokens
    return [f"{tokenizer.decode(p)!r} -> {tokenizer.decode(generate.truncate_at(o, eos))!r}"
            for p, o in zip(prompts, outs)]
