"""T2T editing and the LLaDA 2.0 SFT techniques (:mod:`llada_scale.objectives.editing`): the arithmetic of each
on hand-made examples, and the objective's draws replayed in plain Python."""

import math

import pytest
import torch

from llada_scale.objectives import editing
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss
from tests.objectives.test_objectives import MASK, V, FixedLogits, ce_loop, make_batch

VOCAB = torch.tensor([3, 4, 5, 6, 7, 8, 9])  # replacement ids: 0..2 are "special" here


def entropy(row):
    p = torch.softmax(row.double(), -1)
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("prompt_len, kw", [(0, 0.3), (3, 0.3), (3, 0.0)])
def test_t2t_random_replays_draws_and_splits_loss(prompt_len, kw):
    b, l, eps, seed, edit_prob, w = 3, 10, 1e-3, 5, 0.4, 0.7
    batch = make_batch(b, l, prompt_len, seed=2)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(3))
    model = FixedLogits(logits)
    cfg = ObjectiveConfig(name="sft" if prompt_len else "diffusion", random_length_prob=0.0, eps=eps,
                          edit_prob=edit_prob, edit_loss_weight=w, edit_keep_weight=kw)
    loss, stats = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK,
                               generator=torch.Generator().manual_seed(seed), edit_vocab=VOCAB)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, generator=g).tolist()
    r = torch.rand(b, l, generator=g).tolist()
    e = torch.rand(b, l, generator=g).tolist()
    k = torch.randint(0, len(VOCAB), (b, l), generator=g).tolist()
    ids, seen = batch["input_ids"].tolist(), model.inputs[0].tolist()
    m2t, t2t_sum, n_t2t, keep_sum, n_keep = 0.0, 0.0, 0, 0.0, 0
    for row in range(b):
        t = (1 - eps) * u[row] + eps
        for i in range(l):
            if i < prompt_len:
                assert seen[row][i] == ids[row][i]  # the prompt is never masked nor corrupted
                continue
            if r[row][i] < t:
                assert seen[row][i] == MASK
                m2t += ce_loop(logits[row, i], ids[row][i]) / t / (l - prompt_len) / b
            elif e[row][i] < edit_prob:
                rep = int(VOCAB[k[row][i]])
                rep = rep if rep != ids[row][i] else int(VOCAB[(k[row][i] + 1) % len(VOCAB)])
                assert seen[row][i] == rep != ids[row][i]
                t2t_sum += ce_loop(logits[row, i], ids[row][i])
                n_t2t += 1
            else:
                assert seen[row][i] == ids[row][i]
                keep_sum += ce_loop(logits[row, i], ids[row][i])
                n_keep += 1
    assert n_t2t > 0 and n_keep > 0
    t2t = t2t_sum / n_t2t
    assert float(stats["m2t_loss_sum"]) == pytest.approx(m2t, rel=1e-5)
    assert float(stats["t2t_loss_sum"]) == pytest.approx(t2t, rel=1e-5)
    assert float(stats["t2t_tokens"]) == n_t2t
    keep = keep_sum / n_keep
    assert float(loss) == pytest.approx(m2t + w * t2t + kw * keep, rel=1e-5)
    if kw:
        assert float(stats["keep_loss_sum"]) == pytest.approx(keep, rel=1e-5)
    else:
        assert "keep_loss_sum" not in stats


def test_t2t_off_keeps_plain_loss_and_draws():
    batch = make_batch(2, 12, seed=4)
    model = FixedLogits(torch.randn(2, 12, V, generator=torch.Generator().manual_seed(0)))
    base = ObjectiveConfig(random_length_prob=0.0)
    a, _ = compute_loss(model, batch, base, False, MASK, torch.Generator().manual_seed(1))
    b, st = compute_loss(model, batch, ObjectiveConfig(random_length_prob=0.0, edit_prob=0.0), False, MASK,
                         torch.Generator().manual_seed(1))
    assert float(a) == float(b) and "t2t_loss_sum" not in st


def test_t2t_self_uses_the_drafts_wrong_guesses():
    b, l = 2, 8
    batch = make_batch(b, l, seed=6)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(9))
    ids = batch["input_ids"]
    logits[0, :4] = -10.0
    logits[0, torch.arange(4), ids[0, :4]] = 10.0  # the draft is right on row 0's first half
    logits[..., MASK] = 50.0  # the draft never proposes the mask token
    model = FixedLogits(logits)
    cfg = ObjectiveConfig(random_length_prob=0.0, edit_prob=0.9, edit_source="self")
    seed = 2
    loss, stats = compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    t = (1 - 1e-3) * torch.rand(b, generator=g) + 1e-3
    masked = torch.rand(b, l, generator=g) < t[:, None]
    chosen = ~masked & (torch.rand(b, l, generator=g) < 0.9)
    draft_in, final_in = model.inputs  # the draft pass, then the training pass
    assert torch.equal(draft_in, torch.where(masked | chosen, MASK, ids))
    guess = logits.clone()
    guess[..., MASK] = -math.inf
    guess = guess.argmax(-1)
    corrupted = chosen & (guess != ids)
    assert not corrupted[0, :4].any()  # right guesses stay clean
    assert torch.equal(final_in, torch.where(masked, MASK, torch.where(corrupted, guess, ids)))
    assert float(stats["t2t_tokens"]) == int(corrupted.sum()) > 0
    assert float(stats["model_tokens"]) == 2 * b * l  # the draft pass counts as a forward


def test_replacement_vocab_and_random_replacements():
    vocab = editing.replacement_vocab(6, [0, 2, None])
    assert vocab.tolist() == [1, 3, 4, 5]
    ids = torch.tensor([[1, 3, 4, 5, 0, 2] * 50])
    rep = editing.random_replacements(ids, vocab, torch.Generator().manual_seed(0))
    assert bool((rep != ids).all()) and set(rep.unique().tolist()) <= set(vocab.tolist())
    with pytest.raises(ValueError, match="at least 2"):
        editing.replacement_vocab(3, [0, 1])


def test_complementary_masking_pairs_cover_every_answer_token_once():
    b, l, p, eps = 2, 8, 2, 1e-3
    batch = make_batch(b, l, prompt_len=p, seed=1)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(4))
    model = FixedLogits(torch.cat([logits, logits], 0))
    cfg = ObjectiveConfig(name="sft", complementary_masking=True, eps=eps)
    loss, stats = compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(3))
    seen = model.inputs[0]
    assert seen.shape == (2 * b, l)
    m1, m2 = seen[:b] == MASK, seen[b:] == MASK
    assert not (m1 & m2).any() and bool((m1 | m2)[:, p:].all()) and not (m1 | m2)[:, :p].any()
    g = torch.Generator().manual_seed(3)
    t = ((1 - eps) * torch.rand(b, generator=g) + eps).tolist()
    ids = batch["input_ids"].tolist()
    expected = 0.0
    for half, mask in ((0, m1), (1, m2)):
        for row in range(b):
            tt = t[row] if half == 0 else max(1 - t[row], eps)
            for i in range(l):
                if mask[row, i]:
                    expected += ce_loop(logits[row, i], ids[row][i]) / tt / (l - p) / (2 * b)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(stats["model_tokens"]) == 2 * b * l and float(stats["tokens"]) == b * l


def test_complementary_masks_hand_example():
    masked = torch.tensor([[True, False, False, True, False]])
    eligible = torch.tensor([[False, True, True, True, True]])
    mc, tc = editing.complementary_masks(masked, eligible, torch.tensor([0.25]), 1e-3)
    assert mc.tolist() == [[False, True, True, False, True]]
    assert tc.tolist() == [0.75]
    assert editing.complementary_masks(masked, eligible, torch.tensor([1.0]), 1e-3)[1].tolist() == pytest.approx([1e-3])


@pytest.mark.parametrize("block", [None, 4])
def test_mask_ratio_band_times(block):
    b, l, low, high = 3, 8, 0.3, 0.8
    batch = make_batch(b, l, seed=2)
    model = FixedLogits(torch.randn(b, l, V, generator=torch.Generator().manual_seed(0)))
    cfg = ObjectiveConfig(random_length_prob=0.0, mask_ratio_band=[low, high], block_length=block or 0,
                          loss_weighting="none")
    _, stats = compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    u = torch.rand(b, 1 if block is None else l // block, generator=g)
    t = (low + (high - low) * u).repeat_interleave(l if block is None else block, 1)
    masked = torch.rand(b, l, generator=g) < t
    assert torch.equal(model.inputs[0][:, :l] == MASK, masked)
    assert float(stats["t_bucket_count"].sum()) == int(masked.sum())


def test_block_pad_keep_hand_example():
    pos = torch.arange(10).expand(2, 10)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, 5:] = True  # conversation = 5 tokens: keep padding up to position 7 (block 4 ends at 8)
    padding[1, 8:] = True  # 8 tokens: already block-aligned, drop all padding
    keep = editing.block_pad_keep(pos, padding, 4)
    assert keep.tolist() == [[True] * 8 + [False] * 2, [True] * 8 + [False] * 2]
    padding[1, :] = False
    padding[1, 3:] = True
    assert editing.block_pad_keep(pos, padding, 4)[1].tolist() == [True] * 4 + [False] * 6


def test_sft_block_pad_drops_tail_padding_from_noise_and_loss():
    b, l, p = 2, 12, 2
    batch = make_batch(b, l, prompt_len=p, seed=8)
    batch["padding_mask"][:, 6:] = True  # conversation ends at 6 -> kept up to 8 with block 4
    model = FixedLogits(torch.randn(b, l, V, generator=torch.Generator().manual_seed(1)))
    cfg = ObjectiveConfig(name="sft", block_length=4, sft_block_pad=True, mask_ratio_band=[0.999, 1.0])
    compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(0))
    seen = model.inputs[0][:, :l]
    assert bool((seen[:, p:8] == MASK).all()) and not (seen[:, 8:] == MASK).any()


def test_confidence_loss_hand_example():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 2, 2, 1]])
    mask = torch.tensor([[True, True, True, False]])
    # correct and masked: positions 0 and 2 (position 1 predicts 1 != 2; position 3 is not masked)
    expected = (entropy(logits[0, 0]) + entropy(logits[0, 2])) / 2
    assert float(editing.confidence_loss(logits, mask, targets)) == pytest.approx(expected, rel=1e-6)
    assert float(editing.confidence_loss(logits, mask & False, targets)) == 0.0


def test_cap_term_added_to_diffusion_loss():
    b, l = 2, 10
    batch = make_batch(b, l, seed=3)
    logits = torch.randn(b, l, V, generator=torch.Generator().manual_seed(5)) * 3
    ids = batch["input_ids"]
    logits[:, ::2] = logits[:, ::2].scatter(-1, ids[:, ::2, None], 9.0)  # even positions predicted right
    model = FixedLogits(logits)
    base = ObjectiveConfig(random_length_prob=0.0)
    plain, _ = compute_loss(model, batch, base, False, MASK, torch.Generator().manual_seed(2))
    cfg = ObjectiveConfig(random_length_prob=0.0, confidence_weight=0.5)
    loss, stats = compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(2))
    masked = model.inputs[-1] == MASK
    correct = masked & (logits.argmax(-1) == ids)
    assert correct.any()
    cap = sum(entropy(logits[r, i]) for r, i in correct.nonzero().tolist()) / int(correct.sum())
    assert float(stats["cap_loss_sum"]) == pytest.approx(cap, rel=1e-5)
    assert float(loss) == pytest.approx(float(plain) + 0.5 * cap, rel=1e-5)


def test_t2t_with_block_diffusion_corrupts_only_the_noisy_half():
    b, l = 2, 8
    batch = make_batch(b, l, prompt_len=2, seed=9)
    model = FixedLogits(torch.randn(b, l, V, generator=torch.Generator().manual_seed(6)))
    cfg = ObjectiveConfig(name="sft", block_length=4, edit_prob=0.5)
    _, stats = compute_loss(model, batch, cfg, False, MASK, torch.Generator().manual_seed(1), edit_vocab=VOCAB)
    x = model.inputs[0]
    assert x.shape == (b, 2 * l)
    assert torch.equal(x[:, l:], batch["input_ids"]) and torch.equal(x[:, :2], batch["input_ids"][:, :2])
    assert float(stats["t2t_tokens"]) > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(edit_prob=1.0), "edit_prob"), (dict(edit_source="other"), "edit_source"),
    (dict(mask_ratio_band=[0.8, 0.3]), "mask_ratio_band"), (dict(mask_ratio_band=[0.3]), "mask_ratio_band"),
    (dict(complementary_masking=True, noise_schedule="cosine", loss_weighting="none"), "linear"),
    (dict(sft_block_pad=True), "sft_block_pad"), (dict(name="ar", edit_prob=0.1), "diffusion objective"),
    (dict(confidence_weight=-1.0), "confidence_weight"), (dict(edit_loss_weight=-1.0), "edit_loss_weight"),
    (dict(edit_keep_weight=-1.0), "edit_keep_weight")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ObjectiveConfig(**kw)


def test_random_edits_need_a_vocabulary():
    batch = make_batch(1, 6)
    with pytest.raises(ValueError, match="edit_vocab"):
        compute_loss(FixedLogits(torch.zeros(1, 6, V)), batch, ObjectiveConfig(edit_prob=0.5, random_length_prob=0),
                     False, MASK, torch.Generator().manual_seed(0))


@pytest.mark.distributed
def test_trainer_logs_the_m2t_t2t_split(tmp_path, sft_shards):
    """A real SFT run with T2T editing on (self drafts) and block diffusion: metrics.jsonl holds train/loss_m2t,
    train/loss_t2t and train/loss_keep, and their weighted sum is train/loss (each step logged alone)."""
    from llada_scale.testing import train_metrics
    from tests.training.test_train import train

    run = tmp_path / "run"
    train(run, sft_shards, "objective.name=sft", "objective.block_length=16", "objective.edit_prob=0.2",
          "objective.edit_loss_weight=0.5", "objective.edit_source=self", "objective.complementary_masking=true", "train.max_steps=2",
          "train.save_every=0", "train.micro_batch_size=2", "train.global_batch_size=2", "train.init_from=",
          recipe="configs/sft_diffusion_tiny.yaml")
    rows = train_metrics(run)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["train/loss_t2t"] > 0
        assert r["train/loss"] == pytest.approx(r["train/loss_m2t"] + 0.5 * r["train/loss_t2t"]
                                                + r["train/loss_keep"], rel=1e-5)
