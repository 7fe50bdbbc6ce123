"""Tests for llada_scale.data.tokenizer on the real minimind tokenizer and tiny synthetic tokenizers."""

import json
import os

import pytest

from llada_scale.data.tokenizer import Tokenizer, TokenizerError
from tests.checkpoint.tiny_models import LLADA_CHAT_TEMPLATE, make_tokenizer

MINIMIND = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "tokenizer", "minimind")
if not os.path.isdir(MINIMIND):
    MINIMIND = "/work/shared/data/tokenizer/minimind"
needs_minimind = pytest.mark.skipif(not os.path.isdir(MINIMIND), reason="minimind tokenizer not available")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(MINIMIND)


@needs_minimind
def test_minimind_ids(tok):
    assert tok.pad_token_id == 0
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.mask_token_id == 6400
    assert tok.vocab_size == 6401
    assert tok.padded_vocab_size() == 6464
    assert tok.padded_vocab_size(128) == 6528
    with pytest.raises(ValueError):
        tok.padded_vocab_size(0)
    ident = tok.identity()
    assert ident["vocab_size"] == 6401 and ident["mask_token_id"] == 6400 and ident["eos_token_id"] == 2
    assert len(ident["sha256"]) == 64
    json.dumps(ident)


@needs_minimind
def test_load_from_file_path_reads_sibling_config():
    t = Tokenizer.load(os.path.join(MINIMIND, "tokenizer.json"))
    assert (t.eos_token_id, t.mask_token_id) == (2, 6400)


@needs_minimind
@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.\n  Indented line, tabs\tand 123 numbers!",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Mixed 中文 and English — with émojis 🙂.",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@needs_minimind
def test_encode_adds_no_special_tokens_and_decode_skips_mask(tok):
    ids = tok.encode("hello")
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids
    assert tok.decode([tok.mask_token_id] + ids + [tok.mask_token_id]) == "hello"
    assert tok.encode("<|mask|>") == [6400]


def _assistant_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@needs_minimind
@pytest.mark.parametrize("conv", [
    [{"role": "user", "content": "Give three tips."}, {"role": "assistant", "content": "1. Eat.\n2. Sleep.\n3. Move."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "写诗"},
     {"role": "assistant", "content": " 床前明月光"}],
])
def test_render_chat_masks_exactly_assistant_content(tok, conv):
    ids, mask = tok.render_chat(conv)
    assert len(ids) == len(mask)
    assert tok.decode(ids).endswith("<|im_end|>\n")
    runs = _assistant_runs(ids, mask)
    assert [tok.decode(r) for r in runs] == [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    # the prompt for generation is the rendering up to the assistant header
    prompt = tok.render_prompt(conv[:-1])
    assert ids[: len(prompt)] == prompt and not any(mask[len(prompt) - 3: len(prompt)])


@needs_minimind
def test_render_chat_errors(tok):
    with pytest.raises(TokenizerError, match="unknown role"):
        tok.render_chat([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(TokenizerError, match="no assistant"):
        tok.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError):
        tok.render_chat([])


def test_sentencepiece_model_loads(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    lines = [f"line {i}: the cat sat on the mat number {i * 7 % 13} while dogs bark" for i in range(300)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=60, model_type="bpe",
                                   minloglevel=2)
    t = Tokenizer.load(prefix + ".model")
    assert t.backend == "sentencepiece"
    assert t.eos_token_id == 2 and t.mask_token_id == 60 and t.vocab_size == 61
    assert t.decode(t.encode("the cat sat")) == "the cat sat"
    ids, mask = t.render_chat([{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the cat"}])
    assert any(mask) and not all(mask)
    assert "the cat" in t.decode([i for i, m in zip(ids, mask) if m])
    # directory form
    assert Tokenizer.load(str(tmp_path)).vocab_size == 61


def test_tokenizer_without_eos_raises(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    hf = HFTokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no eos"):
        Tokenizer.load(str(tmp_path))


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path))  # empty directory
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.load(str(tmp_path))


# ----------------------------------------------------------------------------- imported models' tokenizers
# A Qwen2.5-Instruct-style ChatML template with a default system turn (the branch real templates have).
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _tiny(tmp_path, template, mask="<|mdm_mask|>"):
    return make_tokenizer(tmp_path, mask_token=mask, template=template)


@pytest.mark.parametrize("which", ["llada", "qwen"])
def test_chat_template_matches_transformers_byte_for_byte(tmp_path, which):
    """SFT prompts use the tokenizer's own template exactly as transformers renders it (string and ids)."""
    transformers = pytest.importorskip("transformers")
    template = LLADA_CHAT_TEMPLATE if which == "llada" else QWEN_STYLE_TEMPLATE
    specials = ["<|im_start|>", "<|im_end|>"] if which == "qwen" else []
    _tiny(tmp_path, template)
    if specials:  # ChatML markers as added special tokens
        from tokenizers import Tokenizer as HFTok

        t = HFTok.from_file(str(tmp_path / "tokenizer.json"))
        t.add_special_tokens(specials)
        t.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    conv = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "two plus two"},
            {"role": "user", "content": " hello world "}, {"role": "assistant", "content": "hello"}]
    for msgs, gen in ((conv, False), (conv[:3], True), ([{"role": "system", "content": "you are"}] + conv, False)):
        assert ours._render(msgs, add_generation_prompt=gen) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.render_prompt(conv[:3]) == hf.apply_chat_template(conv[:3], tokenize=True, add_generation_prompt=True,
                                                                  return_dict=False)
    ids, mask = ours.render_chat(conv)
    answer = [i for i, m in zip(ids, mask) if m]
    assert ours.decode(answer).split()[:3] == ["two", "plus", "two"]


def test_existing_mask_token_is_used_not_added(tmp_path):
    """tokenizer_config.json's mask_token (what import-llada records) is the mask; none is appended."""
    specials = _tiny(tmp_path, "")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    plain = Tokenizer.load(tmp_path)  # no mask_token named: <|mask|> is added after the vocabulary
    assert plain.mask_token == "<|mask|>" and plain.mask_token_id == specials["<|mdm_mask|>"] + 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "mask_token": "<|mdm_mask|>"}))
    t = Tokenizer.load(tmp_path)
    assert t.mask_token_id == specials["<|mdm_mask|>"] and t.vocab_size == specials["<|mdm_mask|>"] + 1
    assert Tokenizer.load(tmp_path, mask_token="<|eot_id|>").mask_token_id == specials["<|eot_id|>"]


def test_chat_template_jinja_file_wins(tmp_path):
    _tiny(tmp_path, "{{ 'from config' }}")
    (tmp_path / "chat_template.jinja").write_text("{{ 'from file' }}")
    assert Tokenizer.load(tmp_path)._render([{"role": "user", "content": "x"}], False) == "from file"
