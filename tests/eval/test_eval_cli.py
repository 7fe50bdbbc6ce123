"""``tools/eval_diffusion.py`` over lm-evaluation-harness: every task runs end to end on tiny random checkpoints
side by side and writes JSON; the AR scores equal the task definitions computed another way (direct
log-likelihoods / greedy argmax, as the former in-house evaluator did); the generation prompts are the chat
prompts of that evaluator; block-diffusion checkpoints get their sampler; ``--watch``; bad flags fail in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llada_scale import api  # noqa: E402
from llada_scale.eval import cli, harness  # noqa: E402
from llada_scale.eval.lm_eval_tasks.llada_tasks import first_line, poem_match  # noqa: E402
from llada_scale.sampling import log_likelihood  # noqa: E402

SMALL = ["--batch_size", "2", "--mc_samples", "2", "--gen_length", "8", "--block_length", "8",
         "--poem_gen_length", "8", "--no_progress"]
BLOCK_RUN = {"objective": {"name": "diffusion", "block_length": 4}}


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {"ar": tiny_checkpoint(True), "dm": tiny_checkpoint(False), "bd": tiny_checkpoint(False, 256, BLOCK_RUN)}


def evaluate(*argv) -> int:
    import eval_diffusion  # the thin front end itself

    return eval_diffusion.main([str(a) for a in argv])


def test_checkpoints_side_by_side_all_tasks(ckpts, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert evaluate("--checkpoint", ckpts["dm"], "--compare", ckpts["ar"], "--limit", "2", "--output", out, *SMALL) == 0
    assert "| task | metric | diffusion | ar |" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["results"]) == list(cli.TASKS) and list(res["models"]) == ["diffusion", "ar"]
    expected = {"wikitext2": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
                "lambada": {"acc", "perplexity"}, "piqa": {"acc", "acc_norm"}, "gsm8k": {"acc", "acc_strict"},
                "poem": {"forward_acc", "reversal_acc"}}
    for task, keys in expected.items():
        for name in ("diffusion", "ar"):
            m = res["results"][task][name]
            assert keys <= set(m) and m["n"] == 2 and m["tokens_per_s"] > 0 and m["nfe"] > 0, (task, name, m)
    assert len(res["records"]["piqa"]["ar"]) == 2 and len(res["records"]["poem"]["ar"]["llada_poem_reversal"]) == 2
    assert res["models"]["diffusion"]["model_config"]["causal"] is False
    assert (res["models"]["diffusion"]["sampler"], res["models"]["diffusion"]["likelihood"]) == ("low_confidence", "full")
    assert res["models"]["ar"]["sampler"] is None
    assert res["settings"]["limit"] == 2 and res["settings"]["lm_eval_tasks"]["gsm8k"] == ["llada_gsm8k_chat"]


def test_ar_scores_equal_the_definitions_computed_directly(ckpts, tmp_path):
    """PIQA: log p(" " + sol | "Question: goal\\nAnswer:") by the exact chain rule; LAMBADA: the last word is
    correct iff every argmax after the context matches (the former evaluator's definitions)."""
    from llada_scale.eval.lm_eval_tasks import llada_tasks

    out = tmp_path / "ar.json"
    assert evaluate("--checkpoint", ckpts["ar"], "--tasks", "piqa,lambada", "--limit", "4", "--output", out,
                    *SMALL) == 0
    res = json.loads(out.read_text())
    m = api.load(ckpts["ar"])
    tok = m.tokenizer
    docs = llada_tasks.piqa()["test"]
    for rec in res["records"]["piqa"]["ar"]:
        d = docs[rec["doc_id"]]
        prompt = tok.encode(f"Question: {d['goal']}\nAnswer:")
        direct = [log_likelihood(m.module, prompt, tok.encode(" " + s), causal=True) for s in (d["sol1"], d["sol2"])]
        got = [ll for ll, _ in rec["filtered_resps"]]
        assert got == pytest.approx(direct, rel=1e-5)
        assert rec["acc"] == float(int(direct[1] > direct[0]) == d["label"])
    lines = llada_tasks.lambada()["test"]
    for rec in res["records"]["lambada"]["ar"]:
        context, _, word = lines[rec["doc_id"]]["text"].rpartition(" ")
        ctx, target = tok.encode(context), tok.encode(" " + word)
        with torch.no_grad():
            logits = m.module(torch.tensor([ctx + target]))[0, len(ctx) - 1:-1, :tok.vocab_size]
        assert rec["acc"] == float(logits.argmax(-1).tolist() == target)


def test_generation_prompts_are_the_chat_prompts(ckpts, monkeypatch):
    """gsm8k: the question alone as the user message; poem: the next/previous-line question; both through the
    tokenizer's chat template (``Tokenizer.render_prompt``); --no_chat feeds llada_gsm8k's raw format."""
    from llada_scale.eval.lm_eval_tasks import llada_tasks

    seen = []
    real = harness.LladaScaleLM._generate_ids
    monkeypatch.setattr(harness.LladaScaleLM, "_generate_ids",
                        lambda self, prompts, **kw: (seen.extend(prompts), real(self, prompts, **kw))[1])
    assert evaluate("--checkpoint", ckpts["dm"], "--tasks", "gsm8k,poem", "--limit", "2", *SMALL) == 0
    tok = api.load(ckpts["dm"]).tokenizer
    gsm = llada_tasks.gsm8k()["test"]
    poem = llada_tasks.poem()["test"]
    want = [tok.render_prompt([{"role": "user", "content": gsm[i]["question"]}]) for i in range(2)]
    want += [tok.render_prompt([{"role": "user", "content": f"{poem[i]['first']}的下一句是什么？直接输出句子即可。"}])
             for i in range(2)]
    want += [tok.render_prompt([{"role": "user", "content": f"{poem[i]['second']}的上一句是什么？直接输出句子即可。"}])
             for i in range(2)]
    assert sorted(seen) == sorted(want)
    seen.clear()
    assert evaluate("--checkpoint", ckpts["ar"], "--tasks", "gsm8k", "--limit", "1", "--no_chat", *SMALL) == 0
    assert seen == [tok.encode(f"Question: {gsm[0]['question']}\nAnswer:")]


def test_block_diffusion_checkpoint_and_sampler_flags(ckpts, tmp_path, capsys):
    out = tmp_path / "bd.json"
    assert evaluate("--checkpoint", ckpts["bd"], "--tasks", "gsm8k,piqa", "--limit", "2", "--output", out,
                    *SMALL[:-5], "--no_progress") == 0  # no --block_length: the trained one
    assert "sampler block, block_length 4, likelihood block" in capsys.readouterr().out
    d = json.loads(out.read_text())["models"]["diffusion"]
    assert (d["sampler"], d["block_length"], d["likelihood"]) == ("block", 4, "block")
    assert evaluate("--checkpoint", ckpts["bd"], ckpts["dm"], "--sampler", "llada", "--tasks", "poem", "--limit", "1",
                    "--output", out, *SMALL) == 0
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["diffusion", "diffusion_2"]
    assert models["diffusion"]["sampler"] == models["diffusion_2"]["sampler"] == "low_confidence"
    capsys.readouterr()
    assert evaluate("--checkpoint", ckpts["bd"], "--threshold", "0.5", "--tasks", "gsm8k", *SMALL) == 2
    assert capsys.readouterr().err.startswith("error: the block sampler does not support --threshold")


def test_watch(ckpts, tmp_path, capsys):
    assert evaluate("--checkpoint", ckpts["dm"], "--watch", "--prompt", "hello", "--gen_length", "8",
                    "--block_length", "8", "--steps", "4", "--mask_symbol", "#") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step")]
    assert len(lines) == 4 and "#" in lines[0] and "#" not in lines[-1]
    wout = tmp_path / "watch.json"  # the block sampler: 8 tokens, one per step (block 4, 4 steps per block)
    assert evaluate("--checkpoint", ckpts["bd"], "--watch", "--prompt", "hi", "--gen_length", "8", "--steps", "8",
                    "--mask_symbol", "#", "--output", wout) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("[step")]) == 8
    w = json.loads(wout.read_text())["watch"]
    assert (w["sampler"], w["block_length"], w["steps"]) == ("block", 4, 8)
    assert evaluate("--checkpoint", ckpts["ar"], "--watch") == 2
    assert "AR model" in capsys.readouterr().err


def test_bad_arguments_fail_in_one_line_before_loading(ckpts, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api, "load", no_load)
    monkeypatch.setattr(harness.api, "load", no_load)
    dm = ckpts["dm"]
    for extra, msg in ((["--tasks", "nope"], "unknown task(s) ['nope']"),
                       (["--limit", "-3"], "--limit must be >= 0"),
                       (["--threshold", "1.5"], "--threshold must be in (0, 1)"),
                       (["--mc_samples", "0"], "--mc_samples must be >= 1"),
                       (["--checkpoint", f"{dm}/nope"], "does not exist")):
        argv = ["--checkpoint", dm, *extra] if extra[0] != "--checkpoint" else extra
        assert evaluate(*argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err


def test_poem_scoring():
    """The poem tasks score the first non-empty line: an answer after a leading line break counts (the
    generation is not cut at the first newline before scoring)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(["llada_poem_forward", "llada_poem_reversal"],
                          TaskManager(include_path=harness.TASKS_DIR, include_defaults=False))
    doc = {"first": "床前明月光", "second": "疑是地上霜"}
    for name, answer in (("llada_poem_forward", "疑是地上霜"), ("llada_poem_reversal", "床前明月光")):
        task = tasks[name]
        until = task.config.generation_kwargs["until"]
        for text, score in ((f"\n{answer}，\n举头望明月", 1.0), (f"{answer}。", 1.0), (f"\n\n{answer}了", 0.0)):
            assert task.process_results(doc, [harness.cut_at_stops(text, until)]) == {"exact_match": score}, text
    assert first_line("\n 举头望明月，低头思故乡。") == "举头望明月"
    assert first_line("疑是地上霜\n床前") == "疑是地上霜"
    assert poem_match("疑是地上霜", "疑是地上霜。") and poem_match(" 疑是 地上霜", "疑是地上霜")
    assert not poem_match("疑是地上雪", "疑是地上霜") and first_line("，。") == ""


def test_sampling_generators_are_created_on_the_model_device(ckpts, monkeypatch, capsys):
    """Random remasking / temperature > 0 draw from torch.Generators: each must be made for the model's device
    (a device-less one is a CPU generator, which fails against CUDA tensors; issue 21 finding 11)."""
    made = []
    real = torch.Generator

    def recording(*args, **kwargs):
        made.append(args[0] if args else kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", recording)
    assert evaluate("--checkpoint", ckpts["dm"], "--watch", "--prompt", "hi", "--gen_length", "8", "--block_length",
                    "8", "--sampler", "random", "--temperature", "1") == 0
    assert evaluate("--checkpoint", ckpts["dm"], ckpts["ar"], "--tasks", "gsm8k", "--limit", "2",
                    "--temperature", "1", *SMALL) == 0
    capsys.readouterr()
    assert made and all(d is not None and torch.device(d) == torch.device("cpu") for d in made), made


def test_edit_sampler_flags_reach_the_decoder(ckpts, tmp_path, capsys):
    """LLaDA 2.1's editing decoder through the front end: its flags reach the model args, --watch shows edits, and
    its flags without --sampler edit are refused in one line."""
    out = tmp_path / "res.json"
    assert evaluate("--checkpoint", ckpts["bd"], "--tasks", "gsm8k", "--limit", "2", "--sampler", "edit",
                    "--preset", "speed", "--output", out, *SMALL) == 0
    res = json.loads(out.read_text())
    (info,) = res["models"].values()
    assert info["sampler"] == "edit" and res["results"]["gsm8k"][next(iter(res["models"]))]["nfe"] > 0
    assert evaluate("--checkpoint", ckpts["bd"], "--watch", "--sampler", "edit", "--editing_threshold", "0",
                    *SMALL) == 0
    assert "edited" in capsys.readouterr().out
    assert evaluate("--checkpoint", ckpts["dm"], "--tasks", "gsm8k", "--preset", "speed", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only apply to --sampler edit" in err[0], err
