#!/usr/bin/env python
"""Does T2T editing training help? Scores block-diffusion checkpoints (e.g. the same SFT stage trained M2T-only
and M2T+T2T on the same tokens) on the same validation rows and noise, and decodes the same prompts with the
LLaDA 2.1 editing decoder at both presets vs plain threshold decoding.

(a) Validation rows (answer tokens, EOS padding excluded): a fraction ``t`` of the answer is masked and
``--edit_prob`` of the remaining visible answer tokens is replaced by random non-special tokens (the training
corruption); reported: restoration rate (argmax == original at the corrupted positions), keep rate (argmax ==
token at the untouched visible positions: how rarely the model would rewrite a right token) and the masked CE /
accuracy. The same noise for every checkpoint (one generator seeded per batch).
(b) Generation on the prompts of the validation rows: NFE per generated token, tokens/s (wall clock, noisy on a
shared machine), edits per generated token, and unigram F1 of the answer (cut at EOS) against the reference
answer, for ``plain@thr`` (editing off), ``quality`` (0.7 / 0.5 / 16) and ``speed`` (0.5 / 0.0 / 16).

  python benchmarks/t2t_editing.py runs/m2t runs/t2t --shards data/shards/sft --rows 64 --prompts 32
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llada_scale.checkpoint import build_model_from_checkpoint  # noqa: E402
from llada_scale.data.loader import PackedDataset  # noqa: E402
from llada_scale.data.tokenizer import Tokenizer  # noqa: E402
from llada_scale.model.block_attention import block_diffusion_logits  # noqa: E402
from llada_scale.objectives import editing  # noqa: E402
from llada_scale.sampling.common import truncate_at  # noqa: E402
from llada_scale.sampling.edit import PRESETS, edit_generate  # noqa: E402


def batches(shards, seq_len, rows, micro=8):
    data = iter(PackedDataset(shards, "val", seq_len, micro, seed=0, infinite=True))
    return [next(data) for _ in range(-(-rows // micro))]


@torch.no_grad()
def score_rows(model, data, block, t, edit_prob, vocab, mask_id):
    acc = collections.Counter()
    for i, b in enumerate(data):
        g = torch.Generator().manual_seed(1000 + i)
        ids, answer = b["input_ids"], ~b["prompt_mask"] & ~b["padding_mask"]
        masked = answer & (torch.rand(ids.shape, generator=g) < t)
        corrupted = editing.corrupt_positions(answer & ~masked, edit_prob, g)
        rep = editing.random_replacements(ids, vocab, g)
        noisy = torch.where(masked, mask_id, torch.where(corrupted, rep, ids))
        logits = block_diffusion_logits(model, noisy, ids, b["position_ids"], b["document_ids"], block).float()
        pred = logits.argmax(-1)
        kept = answer & ~masked & ~corrupted
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        acc["restored"] += int((pred == ids)[corrupted].sum())
        acc["corrupted"] += int(corrupted.sum())
        acc["kept"] += int((pred == ids)[kept].sum())
        acc["visible"] += int(kept.sum())
        acc["masked_ce"] += float(ce[masked].sum())
        acc["masked_right"] += int((pred == ids)[masked].sum())
        acc["masked"] += int(masked.sum())
    return {"restore": acc["restored"] / max(1, acc["corrupted"]), "keep": acc["kept"] / max(1, acc["visible"]),
            "masked_ce": acc["masked_ce"] / max(1, acc["masked"]), "masked_acc": acc["masked_right"] / max(1, acc["masked"]),
            "n_corrupted": acc["corrupted"]}


def unigram_f1(pred, ref):
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def prompts_and_refs(data, n, eos):
    out = []
    for b in data:
        for row in range(b["input_ids"].shape[0]):
            ids, prompt = b["input_ids"][row], b["prompt_mask"][row]
            answer = ids[~prompt & ~b["padding_mask"][row]].tolist()
            out.append((ids[prompt].tolist(), truncate_at(answer, eos)))
    return out[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--shards", required=True, help="SFT shards (validation split)")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    ap.add_argument("--seq_len", type=int, default=160)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--edit_prob", type=float, default=0.1)
    ap.add_argument("--ts", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--gen_length", type=int, default=64)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.5], help="plain threshold decoding")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = {c: build_model_from_checkpoint(c).eval() for c in args.checkpoints}
    first = next(iter(models.values()))
    tok = Tokenizer.load(args.tokenizer or first.checkpoint_meta["tokenizer"]["path"])
    vocab = editing.replacement_vocab(tok.vocab_size, editing.tokenizer_special_ids(tok))
    mask_id = first.config.mask_token_id
    data = batches(args.shards, args.seq_len, args.rows)
    print(f"(a) {args.rows} validation rows, block {args.block_length}, edit_prob {args.edit_prob}\n")
    print("| checkpoint | t | restore | keep | masked CE | masked acc | corrupted |\n|---|---|---|---|---|---|---|")
    for c, m in models.items():
        for t in args.ts:
            r = score_rows(m, data, args.block_length, t, args.edit_prob, vocab, mask_id)
            print(f"| {c} | {t} | {r['restore']:.3f} | {r['keep']:.3f} | {r['masked_ce']:.3f} | "
                  f"{r['masked_acc']:.3f} | {r['n_corrupted']} |" if t > 0 else
                  f"| {c} | {t} | {r['restore']:.3f} | {r['keep']:.3f} | - | - | {r['n_corrupted']} |")
    pairs = prompts_and_refs(data, args.prompts, tok.eos_token_id)
    prompts = [p for p, _ in pairs]
    decoders = {f"plain@{thr}": dict(threshold=thr, editing_threshold=None, max_post_steps=16)
                for thr in args.thresholds}
    decoders.update(PRESETS)
    print(f"\n(b) {len(prompts)} prompts, gen_length {args.gen_length}, block {args.block_length}, batch "
          f"{len(prompts)}, greedy\n")
    print("| checkpoint | decoder | steps/token (per row) | batch NFE | tokens/s | edits/token | unigram F1 |\n"
          "|---|---|---|---|---|---|---|")
    for c, m in models.items():
        for name, knobs in decoders.items():
            res = edit_generate(m, prompts, mask_token_id=mask_id, gen_length=args.gen_length,
                                block_length=args.block_length, **knobs, eos_token_id=tok.eos_token_id,
                                suppress_token_ids=list(range(tok.vocab_size, m.config.vocab_size)),
                                allow_extrapolation=True)
            f1 = sum(unigram_f1(truncate_at(t, tok.eos_token_id), r) for t, (_, r) in zip(res.tokens, pairs))
            n = len(prompts) * args.gen_length
            steps = sum(res.extra["row_steps"]) / n
            print(f"| {c} | {name} | {steps:.3f} | {res.nfe} | {n / res.seconds:.0f} | "
                  f"{res.extra['edits_per_token']:.3f} | {f1 / len(prompts):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
