"""Nano-LLaDA / minimind import (llada_scale/checkpoint/nano_llada.py) against reference forwards written from
those repos' model code: shapes from the tensors; head count, RoPE base, norm eps, activation, YaRN and causal vs
bidirectional from the ``args`` Nano-LLaDA saves, else required flags; flags contradicting the record refused."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import llada_scale.checkpoint as cio  # noqa: E402
from tests.checkpoint.test_convert import convert  # noqa: E402
from llada_scale.checkpoint.nano_llada import nano_sft_heads  # noqa: E402
from llada_scale.testing import assert_close_to_scale  # noqa: E402

# what a state dict without Nano-LLaDA's args needs besides --num_heads (and --causal for the Nano-LLaDA layout)
BARE_FLAGS = ("--rope_theta", 1e6, "--norm_eps", 1e-5, "--hidden_act", "silu", "--rope_scaling", "none")
# the args Nano-LLaDA's scripts/train/diffusion.py saves (the keys the importer reads, plus its diffusion markers)
DIFFUSION_ARGS = {"num_attention_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                  "inference_rope_scaling": False, "max_position_embeddings": 32768, "seq_len": 256,
                  "iid_mask_eps": 1e-3, "mask_schedule": "iid_t", "init_from_minimind": None, "learning_rate": 3e-4}
# ... and its AR trainer scripts/train/train_pretrain.py (same tensor names, no diffusion arguments)
AR_ARGS = {"num_attention_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "inference_rope_scaling": False, "max_position_embeddings": 32768, "max_seq_len": 256, "lr": 3e-4,
           "mask_token": "<|mask|>", "target_vocab_size": 6400, "load_from": None}


# ---------------------------------------------------------------------------------------------- Nano-LLaDA
# the rope_scaling dict both repos build for --inference-rope-scaling
SOURCE_YARN = {"original_max_position_embeddings": 2048, "factor": 16, "beta_fast": 32.0, "beta_slow": 1.0,
               "attention_factor": 1.0, "type": "yarn"}


def _rope_table(dim, end, theta, rope_scaling=None):
    """cos/sin [end, dim] the way minimind / Nano-LLaDA precompute theirs: YaRN only when the table (``end``
    rows) is longer than original_max_position_embeddings, ramp over index d with the high bound clamped to
    dim/2 - 1, cos and sin multiplied by attention_factor."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    scale = 1.0
    if rope_scaling is not None:
        orig, s = rope_scaling["original_max_position_embeddings"], rope_scaling["factor"]
        scale = rope_scaling["attention_factor"]
        if end > orig:
            def at(rot):
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

            lo = max(math.floor(at(rope_scaling["beta_fast"])), 0)
            hi = min(math.ceil(at(rope_scaling["beta_slow"])), dim // 2 - 1)
            w = ((torch.arange(dim // 2).float() - lo) / max(hi - lo, 0.001)).clamp(0, 1)
            inv = inv * (1 - w + w / s)
    ang = torch.outer(torch.arange(end), inv).float()
    return torch.cat([ang.cos(), ang.cos()], -1) * scale, torch.cat([ang.sin(), ang.sin()], -1) * scale


def _rope(x, pos, theta, rope_scaling=None, end=32768):
    d = x.shape[-1]
    cos, sin = _rope_table(d, end, theta, rope_scaling)
    cos, sin = cos[pos], sin[pos]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos[None, :, None] + torch.cat([-x2, x1], -1) * sin[None, :, None]


def nano_llada_reference(sd, x, n_head, eps=1e-5, theta=1e6, rope_scaling=None, end=32768, causal=False):
    """Forward of Nano-LLaDA's diffusion ``Model`` (scripts/train/diffusion.py structure; with ``causal`` its AR
    ``MiniMindForCausalLM``, core/model_minimind.py, which differs only in ``is_causal``): norm = weightless
    F.rms_norm; embedding -> norm -> blocks(x + attn(norm x); x + mlp(norm x)) -> norm -> lm_head; attention:
    c_q/c_k/c_v, RoPE (table of ``end`` rows, optional YaRN) then QK norm, SDPA, c_proj."""
    norm = lambda t: F.rms_norm(t, (t.shape[-1],), eps=eps)  # noqa: E731
    h = norm(F.embedding(x, sd["token_emb.weight"]))
    b, t, d = h.shape
    hd = d // n_head
    pos = torch.arange(t)
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_layer):
        p = f"blocks.{i}."
        a = norm(h)
        q = (a @ sd[p + "attn.c_q.weight"].T).view(b, t, n_head, hd)
        k = (a @ sd[p + "attn.c_k.weight"].T).view(b, t, n_head, hd)
        v = (a @ sd[p + "attn.c_v.weight"].T).view(b, t, n_head, hd)
        q, k = _rope(q, pos, theta, rope_scaling, end), _rope(k, pos, theta, rope_scaling, end)
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        h = h + y.transpose(1, 2).reshape(b, t, d) @ sd[p + "attn.c_proj.weight"].T
        m = norm(h)
        h = h + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    return norm(h) @ sd["lm_head.weight"].T


def minimind_reference(sd, x, n_head, n_kv, eps=1e-5, theta=1e6, rope_scaling=None, end=32768):
    """Forward of minimind's MiniMindForCausalLM (model_minimind.py): weighted RMSNorm, q_norm/k_norm before
    RoPE (table of ``end`` = max_position_embeddings rows, optional YaRN), GQA, causal, tied head."""
    def rms(t, w):
        return w * (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + eps))

    h = F.embedding(x, sd["model.embed_tokens.weight"])
    b, t, d = h.shape
    hd = d // n_head
    pos = torch.arange(t)
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
    for i in range(n_layer):
        p = f"model.layers.{i}."
        a = rms(h, sd[p + "input_layernorm.weight"])
        q = (a @ sd[p + "self_attn.q_proj.weight"].T).view(b, t, n_head, hd)
        k = (a @ sd[p + "self_attn.k_proj.weight"].T).view(b, t, n_kv, hd)
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(b, t, n_kv, hd)
        q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = _rope(q, pos, theta, rope_scaling, end), _rope(k, pos, theta, rope_scaling, end)
        rep = n_head // n_kv
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + y.transpose(1, 2).reshape(b, t, d) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def _nano_state(g, d=64, ff=192, vocab=6401):
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"token_emb.weight": r(vocab, d), "lm_head.weight": r(vocab, d)}
    for i in range(2):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            sd[f"blocks.{i}.attn.{name}.weight"] = r(d, d)
        sd[f"blocks.{i}.mlp.gate_proj.weight"] = r(ff, d)
        sd[f"blocks.{i}.mlp.up_proj.weight"] = r(ff, d)
        sd[f"blocks.{i}.mlp.down_proj.weight"] = r(d, ff)
    return sd


def test_import_nano_llada_matches_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    vocab, n_head = 6401, 4
    sd = _nano_state(g)
    pt = tmp_path / "diffusion.pt"
    torch.save({"model_state_dict": {"_orig_mod." + k: v for k, v in sd.items()}, "step": 5}, pt)
    assert convert("import-nano-llada", pt, tmp_path / "out", "--num_heads", n_head, *BARE_FLAGS, "--causal", "false",
                   "--quiet") == 0
    model = cio.build_model_from_checkpoint(tmp_path / "out", progress=False)
    c = model.config
    assert (c.qk_norm, c.norm_weight, c.causal, c.mask_token_id, c.num_kv_heads) == (True, False, False, 6400, 4)
    x = torch.randint(0, vocab, (2, 20), generator=g)
    with torch.no_grad():
        assert_close_to_scale(model(x), nano_llada_reference(sd, x, n_head))


def test_import_nano_llada_yarn_matches_reference(tmp_path):
    """--inference-rope-scaling recorded in the checkpoint's args -> YaRN with the repos' fixed parameters; the
    import matches their forward (theta 100 puts the ramp's upper bound on minimind's head_dim/2 - 1 clamp)."""
    g = torch.Generator().manual_seed(3)
    vocab, n_head = 6401, 4
    sd = _nano_state(g)
    x = torch.randint(0, vocab, (2, 48), generator=g)
    pt = tmp_path / "diffusion.pt"
    args = {**DIFFUSION_ARGS, "inference_rope_scaling": True, "max_position_embeddings": 32768, "seq_len": 256,
            "rope_theta": 100.0}
    torch.save({"model_state_dict": sd, "step": 5, "args": args}, pt)
    assert convert("import-nano-llada", pt, tmp_path / "out", "--num_heads", n_head, "--rope_theta", 100,
                   "--quiet") == 0
    model = cio.build_model_from_checkpoint(tmp_path / "out", progress=False)
    assert model.config.rope_scaling == {**SOURCE_YARN, "factor": 16.0}
    ref = nano_llada_reference(sd, x, n_head, theta=100.0, rope_scaling=SOURCE_YARN)
    with torch.no_grad():
        got = model(x)
    assert_close_to_scale(got, ref)
    assert not torch.allclose(got, nano_llada_reference(sd, x, n_head, theta=100.0), atol=1e-3)
    # explicit flags give the same; a source table no longer than original_max_position_embeddings = plain RoPE
    torch.save({"model_state_dict": sd}, tmp_path / "bare.pt")
    assert convert("import-nano-llada", tmp_path / "bare.pt", tmp_path / "out2", "--num_heads", n_head,
                   "--rope_theta", 100, "--norm_eps", 1e-5, "--hidden_act", "silu", "--causal", "false",
                   "--rope_scaling", "yarn", "--rope_factor", 16, "--max_seq_len", 256,
                   "--original_max_position_embeddings", 2048, "--quiet") == 0
    assert cio.build_model_from_checkpoint(tmp_path / "out2", progress=False).config == model.config
    torch.save({"model_state_dict": sd, "args": {**args, "max_position_embeddings": 1024, "seq_len": 512}},
               tmp_path / "short.pt")
    assert convert("import-nano-llada", tmp_path / "short.pt", tmp_path / "out3", "--num_heads", n_head,
                   "--rope_theta", 100, "--quiet") == 0
    short = cio.build_model_from_checkpoint(tmp_path / "out3", progress=False)
    assert short.config.rope_scaling is None
    with torch.no_grad():
        assert_close_to_scale(short(x), nano_llada_reference(sd, x, n_head, theta=100.0, rope_scaling=SOURCE_YARN,
                                                             end=1024))


def test_import_minimind_matches_reference(tmp_path):
    g = torch.Generator().manual_seed(1)
    d, ff, vocab, n_head, n_kv, hd = 64, 192, 400, 4, 2, 16
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    emb = r(vocab, d)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": 1 + r(d)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(n_head * hd, d), p + "self_attn.k_proj.weight": r(n_kv * hd, d),
               p + "self_attn.v_proj.weight": r(n_kv * hd, d), p + "self_attn.o_proj.weight": r(d, n_head * hd),
               p + "self_attn.q_norm.weight": 1 + r(hd), p + "self_attn.k_norm.weight": 1 + r(hd),
               p + "mlp.gate_proj.weight": r(ff, d), p + "mlp.up_proj.weight": r(ff, d),
               p + "mlp.down_proj.weight": r(d, ff), p + "input_layernorm.weight": 1 + r(d),
               p + "post_attention_layernorm.weight": 1 + r(d)}
    pt = tmp_path / "minimind.pt"
    torch.save(sd, pt)
    assert convert("import-nano-llada", pt, tmp_path / "out", *BARE_FLAGS, "--quiet") == 0  # heads: from q_norm
    model = cio.build_model_from_checkpoint(tmp_path / "out", progress=False)
    c = model.config
    assert (c.qk_norm, c.tie_embeddings, c.causal, c.num_heads, c.num_kv_heads) == (True, True, True, 4, 2)
    x = torch.randint(0, vocab, (2, 20), generator=g)
    with torch.no_grad():
        assert_close_to_scale(model(x), minimind_reference(sd, x, n_head, n_kv))
    # minimind with inference_rope_scaling (its .pt records no args: explicit flags), attention_factor != 1
    yarn = {**SOURCE_YARN, "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.5}
    assert convert("import-nano-llada", pt, tmp_path / "yarn", "--rope_scaling", "yarn", "--rope_factor", 4,
                   "--original_max_position_embeddings", 256, "--rope_attention_factor", 1.5, "--rope_theta", 1000,
                   "--norm_eps", 1e-5, "--hidden_act", "silu", "--quiet") == 0
    model = cio.build_model_from_checkpoint(tmp_path / "yarn", progress=False)
    assert model.config.rope_scaling == yarn
    x = torch.randint(0, vocab, (2, 40), generator=g)
    with torch.no_grad():
        ref = minimind_reference(sd, x, n_head, n_kv, theta=1000.0, rope_scaling=yarn)
        assert_close_to_scale(model(x), ref)


def test_import_nano_errors(tmp_path, capsys):
    pt = tmp_path / "bad.pt"
    torch.save({"foo.weight": torch.zeros(2, 2)}, pt)
    assert convert("import-nano-llada", pt, tmp_path / "o") == 2
    assert "unrecognised state dict layout" in capsys.readouterr().err
    assert convert("import-nano-llada", pt, tmp_path / "o2", "--rope_scaling", "yarn", "--arch", "nano-llada",
                   "--rope_attention_factor", "1.5", "--num_heads", 2, "--rope_theta", 1e6, "--norm_eps", 1e-5,
                   "--hidden_act", "silu", "--causal", "false") == 2
    assert "--rope_attention_factor" in capsys.readouterr().err


def _import(tmp_path, name, obj, *flags):
    pt = tmp_path / f"{name}.pt"
    torch.save(obj, pt)
    code = convert("import-nano-llada", pt, tmp_path / name, "--quiet", *flags)
    return code, (cio.build_model_from_checkpoint(tmp_path / name, progress=False) if code == 0 else None)


def test_recorded_args_fix_heads_theta_eps(tmp_path, capsys):
    """Heads, rope_theta and eps come from the saved args (values far from the old defaults, so a guess would
    show); a contradicting flag is refused naming both values; a bare state dict needs the flags."""
    g = torch.Generator().manual_seed(5)
    sd = _nano_state(g)
    x = torch.randint(0, 6401, (2, 24), generator=g)
    args = {**DIFFUSION_ARGS, "num_attention_heads": 2, "rope_theta": 50.0, "rms_norm_eps": 0.5}
    code, model = _import(tmp_path, "rec", {"model_state_dict": sd, "args": args})
    assert code == 0, capsys.readouterr().err
    c = model.config
    assert (c.num_heads, c.rope_theta, c.norm_eps, c.causal, c.max_seq_len) == (2, 50.0, 0.5, False, 256)
    with torch.no_grad():
        got = model(x)
        assert_close_to_scale(got, nano_llada_reference(sd, x, 2, eps=0.5, theta=50.0))
        assert (got - nano_llada_reference(sd, x, 8)).abs().max() > 0.1  # what the old defaults gave
    capsys.readouterr()
    assert _import(tmp_path, "contra", {"model_state_dict": sd, "args": args}, "--num_heads", 8)[0] == 2
    err = capsys.readouterr().err
    assert "--num_heads 8 contradicts" in err and "num_heads=2" in err and "Traceback" not in err
    assert _import(tmp_path, "contra2", {"model_state_dict": sd, "args": args}, "--rope_scaling", "yarn")[0] == 2
    assert "contradicts the checkpoint's recorded inference_rope_scaling=False" in capsys.readouterr().err
    for missing, flags in (("--num_heads", ()), ("--rope_theta", ("--num_heads", 2)),
                           ("--rope_scaling none", ("--num_heads", 2, "--rope_theta", 50, "--norm_eps", 0.5,
                                                    "--hidden_act", "silu", "--causal", "false"))):
        assert _import(tmp_path, f"bare{len(flags)}", {"model_state_dict": sd}, *flags)[0] == 2
        assert f"pass {missing}" in capsys.readouterr().err


def test_nano_ar_checkpoint_imports_causal(tmp_path, capsys):
    """Nano-LLaDA's AR trainer saves the diffusion model's tensor names and a 6401-row vocabulary: its args make
    it a causal model (matching the causal reference, far from the bidirectional one); without args --causal is
    required."""
    g = torch.Generator().manual_seed(6)
    sd = _nano_state(g)
    x = torch.randint(0, 6401, (2, 24), generator=g)
    code, model = _import(tmp_path, "ar", {"model_state_dict": sd, "args": AR_ARGS, "step": 3})
    assert code == 0, capsys.readouterr().err
    assert model.config.causal is True and model.config.max_seq_len == 256
    with torch.no_grad():
        got = model(x)
        assert_close_to_scale(got, nano_llada_reference(sd, x, 4, causal=True))
        assert (got - nano_llada_reference(sd, x, 4)).abs().max() > 0.1
    capsys.readouterr()
    assert _import(tmp_path, "ar_bare", sd, "--num_heads", 4, *BARE_FLAGS)[0] == 2
    assert "pass --causal" in capsys.readouterr().err
    assert _import(tmp_path, "ar_contra", {"model_state_dict": sd, "args": AR_ARGS}, "--causal", "false")[0] == 2
    assert "--causal False contradicts the checkpoint's recorded causal=True" in capsys.readouterr().err


def test_nano_sft_diffusion_head_count(tmp_path):
    """Nano-LLaDA's diffusion SFT started from a checkpoint infers its head count from the hidden size and records
    the unused --num-attention-heads default: the importer uses the inferred count (16 for hidden 512)."""
    assert nano_sft_heads(512) == 16 and nano_sft_heads(64) == 2 and nano_sft_heads(2048) == 16
    g = torch.Generator().manual_seed(7)
    sd = _nano_state(g)
    sft_args = {**DIFFUSION_ARGS, "num_attention_heads": 8, "load_from": "weights/diffusion.pt",
                "final_decay_ratio": 0.1, "max_seq_len": 512}
    del sft_args["seq_len"]
    code, model = _import(tmp_path, "sft", {"model_state_dict": sd, "args": sft_args})
    assert code == 0 and model.config.num_heads == 2 and model.config.max_seq_len == 512
    x = torch.randint(0, 6401, (2, 16), generator=g)
    with torch.no_grad():
        assert_close_to_scale(model(x), nano_llada_reference(sd, x, 2))
