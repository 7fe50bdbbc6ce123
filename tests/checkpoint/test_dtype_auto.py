"""Converters keep the source's dtype unless told otherwise (``--dtype auto``, as transformers'
``torch_dtype="auto"``): an fp32 source comes out bit-identical, a bf16 source stays bf16, a source mixing dtypes
becomes fp32 (every bf16/fp16 value is exact in fp32), an explicit ``--dtype`` still casts, and the line each
converter prints names the dtype written and where it came from. Covers import-hf (safetensors and
``pytorch_model.bin``), import-llada, import-nano-llada (``.pt``), export-hf, export-llada and ar-to-diffusion;
consolidate and merge-lora share ``write_consolidated`` (consolidate's default is checked on a real ZeRO-3
checkpoint in test_convert.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llada_scale.checkpoint as cio  # noqa: E402
from llada_scale.checkpoint.files import read_safetensors, resolve_dtype, safetensors_files  # noqa: E402
from llada_scale.checkpoint.llada import llada_to_ours  # noqa: E402
from llada_scale.model.transformer import Transformer  # noqa: E402
from tests.checkpoint.test_convert import convert, tiny_cfg  # noqa: E402
from tiny_models import llada_config, llada_state, make_tokenizer, save_sharded  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32


def stored(out: Path) -> dict[str, torch.Tensor]:
    """The tensors of a written directory exactly as stored (dtype included)."""
    sd, _ = read_safetensors(safetensors_files(str(out)), progress=False)
    return sd


def last_line(capsys) -> str:
    """The converter's summary line (the one naming the dtype); the very last line names the output directory."""
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("output: "), lines
    return lines[-2]


def test_resolve_dtype_rule():
    assert resolve_dtype("auto", [FP32, FP32]) == (FP32, "fp32 (source dtype; --dtype auto)")
    assert resolve_dtype(None, [BF16, torch.int64]) == (BF16, "bf16 (source dtype; --dtype auto)")
    assert resolve_dtype("auto", ["fp16"]) == (torch.float16, "fp16 (source dtype; --dtype auto)")
    assert resolve_dtype("auto", [BF16, FP32]) == (FP32, "fp32 (source mixes bf16+fp32: the widest, nothing "
                                                         "rounded; --dtype auto)")
    assert resolve_dtype("auto", [torch.float64]) == (FP32, "fp32 (source fp64: fp64 rounded to fp32, the widest "
                                                            "dtype written; --dtype auto)")
    assert resolve_dtype("auto", []) == (FP32, "fp32 (no floating tensors in the source; --dtype auto)")
    assert resolve_dtype("bf16", [FP32]) == (BF16, "bf16 (--dtype bf16; source fp32)")
    with pytest.raises(cio.CheckpointError, match="unknown dtype"):
        resolve_dtype("fp8", [FP32])


def _llada_fp32_dir(out: Path) -> dict:
    """A LLaDA-format directory stored in fp32 (the released LLaDA-8B is bf16). Returns the state dict saved."""
    out.mkdir(parents=True)
    specials = make_tokenizer(out)
    cfg = llada_config(mask_token_id=specials["<|mdm_mask|>"], eos_token_id=specials["<|endoftext|>"],
                       pad_token_id=specials["<|endoftext|>"])
    (out / "config.json").write_text(json.dumps(cfg))
    sd = llada_state(cfg, 0)
    save_sharded(sd, out, 2, dtype=FP32)
    return {llada_to_ours(k): v for k, v in sd.items()}


def test_import_llada_keeps_fp32_and_bf16_still_rounds(tmp_path, capsys):
    src = _llada_fp32_dir(tmp_path / "llada")
    assert convert("import-llada", tmp_path / "llada", tmp_path / "auto", "--quiet") == 0
    assert "dtype fp32 (source dtype; --dtype auto)" in last_line(capsys)
    got = stored(tmp_path / "auto")
    assert got.keys() == src.keys() and all(torch.equal(got[k], v) for k, v in src.items())  # bit-identical
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "fp32"

    assert convert("import-llada", tmp_path / "llada", tmp_path / "bf16", "--dtype", "bf16", "--quiet") == 0
    assert "dtype bf16 (--dtype bf16; source fp32)" in last_line(capsys)
    rounded = stored(tmp_path / "bf16")
    assert all(rounded[k].dtype == BF16 and torch.equal(rounded[k], v.to(BF16)) for k, v in src.items())
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = cio.build_model_from_checkpoint(tmp_path / "auto", progress=False)(x)
        lossy = cio.build_model_from_checkpoint(tmp_path / "bf16", progress=False)(x)
    assert (exact - lossy).abs().max() > 1e-3  # what the old bf16 default did to an fp32 source


def test_import_hf_safetensors_bin_bf16_and_mixed(tmp_path, capsys):
    from tests.checkpoint.test_import_hf import make_hf

    hf = make_hf(tmp_path / "st", "mistral")  # untied: every tensor is written
    want = hf.state_dict()
    for fmt in ("st", "bin"):
        if fmt == "bin":  # the same weights as one pytorch_model.bin
            (tmp_path / "bin").mkdir()
            shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
            torch.save(want, tmp_path / "bin" / "pytorch_model.bin")
        assert convert("import-hf", tmp_path / fmt, tmp_path / f"{fmt}-ours", "--quiet") == 0
        assert "dtype fp32 (source dtype; --dtype auto)" in last_line(capsys)
        got = stored(tmp_path / f"{fmt}-ours")
        assert got.keys() <= want.keys() and len(got) == len(want) - ("model.rotary_emb.inv_freq" in want)
        assert all(torch.equal(v, want[k]) for k, v in got.items()), fmt

    # a bf16 source stays bf16 (no doubling of the files); a bf16 + fp32 mix becomes fp32, every value exact
    from safetensors.torch import save_file

    for name, cast in (("bf16", lambda k: BF16), ("mixed", lambda k: FP32 if "norm" in k else BF16)):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "st" / "config.json", tmp_path / name)
        src = {k: v.to(cast(k)).contiguous() for k, v in want.items()}
        save_file(src, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        assert convert("import-hf", tmp_path / name, tmp_path / f"{name}-ours", "--quiet") == 0
        line, got = last_line(capsys), stored(tmp_path / f"{name}-ours")
        expect = BF16 if name == "bf16" else FP32
        assert all(v.dtype == expect and torch.equal(v.float(), src[k].float()) for k, v in got.items()), name
        assert line.endswith("dtype bf16 (source dtype; --dtype auto)" if name == "bf16" else
                             "dtype fp32 (source mixes bf16+fp32: the widest, nothing rounded; --dtype auto)"), line


def test_import_nano_llada_pt_keeps_dtype(tmp_path, capsys):
    from tests.checkpoint.test_nano_llada import BARE_FLAGS, _nano_state

    sd = _nano_state(torch.Generator().manual_seed(0))
    flags = ("--num_heads", 4, *BARE_FLAGS, "--causal", "false", "--quiet")
    for dt in (FP32, BF16):
        name = str(dt).split(".")[1]
        pt = tmp_path / f"{name}.pt"
        torch.save({k: v.to(dt) for k, v in sd.items()}, pt)
        assert convert("import-nano-llada", pt, tmp_path / name, *flags) == 0
        assert last_line(capsys).endswith(f"dtype {'fp32' if dt == FP32 else 'bf16'} (source dtype; --dtype auto)")
        got = stored(tmp_path / name)
        assert all(v.dtype == dt for v in got.values())
        # every weight but the embedding (folded with Nano-LLaDA's embedding RMSNorm, computed in fp64) is the
        # source tensor itself
        assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], sd["blocks.1.mlp.down_proj.weight"].to(dt))
        assert torch.equal(got["lm_head.weight"], sd["lm_head.weight"].to(dt))
    assert convert("import-nano-llada", tmp_path / "float32.pt", tmp_path / "explicit", "--dtype", "fp32",
                   *flags) == 0
    explicit = stored(tmp_path / "explicit")
    assert all(torch.equal(v, explicit[k]) for k, v in stored(tmp_path / "float32").items())


def test_exports_and_ar_to_diffusion_keep_dtype(tmp_path, capsys):
    """export-hf / export-llada of an fp32 model write fp32 (torch_dtype float32) and import back bit-identical
    with defaults; ar-to-diffusion of a bf16 model writes bf16."""
    torch.manual_seed(0)
    ours = Transformer(tiny_cfg(causal=False, mask_token_id=95)).eval()
    sd = ours.state_dict()
    src = tmp_path / "src"
    cio.save_safetensors(sd, str(src), {"format": "llada_scale", "model": ours.config.to_dict(), "tokenizer": None},
                         dtype="fp32", progress=False)
    for cmd, importer in (("export-hf", "import-hf"), ("export-llada", "import-llada")):
        out = tmp_path / cmd
        assert convert(cmd, src, out, "--quiet") == 0
        assert "dtype fp32 (source dtype; --dtype auto)" in last_line(capsys)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
        assert convert(importer, out, tmp_path / f"{cmd}-back", "--quiet") == 0
        back = stored(tmp_path / f"{cmd}-back")
        assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items()), cmd

    ar = Transformer(tiny_cfg()).eval()
    bf = tmp_path / "ar-bf16"
    cio.save_safetensors(ar.state_dict(), str(bf), {"format": "llada_scale", "model": ar.config.to_dict(),
                                                    "tokenizer": None}, dtype="bf16", progress=False)
    assert convert("ar-to-diffusion", bf, tmp_path / "a2d", "--mask_token_id", 95, "--quiet") == 0
    assert "dtype bf16 (source dtype; --dtype auto)" in capsys.readouterr().out
    a2d = stored(tmp_path / "a2d")
    assert all(v.dtype == BF16 for v in a2d.values())
    assert torch.equal(a2d["model.layers.0.self_attn.q_proj.weight"], ar.state_dict()[
        "model.layers.0.self_attn.q_proj.weight"].to(BF16))
