"""Block diffusion: mask vs brute force, equivalence with plain LLaDA at block = L, WSD block schedule,
loss-weight formulas, CFG training and KV-cached block decoding (tiny models, CPU)."""

import math

import pytest
import torch

from llada_scale.model import block_attention as ba
from llada_scale.objectives import block_diffusion as bd
from llada_scale.sampling.block import KVCache, cached_block_logits, generate_blocks, num_transfer_tokens
from llada_scale.model.transformer import ModelConfig, Transformer
from llada_scale.objectives.config import ObjectiveConfig
from llada_scale.objectives.losses import compute_loss, diffusion_objective
from llada_scale.objectives.noise import loss_weight, mask_probability

VOCAB = 100
MASK = 99


def tiny_model(seed=0, dtype=torch.float32, init_std=0.02, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, causal=False, mask_token_id=MASK,
                      attention_backend="sdpa", init_std=init_std, **kw)
    return Transformer(cfg).to(dtype).eval()


def positions_from_docs(doc):
    pos = torch.zeros_like(doc)
    for r in range(doc.shape[0]):
        for i in range(1, doc.shape[1]):
            pos[r, i] = 0 if doc[r, i] != doc[r, i - 1] else pos[r, i - 1] + 1
    return pos


def brute_force_mask(doc, pos, block_length):
    """The rule of the issue, written with python loops over the 2L layout [x_t ; x_0]."""
    b, n = doc.shape
    out = torch.zeros(b, 1, 2 * n, 2 * n, dtype=torch.bool)
    for r in range(b):
        for q in range(2 * n):
            for kv in range(2 * n):
                qi, ki = q % n, kv % n
                q_noisy, kv_noisy = q < n, kv < n
                if doc[r, qi] != doc[r, ki]:
                    continue  # document boundaries cut attention
                bq, bk = int(pos[r, qi]) // block_length, int(pos[r, ki]) // block_length
                if q_noisy and kv_noisy:
                    ok = bq == bk  # own noisy block
                elif q_noisy:
                    ok = bk < bq  # clean tokens of strictly earlier blocks
                elif kv_noisy:
                    ok = False  # clean never sees noisy
                else:
                    ok = bk <= bq  # clean: block-causal
                out[r, 0, q, kv] = ok
    return out


DOCS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2],
                     [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])


@pytest.mark.parametrize("block_length", [1, 3, 4, 13, 50])
def test_mask_equals_brute_force(block_length):
    pos = positions_from_docs(DOCS)
    seg = ba.block_ids(pos, DOCS, block_length)
    dense = ba.block_diffusion_mask(seg, DOCS, backend="sdpa")
    assert dense.shape == (2, 1, 26, 26) and dense.dtype == torch.bool
    assert torch.equal(dense, brute_force_mask(DOCS, pos, block_length))


def test_block_ids_and_times():
    pos = positions_from_docs(DOCS)
    seg = ba.block_ids(pos, DOCS, 4)
    assert seg[0].tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 4, 4]
    assert seg[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    t = bd.sample_block_times(seg, 1e-3, torch.Generator().manual_seed(0))
    for r in range(2):
        for s in seg[r].unique():
            assert t[r][seg[r] == s].unique().numel() == 1  # one t per block
    assert t[0].unique().numel() == 5 and bool((t >= 1e-3).all() & (t <= 1).all())


def test_mask_mod_safe_on_padded_indices():
    """FlexAttention pads Q_LEN/KV_LEN to its tile; the mask_mod must not index out of range there."""
    pos = positions_from_docs(DOCS)
    mod = ba.block_diffusion_mask_mod(ba.block_ids(pos, DOCS, 3), DOCS)
    q = torch.arange(128)[:, None]
    kv = torch.arange(128)[None, :]
    out = mod(torch.tensor(1), torch.tensor(0), q, kv)  # 2L = 26, tile 128
    assert out.shape == (128, 128)


def _tiles(bm, b, nq, nkv):
    """Decode BlockMask row b into sets of partial and full (q_tile, kv_tile)."""
    partial, full = set(), set()
    for i in range(nq):
        for j in range(int(bm.kv_num_blocks[b, 0, i])):
            partial.add((i, int(bm.kv_indices[b, 0, i, j])))
        if bm.full_kv_num_blocks is not None:
            for j in range(int(bm.full_kv_num_blocks[b, 0, i])):
                full.add((i, int(bm.full_kv_indices[b, 0, i, j])))
    return partial, full


@pytest.mark.parametrize("length,tile", [(13, 128), (52, 16), (40, 32)])
def test_flex_block_mask_matches_dense(length, tile):
    """BlockMask tiles agree with the dense mask for 2L not a multiple of the tile (the BLOCK_SIZE pitfall):
    a skipped tile must be all-False and a 'full' tile all-True (partial tiles apply the mask_mod)."""
    doc = torch.zeros(2, length, dtype=torch.long)
    doc[1, length // 3:] = 1
    pos = positions_from_docs(doc)
    seg = ba.block_ids(pos, doc, 4)
    dense = ba.block_diffusion_mask(seg, doc, backend="sdpa")
    bm = ba.flex_block_mask(seg, doc, block_size=tile)
    n = 2 * length
    nt = -(-n // tile)
    for b in range(2):
        partial, full = _tiles(bm, b, nt, nt)
        for i in range(nt):
            for j in range(nt):
                region = dense[b, 0, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                if (i, j) in full:
                    assert bool(region.all())
                elif (i, j) not in partial:
                    assert not bool(region.any())


def _batch(b, l, prompt_len=0, seed=0, doc=None):
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(b, l, dtype=torch.long) if doc is None else doc
    prompt = torch.zeros(b, l, dtype=torch.bool)
    prompt[:, :prompt_len] = True
    return {"input_ids": torch.randint(0, MASK, (b, l), generator=g), "position_ids": positions_from_docs(doc),
            "document_ids": doc, "prompt_mask": prompt, "padding_mask": torch.zeros(b, l, dtype=torch.bool)}


def test_block_logits_depend_only_on_allowed_context():
    model = tiny_model()
    batch = _batch(1, 12, seed=1)
    ids, pos = batch["input_ids"], batch["position_ids"]
    noisy = ids.clone()
    noisy[:, ::3] = MASK
    base = ba.block_diffusion_logits(model, noisy, ids, pos, None, 4)
    later = noisy.clone()
    later[:, 8:] = (later[:, 8:] + 1) % MASK  # block 2's noisy tokens
    clean_later = ids.clone()
    clean_later[:, 4:] = (clean_later[:, 4:] + 1) % MASK  # clean tokens of blocks 1, 2
    out1 = ba.block_diffusion_logits(model, later, ids, pos, None, 4)
    out2 = ba.block_diffusion_logits(model, noisy, clean_later, pos, None, 4)
    assert torch.allclose(out1[:, :8], base[:, :8], atol=1e-5)  # blocks 0, 1 do not see block 2 (noisy)
    assert not torch.allclose(out1[:, 8:], base[:, 8:], atol=1e-5)
    assert torch.allclose(out2[:, :8], base[:, :8], atol=1e-5)  # block 1 sees clean block 0 only
    assert not torch.allclose(out2[:, 8:], base[:, 8:], atol=1e-5)  # block 2 sees clean block 1


@pytest.mark.parametrize("prompt_len", [0, 5])
@pytest.mark.parametrize("block_length", [16, 40])
def test_block_length_L_equals_plain_llada(prompt_len, block_length):
    """Block length >= L, same seed: same noise, and the 2L path gives plain LLaDA's loss and stats."""
    model = tiny_model(seed=2)
    batch = _batch(3, 16, prompt_len=prompt_len, seed=4)
    cfg = ObjectiveConfig(name="sft" if prompt_len else "diffusion", random_length_prob=0.0)
    plain, s1 = diffusion_objective(model, batch, cfg, MASK, torch.Generator().manual_seed(5), block_length=None)
    block, s2 = diffusion_objective(model, batch, cfg, MASK, torch.Generator().manual_seed(5),
                                    block_length=block_length)
    assert float(s1["t_bucket_count"].sum()) > 0
    assert torch.equal(s1["t_bucket_count"], s2["t_bucket_count"])
    assert block.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(s1["t_bucket_ce_sum"], s2["t_bucket_ce_sum"], rtol=1e-5)


def test_compute_loss_block_path_and_stats():
    model = tiny_model(seed=3)
    batch = _batch(2, 16, seed=6)
    sched = [[2, 5], ["full", 5], [4, 1]]
    cfg = ObjectiveConfig(random_length_prob=0.0, block_schedule=sched)
    for step, want in ((0, 2.0), (4, 2.0), (5, 16.0), (9, 16.0), (10, 4.0), (999, 4.0)):
        loss, stats = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(0), step=step)
        assert float(stats["block_length"]) == want and stats["block_length"].dtype == torch.float32
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()  # the 2L path is differentiable
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    _, stats = compute_loss(model, batch, ObjectiveConfig(random_length_prob=0.0), causal=False, mask_token_id=MASK)
    assert "block_length" not in stats


def test_wsd_block_schedule_values():
    sched = bd.wsd_block_schedule([1, 4], 10, 20, [64, 32], 5)
    assert sched == [[1, 10], [4, 10], ["full", 20], [64, 5], [32, 5]]
    got = [bd.block_length_at(sched, s) for s in (0, 9, 10, 19, 20, 39, 40, 44, 45, 49, 50, 10**6)]
    assert got == [1, 1, 4, 4, bd.FULL_LENGTH, bd.FULL_LENGTH, 64, 64, 32, 32, 32, 32]
    assert ObjectiveConfig(block_schedule=sched).block_length_at(12) == 4
    assert ObjectiveConfig(block_length=8).block_length_at(12345) == 8
    assert bd.block_length_at([[0 + 3, 0], [7, 2]], 0) == 7  # zero-step phases are skipped
    with pytest.raises(ValueError):
        bd.block_length_at([], 0)
    with pytest.raises(ValueError):
        bd.validate_block_schedule([["half", 3]])
    with pytest.raises(ValueError):
        ObjectiveConfig().block_length_at(0)


def test_loss_weighting_formulas():
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64, requires_grad=True)
    for schedule in ("linear", "cosine"):
        alpha = 1 - t if schedule == "linear" else torch.cos(math.pi * t / 2)
        (dalpha,) = torch.autograd.grad(alpha.sum(), t)
        elbo_w = -dalpha / (1 - alpha)
        assert torch.allclose(mask_probability(t, schedule), 1 - alpha, atol=1e-12)
        assert torch.allclose(loss_weight(t, schedule), elbo_w, rtol=1e-10)
    t = t.detach()
    assert torch.allclose(loss_weight(t, "inverse_t"), 1 / t)
    assert torch.allclose(loss_weight(t, "cosine"), (math.pi / 2) / torch.tan(math.pi * t / 4))
    assert torch.equal(loss_weight(t, "none"), torch.ones_like(t))
    # cosine at tiny t stays finite and ~ 2/t
    small = torch.tensor([1e-4], dtype=torch.float32)
    assert float(loss_weight(small, "cosine")) == pytest.approx(2 / 1e-4, rel=1e-3)
    assert float(mask_probability(small, "cosine")) == pytest.approx((math.pi * 1e-4) ** 2 / 8, rel=1e-3)


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, input_ids, position_ids=None, document_ids=None, attention_mask=None, labels=None):
        self.inputs.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, *(() if labels is not None else (VOCAB,)))


@pytest.mark.parametrize("block", [0, 4])
def test_cfg_training_masks_whole_prompt(block):
    b, l, p, prob = 2000, 12, 5, 0.3
    batch = _batch(b, l, prompt_len=p, seed=8)
    model = Recorder()
    cfg = ObjectiveConfig(name="sft", cfg_prob=prob, block_length=block)
    compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK, generator=torch.Generator().manual_seed(0))
    seen = model.inputs[0]
    halves = [seen[:, :l]] + ([seen[:, l:]] if block else [])
    dropped = (halves[0][:, :p] == MASK).all(1)
    for h in halves:
        # each row's prompt is either wholly masked or wholly intact, in the noisy and the clean half
        assert torch.equal(h[dropped, :p], torch.full_like(h[dropped, :p], MASK))
        assert torch.equal(h[~dropped, :p], batch["input_ids"][~dropped, :p])
    if block:
        assert torch.equal(halves[1][:, p:], batch["input_ids"][:, p:])  # the clean answer is intact
    assert float(dropped.float().mean()) == pytest.approx(prob, abs=0.04)


def test_cfg_prompt_carries_no_loss():
    model = tiny_model(seed=5)
    batch = _batch(4, 12, prompt_len=5, seed=9)
    cfg = ObjectiveConfig(name="sft", cfg_prob=0.5, block_length=4)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base, _ = compute_loss(model, batch, cfg, causal=False, mask_token_id=MASK, generator=gen())

    def wrapped(*a, labels, **k):  # logits bumped at the prompt positions, then the per-token CE
        logits = _bump_prompt(model(*a, **k), 5, 12)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")

    other, _ = compute_loss(wrapped, batch, cfg, causal=False, mask_token_id=MASK, generator=gen())
    assert base.item() == pytest.approx(other.item(), rel=1e-6)


def _bump_prompt(logits, p, l):
    logits = logits.clone()
    logits[:, :p] += 30.0 * torch.randn_like(logits[:, :p])
    logits[:, l:l + p] += 30.0 * torch.randn_like(logits[:, l:l + p])
    return logits


def test_num_transfer_tokens():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert num_transfer_tokens(3, 5) == [1, 1, 1]
    assert num_transfer_tokens(0, 3) == []


def test_cached_block_logits_match_training_mask():
    """One block's logits from the KV cache == the noisy half of the 2L training forward."""
    model = tiny_model(seed=6)
    x = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(2))
    x[:, 9:] = MASK
    pos = torch.arange(12).expand(2, 12)
    ref = ba.block_diffusion_logits(model, x, x, pos, None, 4)
    cache = KVCache(2, 2, 2, 12, 16, torch.float32, "cpu")
    for k in range(2):
        cached_block_logits(model, x[:, 4 * k:4 * k + 4], pos[:, 4 * k:4 * k + 4], cache, append=True)
    out = cached_block_logits(model, x[:, 8:], pos[:, 8:], cache)
    assert torch.allclose(out, ref[:, 8:], atol=1e-5)


@pytest.mark.parametrize("prompt_len,gen_length,block_length,steps", [(5, 11, 4, 2), (8, 10, 4, 4), (3, 9, 5, 3)])
def test_kv_cached_decoding_equals_uncached(prompt_len, gen_length, block_length, steps):
    model = tiny_model(seed=7, dtype=torch.float64, init_std=0.3, qk_norm=True)
    prompt = torch.randint(0, MASK, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    a = generate_blocks(model, prompt, gen_length, block_length, steps, MASK, use_cache=True)
    b = generate_blocks(model, prompt, gen_length, block_length, steps, MASK, use_cache=False)
    assert a.shape == (2, prompt_len + gen_length)
    assert torch.equal(a[:, :prompt_len], prompt)
    assert not bool((a == MASK).any())
    assert torch.equal(a, b)
    # sampling with temperature: same generator seed -> same tokens
    c = generate_blocks(model, prompt, gen_length, block_length, steps, MASK, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    d = generate_blocks(model, prompt, gen_length, block_length, steps, MASK, temperature=1.0, use_cache=False,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, d)


def test_llada2_recipes_load():
    import os

    from llada_scale.training.config import config_from_dict, load_config

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    ar = load_config(os.path.join(root, "ar_pretrain_tiny.yaml"))  # stage 1 is the main job's AR run
    wsd = load_config(os.path.join(root, "llada2_wsd_diffusion_tiny.yaml"))
    sft = load_config(os.path.join(root, "llada2_bd_sft_tiny.yaml"))
    assert ar.model.causal and ar.objective.name == "ar"
    assert not wsd.model.causal and wsd.objective.block_diffusion
    assert wsd.train.init_from.endswith(ar.run_name) and sft.train.init_from.endswith(wsd.run_name)
    got = [wsd.objective.block_length_at(s) for s in (0, 15, 30, 45, 60, 239, 240, 270, wsd.train.max_steps)]
    assert got == [1, 4, 32, 64, bd.FULL_LENGTH, bd.FULL_LENGTH, 64, 32, 32]
    assert sft.objective.name == "sft" and sft.objective.block_length_at(0) == 32 == got[-1]
    for cfg in (ar, wsd, sft):
        assert cfg.model_preset == "tiny" and cfg.data.seq_len == (160 if cfg is sft else 256)
        assert config_from_dict(cfg.to_dict()).objective == cfg.objective


@pytest.mark.parametrize("block_length", [None, 4])
def test_random_length_cut_equals_sliced_batch(block_length):
    """A cut batch keeps its shape [B, L] (tail = its own document, no noise, no loss) and its loss equals the
    loss of the batch sliced to l' as GUIDELINES.md computes it: sum of CE/t over masked tokens / (B x l')."""
    b, l, eps = 2, 24, 1e-3
    doc = torch.tensor([[0] * 9 + [1] * 15, [3] * 24])
    batch = _batch(b, l, seed=3)
    batch["document_ids"], batch["position_ids"] = doc, positions_from_docs(doc)
    model = tiny_model(seed=4)
    seen = []
    record = lambda *a, **k: (seen.append(a[0].shape), model(*a, **k))[1]  # noqa: E731
    cfg = ObjectiveConfig(random_length_prob=1.0, block_length=block_length or 0)
    loss, stats = compute_loss(record, batch, cfg, causal=False, mask_token_id=MASK,
                               generator=torch.Generator().manual_seed(11))
    assert seen == [(b, l if block_length is None else 2 * l)]  # static shape
    # replay the documented draws: rand(1) and randint for the cut, then the times, then rand(B, L) for masks
    g = torch.Generator().manual_seed(11)
    torch.rand(1, generator=g)
    cut = int(torch.randint(1, l + 1, (1,), generator=g))
    assert 9 < cut < l  # the seed cuts inside the second document of row 0
    if block_length is None:
        t = ((1 - eps) * torch.rand(b, generator=g) + eps)[:, None].expand(b, l)
    else:  # one t per block of the *uncut* layout (the tail's blocks draw too, then go unused)
        tail_doc = torch.where(torch.arange(l) < cut, doc, -1)
        t = bd.sample_block_times(ba.block_ids(batch["position_ids"], tail_doc, block_length), eps, g)
    masked = torch.rand(b, l, generator=g)[:, :cut] < t[:, :cut]
    ids, pos, d = (batch[k][:, :cut] for k in ("input_ids", "position_ids", "document_ids"))
    noisy = torch.where(masked, MASK, ids)
    if block_length is None:
        logits = model(noisy, position_ids=pos, document_ids=d)
    else:
        logits = ba.block_diffusion_logits(model, noisy, ids, pos, d, block_length)
    ce = torch.nn.functional.cross_entropy(logits[masked], ids[masked], reduction="none")
    expected = (ce / t[:, :cut][masked]).sum() / (b * cut)
    assert masked.any()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(stats["t_bucket_count"].sum()) == int(masked.sum())
