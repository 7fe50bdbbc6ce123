"""Token-to-token (T2T) editing objective of LLaDA 2.1 and LLaDA 2.0's SFT techniques.

LLaDA 2.1 trains the mask predictor to also *repair* visible tokens: besides masking (mask-to-token, M2T),
a fraction of the visible, loss-bearing positions of x_t is replaced by other tokens, and a second
cross-entropy term restores the originals there (token-to-token, T2T). Its decoder then commits tokens early
and rewrites the committed ones it later finds wrong (:mod:`llada_scale.sampling.edit`). The report gives no
rates; the defaults and why are in docs/LLADA2.md.

LLaDA 2.0's SFT additions (Bie et al. 2025, arXiv 2512.15745, and inclusionAI/dFactory), each off by default:

* complementary masking: every row appears twice in the micro batch, once with mask m and once with the
  complementary mask (eligible and not m), so every answer token is trained exactly once per pair
  (:func:`complementary_masks`);
* a mask-ratio band: t ~ U(low, high) instead of U(eps, 1) (dFactory's SFT uses 0.3-0.8; :func:`band_times`);
* block-aligned SFT padding: the trained EOS padding of a row stops at the first block boundary after the
  conversation (the row is as if padded to a multiple of the block length; :func:`block_pad_keep`);
* the CAP confidence loss: ``confidence_weight`` x the mean entropy of the predictive distribution on the
  masked positions the model already predicts correctly (:func:`confidence_loss`; LLaDA 2.0 report, "CAP":
  confidence-aware parallel training, an entropy-minimisation term that sharpens correct predictions so that
  more of them pass a parallel-decoding threshold).

Everything here works on token ids, masks and logits only, so it is model-agnostic: any model with the
``model(input_ids, position_ids=, document_ids=, attention_mask=, labels=)`` interface.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llada_scale.model.block_attention import block_ids

EDIT_SOURCES = ("random", "self")


def replacement_vocab(vocab_size: int, special_ids: Sequence[int], device=None) -> torch.Tensor:
    """int64 [n]: the ids a ``random`` T2T corruption may write: ``0 .. vocab_size - 1`` without
    ``special_ids`` (mask, eos, bos, pad, chat-template markers). ``vocab_size`` is the tokenizer's, not the
    padded embedding's (padding rows are never real tokens).

    Raises:
        ValueError: fewer than 2 ids remain (a corruption must be able to differ from the original).
    """
    special = {int(i) for i in special_ids if i is not None}
    ids = [i for i in range(int(vocab_size)) if i not in special]
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} non-special token ids in a vocabulary of {vocab_size}: T2T corruption "
                         "needs at least 2")
    return torch.tensor(ids, dtype=torch.long, device=device)


def tokenizer_special_ids(tokenizer) -> list[int]:
    """The special ids of a :class:`llada_scale.data.tokenizer.Tokenizer` (duck-typed: bos / eos / pad / mask
    ids, plus the added tokens a ``tokenizers`` backend marks special, e.g. minimind's ``<|im_start|>``)."""
    ids = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")}
    hf = getattr(tokenizer, "_hf", None)
    if hf is not None:
        ids |= {i for i, tok in hf.get_added_tokens_decoder().items() if tok.special}
    return sorted(i for i in ids if i is not None and i >= 0)


def corrupt_positions(visible: torch.Tensor, edit_prob: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """bool [B, L]: each ``visible`` (unmasked, loss-eligible) position independently with prob. ``edit_prob``.
    Random draws: ``rand(B, L)``, always (static shapes, resumable noise)."""
    u = torch.rand(visible.shape, device=visible.device, generator=generator)
    return visible & (u < edit_prob)


def random_replacements(input_ids: torch.Tensor, vocab: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """int64 [B, L]: a token of ``vocab`` (uniform) at every position, never equal to ``input_ids`` there.

    Draws k ~ U{0..n-1} per position (``randint``); where ``vocab[k]`` equals the original it takes
    ``vocab[(k + 1) % n]`` instead (n >= 2, so that differs). The result is uniform over ``vocab`` minus the
    original when the original is in ``vocab``, except that the id after it gets twice the mass (1/n extra);
    harmless for a corruption process and free of rejection loops.
    """
    n = vocab.numel()
    k = torch.randint(0, n, input_ids.shape, device=input_ids.device, generator=generator)
    rep = vocab[k]
    return torch.where(rep == input_ids, vocab[(k + 1) % n], rep)


def edit_loss(token_ce: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """T2T loss: mean cross-entropy over the corrupted positions of the micro batch, 0 when there are none.

    Args:
        token_ce: float32 [B, L] per-token cross-entropy against x_0 (the model's ``labels`` output).
        corrupted: bool [B, L].
    Returns:
        float32 scalar: sum(CE * corrupted) / max(1, #corrupted). No host synchronisation.
    """
    return (token_ce * corrupted).sum() / corrupted.sum().clamp(min=1)


# ------------------------------------------------------------------------------ LLaDA 2.0 SFT techniques
def band_times(shape, low: float, high: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t = low + (high - low) u, u ~ U(0, 1): float32 of ``shape`` (the clipped mask-ratio band of LLaDA 2.0 /
    dFactory SFT, e.g. 0.3-0.8). One ``rand(shape)`` draw, the same draw U(eps, 1) sampling makes."""
    return low + (high - low) * torch.rand(shape, device=device, generator=generator)


def complementary_masks(masked: torch.Tensor, eligible: torch.Tensor, t: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The complementary half of a complementary-masking pair (LLaDA 2.0).

    Args:
        masked: bool [B, L] the first mask; eligible: bool [B, L] the positions that may be masked.
        t: float [B] or [B, L]: the (linear-schedule) times that drew ``masked``.
    Returns:
        ``(masked_c, t_c)``: masked_c = eligible & ~masked (bool [B, L]); t_c = clamp(1 - t, eps, 1), the time
        whose mask probability 1 - t the complement has under the linear schedule (so its 1/t weight is that of
        the complementary ratio). Together the pair masks every eligible token exactly once.
    """
    return eligible & ~masked, (1.0 - t).clamp(min=max(eps, 1e-6), max=1.0)


def block_pad_keep(position_ids: torch.Tensor, padding: torch.Tensor, block_length: int) -> torch.Tensor:
    """bool [B, L]: positions a block-aligned SFT row keeps: every non-padding position, and the EOS padding
    up to the end of the block (counted from position 0, as training's blocks) that holds the conversation's
    last token. Padding after that block is dropped (no noise, no loss, its own document), as if the row had
    been padded only to a multiple of ``block_length`` (LLaDA 2.0 / dFactory block-diffusion SFT).

    Args:
        position_ids: int64 [B, L]; padding: bool [B, L] (True on the EOS padding after the conversation).
        block_length: >= 1.
    """
    content_end = torch.where(padding, -1, position_ids).amax(1, keepdim=True) + 1  # [B, 1] tokens before padding
    limit = (content_end + block_length - 1) // block_length * block_length
    return ~padding | (position_ids < limit)


def confidence_loss(logits: torch.Tensor, labels_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CAP confidence loss: mean entropy (nats) of softmax(logits) over the positions of ``labels_mask`` whose
    argmax equals ``targets`` (the masked tokens the model already predicts correctly); 0 when there are none.
    Minimising it sharpens correct predictions so that more tokens pass a decoding threshold per step.

    Args:
        logits: [B, L, V] (any float dtype; computed in float32).
        labels_mask: bool [B, L]; targets: int64 [B, L].
    Returns:
        float32 scalar, differentiable in ``logits`` (the argmax selection is not).
    """
    logp = torch.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    correct = labels_mask & (logits.argmax(-1) == targets)
    return (entropy * correct).sum() / correct.sum().clamp(min=1)


def segments_for(position_ids: torch.Tensor, document_ids: torch.Tensor, block_length: int | None) -> torch.Tensor:
    """Block segments of :func:`llada_scale.model.block_attention.block_ids`, or one segment per row (zeros)
    for plain diffusion (``block_length`` None)."""
    if block_length is None:
        return torch.zeros_like(position_ids)
    return block_ids(position_ids, document_ids, block_length)


__all__ = ["EDIT_SOURCES", "replacement_vocab", "tokenizer_special_ids", "corrupt_positions", "random_replacements", "edit_loss",
           "band_times", "complementary_masks", "block_pad_keep", "confidence_loss", "segments_for"]
