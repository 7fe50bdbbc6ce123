"""Every eval task runs end to end on --limit 3 with tiny random models and writes JSON; data-parallel
sharding gives the same numbers as one process; helpers parse GSM8K answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import llada_scale.checkpoint as cio  # noqa: E402
from llada_scale.eval.tasks import TASKS, extract_gsm8k_answer, normalize_number  # noqa: E402
from llada_scale.model.transformer import ModelConfig, Transformer  # noqa: E402


DATA = Path(os.environ.get("LLADA_DATA", REPO.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "eval").is_dir() or not (DATA / "tokenizer" / "minimind").is_dir(),
                                reason="shared eval data not available")
SMALL = ["--limit", "3", "--batch_size", "2", "--mc_samples", "8", "--gen_length", "16", "--block_length", "8",
         "--steps", "8", "--poem_gen_length", "8", "--chunk_len", "32", "--no_progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from llada_scale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(DATA / "tokenizer" / "minimind"))
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, causal in (("ar", True), ("dm", False)):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.padded_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, max_seq_len=512, causal=causal,
                          mask_token_id=None if causal else tok.mask_token_id)
        cio.save_safetensors(Transformer(cfg).state_dict(), str(root / name),
                             {"format": "llada_scale", "model": cfg.to_dict(), "tokenizer": tok.identity()},
                             dtype="fp32", progress=False)
        out[name] = root / name
    return out


def evaluate(*argv) -> int:
    import eval_diffusion

    return eval_diffusion.main([str(a) for a in argv])


def test_all_tasks_limit3_compare_writes_json(models, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert evaluate("--checkpoint", models["dm"], "--compare", models["ar"], "--output", out, *SMALL) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | diffusion | ar |" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]) == set(TASKS)
    for task in TASKS:
        for name in ("diffusion", "ar"):
            m = res["results"][task][name]
            assert m["n"] == 3 and m["tokens_per_s"] > 0, (task, name, m)
            assert len(res["records"][task][name]) == 3
    assert "ppl_bound" in res["results"]["wikitext2"]["diffusion"] and "ppl" in res["results"]["wikitext2"]["ar"]
    assert res["settings"]["eval_config"]["mc_samples"] == 8 and res["settings"]["limit"] == 3
    assert res["models"]["diffusion"]["model_config"]["causal"] is False


@pytest.mark.parametrize("task", TASKS)
def test_each_task_diffusion_threshold(models, tmp_path, task):
    out = tmp_path / f"{task}.json"
    assert evaluate("--checkpoint", models["dm"], "--tasks", task, "--threshold", "0.5", "--output", out, *SMALL) == 0
    res = json.loads(out.read_text())
    assert res["results"][task]["diffusion"]["n"] == 3


def test_watch_mode(models, capsys):
    assert evaluate("--checkpoint", models["dm"], "--watch", "--prompt", "hello", "--gen_length", "8",
                    "--block_length", "8", "--steps", "4", "--mask_symbol", "#") == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[step")]
    assert len(lines) == 4 and "#" in lines[0] and "final" not in lines[-1]


def test_bad_arguments(models, capsys):
    assert evaluate("--checkpoint", models["dm"], "--tasks", "nope") == 2
    assert capsys.readouterr().err.startswith("error: unknown task")
    assert evaluate("--checkpoint", models["dm"], "--gen_length", "10", "--block_length", "4") == 2
    assert evaluate("--checkpoint", models["ar"], "--watch") == 2
    assert "AR model" in capsys.readouterr().err


def test_limit_lengths_and_new_knobs(models, tmp_path, capsys):
    """--limit -3 is refused (it used to mean 'all'); sequences beyond max_seq_len (512 here) are refused before
    any work unless --allow_extrapolation; --cache and --repetition_penalty reach the sampler and the JSON."""
    assert evaluate("--checkpoint", models["dm"], "--tasks", "piqa", "--limit", "-3") == 2
    assert "--limit must be >= 0" in capsys.readouterr().err
    long = ["--tasks", "gsm8k", "--limit", "1", "--gen_length", "512", "--block_length", "512", "--steps", "8",
            "--no_progress"]
    assert evaluate("--checkpoint", models["dm"], *long) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gsm8k: sequences of up to") and "max_seq_len 512" in err and "--allow_extrapolation" in err
    assert len(err.strip().splitlines()) == 1
    assert evaluate("--checkpoint", models["ar"], *long[:-3], "--gen_length", "8", "--steps", "8", "--block_length",
                    "8", "--no_progress") == 0  # fits
    out = tmp_path / "x.json"
    assert evaluate("--checkpoint", models["dm"], "--tasks", "gsm8k,piqa", "--cache", "dual", "--threshold", "0.5",
                    "--repetition_penalty", "1.3", "--output", out, *SMALL) == 0
    s = json.loads(out.read_text())["settings"]
    assert s["eval_config"]["cache"] == "dual" and s["eval_config"]["repetition_penalty"] == 1.3
    assert (s["likelihood"], s["likelihood_source"]) == ("full", "checkpoint")


def test_gsm8k_answer_extraction():
    assert extract_gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_gsm8k_answer("The answer is $1,234.00.") == "1234"
    assert extract_gsm8k_answer("no number") is None
    assert extract_gsm8k_answer("first 3 then -2.5") == "-2.5"
    assert normalize_number(" 18 ") == "18"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_data_parallel_matches_single_process(models, tmp_path):
    args = ["--checkpoint", str(models["dm"]), "--tasks", "wikitext2,piqa,lambada", *SMALL[:-1], "--limit", "5"]
    single = tmp_path / "single.json"
    assert evaluate(*args, "--output", single, "--no_progress") == 0
    port = _free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tools" / "eval_diffusion.py"), *args, "--output",
                                       str(tmp_path / "dp.json"), "--no_progress"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out[-2000:]
    a = json.loads(single.read_text())
    b = json.loads((tmp_path / "dp.json").read_text())
    assert b["settings"]["world_size"] == 2
    for task in ("wikitext2", "piqa", "lambada"):
        ra, rb = a["records"][task]["diffusion"], b["records"][task]["diffusion"]
        assert [r["index"] for r in rb] == list(range(5))
        for x, y in zip(ra, rb):
            for k in x:
                if isinstance(x[k], float):
                    assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-4)
                elif k != "loglik":
                    assert x[k] == y[k]
