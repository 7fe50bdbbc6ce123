"""Tokenizer wrapper for llada_scale: HF ``tokenizers`` JSON files or SentencePiece models.

A masked-diffusion LM needs one extra token, the mask token, that the base tokenizer usually lacks.
:class:`Tokenizer` adds it (for the minimind tokenizer ``<|mask|>`` becomes id 6400, vocab 6401), exposes
the special-token ids the trainer needs, and renders chat conversations with the tokenizer's own chat
template while recording which tokens belong to assistant turns (the SFT loss mask).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

__all__ = ["TokenizerError", "Tokenizer", "CHATML_TEMPLATE"]

#: Fallback chat template (plain ChatML) used when the tokenizer ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Roles accepted by :meth:`Tokenizer.render_chat`.
KNOWN_ROLES = ("system", "user", "assistant", "tool")

# Tried in order when no tokenizer_config.json names the eos token.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


class TokenizerError(ValueError):
    """Raised for an unusable tokenizer file/config or an un-renderable conversation."""


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _make_jinja_env():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # transformers defines it too (Llama 3.x)
    return env


class Tokenizer:
    """A text tokenizer plus the special-token ids a masked-diffusion LM needs.

    Build with :meth:`Tokenizer.load`. Token ids are Python ``int`` in ``[0, vocab_size)``.

    Attributes:
        path: absolute path of the tokenizer file (``tokenizer.json`` or ``*.model``).
        backend: ``"hf"`` (``tokenizers`` library) or ``"sentencepiece"``.
        vocab_size: number of ids including the added mask token (minimind: 6401).
        bos_token_id, pad_token_id: ``int`` or ``None`` when the tokenizer has none.
        eos_token_id, mask_token_id: always ``int``.
        mask_token: the mask token string (default ``"<|mask|>"``).
        chat_template: the jinja2 chat template source (``CHATML_TEMPLATE`` when the tokenizer has none).
    """

    def __init__(self) -> None:  # use Tokenizer.load
        self.path: str = ""
        self.config_path: str | None = None
        self.backend: str = ""
        self._hf = None
        self._sp = None
        self.vocab_size: int = 0
        self.bos_token: str | None = None
        self.eos_token: str | None = None
        self.pad_token: str | None = None
        self.mask_token: str = ""
        self.bos_token_id: int | None = None
        self.eos_token_id: int = -1
        self.pad_token_id: int | None = None
        self.mask_token_id: int = -1
        self.chat_template: str = CHATML_TEMPLATE
        self._has_own_template = False
        self._template = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, mask_token: str | None = None) -> "Tokenizer":
        """Load a tokenizer and add the mask token unless it has one.

        Args:
            path: a directory holding ``tokenizer.json`` (and optionally ``tokenizer_config.json``), a
                ``tokenizer.json`` file (a sibling ``tokenizer_config.json`` is read when present), or a
                SentencePiece ``.model`` file.
            mask_token: the mask token string. Default: the ``mask_token`` that ``tokenizer_config.json`` names
                (HF's field; import-llada records LLaDA's ``<|mdm_mask|>`` = 126336 there), else ``"<|mask|>"``.
                Used as is when the vocabulary has it (a model's own mask token is never duplicated), otherwise
                added (as a special token, id ``= old vocab size``).

        Returns:
            A :class:`Tokenizer`. bos/eos/pad come from ``tokenizer_config.json`` when present (minimind:
            pad ``<|endoftext|>``=0, bos ``<|im_start|>``=1, eos ``<|im_end|>``=2), else from the
            SentencePiece model's own ids, else from common names (``</s>``, ``<|endoftext|>``, ...). The chat
            template is ``chat_template.jinja`` next to the tokenizer (transformers >= 4.43 saves it there),
            else ``tokenizer_config.json``'s ``chat_template``, else :data:`CHATML_TEMPLATE`.

        Raises:
            FileNotFoundError: ``path`` does not exist or a directory lacks ``tokenizer.json``/``*.model``.
            TokenizerError: the file cannot be parsed, or the tokenizer has no eos token.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TokenizerError(f"tokenizer path must be a string, got {type(path).__name__}")
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path} (pass a directory with tokenizer.json, "
                                    "a tokenizer.json file or a SentencePiece .model file)")
        if os.path.isdir(path):
            json_path = os.path.join(path, "tokenizer.json")
            models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
            if os.path.isfile(json_path):
                file_path = json_path
            elif models:
                file_path = os.path.join(path, models[0])
            else:
                raise FileNotFoundError(f"{path}: directory has no tokenizer.json or SentencePiece .model file")
        else:
            file_path = path
        if mask_token is not None and not mask_token:
            raise TokenizerError("mask_token must be a non-empty string")

        tok = cls()
        tok.path = file_path
        config: dict = {}
        config_path = os.path.join(os.path.dirname(file_path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{config_path}: cannot parse tokenizer config ({exc}); fix or remove it") from exc
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
            tok.config_path = config_path
        tok.mask_token = mask_token or _token_str(config.get("mask_token")) or "<|mask|>"

        if file_path.endswith(".model"):
            tok._load_sentencepiece(file_path, config)
        else:
            tok._load_hf(file_path, config)

        template = config.get("chat_template")
        jinja_path = os.path.join(os.path.dirname(file_path), "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # HF allows a list of named templates
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            tok.chat_template = template
            tok._has_own_template = True
        return tok

    def _load_hf(self, file_path: str, config: dict) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(file_path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file_path}: not a valid tokenizers JSON file ({exc})") from exc
        self.backend = "hf"
        self._hf = hf

        def lookup(name: str | None) -> int | None:
            return None if name is None else hf.token_to_id(name)

        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        if self.eos_token is None:
            for cand in _EOS_CANDIDATES:
                if hf.token_to_id(cand) is not None:
                    self.eos_token = cand
                    break
        self.eos_token_id = lookup(self.eos_token)  # type: ignore[assignment]
        if self.eos_token_id is None:
            raise TokenizerError(
                f"{file_path}: tokenizer has no eos token (set \"eos_token\" in tokenizer_config.json next to it; "
                f"tried {', '.join(_EOS_CANDIDATES)})")
        self.bos_token_id = lookup(self.bos_token)
        self.pad_token_id = lookup(self.pad_token)
        if hf.token_to_id(self.mask_token) is None:
            hf.add_special_tokens([AddedToken(self.mask_token, special=True, normalized=False)])
        self.mask_token_id = hf.token_to_id(self.mask_token)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    def _load_sentencepiece(self, file_path: str, config: dict) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(file_path)
        except Exception as exc:
            raise TokenizerError(f"{file_path}: not a valid SentencePiece model ({exc})") from exc
        self.backend = "sentencepiece"
        self._sp = sp
        n = sp.GetPieceSize()

        def lookup(name: str | None, fallback: int) -> int | None:
            if name is not None:
                i = sp.PieceToId(name)
                if i != sp.unk_id() or name == sp.IdToPiece(sp.unk_id()):
                    return i
            return fallback if fallback >= 0 else None

        self.bos_token_id = lookup(_token_str(config.get("bos_token")), sp.bos_id())
        self.eos_token_id = lookup(_token_str(config.get("eos_token")), sp.eos_id())  # type: ignore[assignment]
        self.pad_token_id = lookup(_token_str(config.get("pad_token")), sp.pad_id())
        if self.eos_token_id is None:
            raise TokenizerError(f"{file_path}: SentencePiece model has no eos token (train it with eos_id >= 0 "
                                 "or name \"eos_token\" in tokenizer_config.json)")
        self.bos_token = None if self.bos_token_id is None else sp.IdToPiece(self.bos_token_id)
        self.eos_token = sp.IdToPiece(self.eos_token_id)
        self.pad_token = None if self.pad_token_id is None else sp.IdToPiece(self.pad_token_id)
        mid = sp.PieceToId(self.mask_token)
        if mid != sp.unk_id() and sp.IdToPiece(mid) == self.mask_token:
            self.mask_token_id = mid
            self.vocab_size = n
        else:  # SentencePiece cannot grow its vocab: the mask id is appended after the last piece
            self.mask_token_id = n
            self.vocab_size = n + 1

    # ------------------------------------------------------------------ basic API
    def encode(self, text: str) -> list[int]:
        """Tokenize ``text`` without adding any special token (bos/eos are NOT added).

        Special-token strings inside ``text`` (e.g. ``<|im_end|>``) map to their ids for HF tokenizers.
        Raises TokenizerError if ``text`` is not a ``str``.
        """
        return self._encode_offsets(text)[0]

    def _encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their (start, end) character offsets in ``text``."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        if self._hf is not None:
            enc = self._hf.encode(text, add_special_tokens=False)
            return list(enc.ids), list(enc.offsets)
        proto = self._sp.encode(text, out_type="proto")
        # SentencePiece offsets are byte offsets into the UTF-8 text: map them to characters.
        byte_starts = []
        pos = 0
        for ch in text:
            byte_starts.append(pos)
            pos += len(ch.encode("utf-8"))
        ids, offs = [], []
        for p in proto.pieces:
            ids.append(p.id)
            s = bisect.bisect_right(byte_starts, p.begin) - 1
            e = bisect.bisect_left(byte_starts, p.end) if p.end < pos else len(text)
            offs.append((max(s, 0), e))
        return ids, offs

    def decode(self, ids: Iterable[int]) -> str:
        """Turn token ids (any iterable of ints, e.g. a list or a 1-D int tensor/array) back into text.

        Mask tokens (and ids outside the tokenizer, such as vocab padding) are skipped; other special
        tokens such as ``<|im_end|>`` are kept.
        """
        out = []
        limit = self.vocab_size
        for i in ids:
            i = int(i)
            if i != self.mask_token_id and 0 <= i < limit:
                out.append(i)
        if self._hf is not None:
            return self._hf.decode(out, skip_special_tokens=False)
        n = self._sp.GetPieceSize()
        return self._sp.decode([i for i in out if i < n])

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """``vocab_size`` rounded up to a multiple of ``multiple`` (embedding rows; minimind: 6464).

        Raises ValueError if ``multiple`` < 1.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {multiple!r}")
        return -(-self.vocab_size // multiple) * multiple

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if unknown."""
        if token == self.mask_token:
            return self.mask_token_id
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.PieceToId(token)
        return i if self._sp.IdToPiece(i) == token else None

    # ------------------------------------------------------------------ chat
    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self._template is None:
            try:
                self._template = _make_jinja_env().from_string(self.chat_template)
            except Exception as exc:
                raise TokenizerError(f"{self.config_path or self.path}: invalid chat template ({exc})") from exc
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TokenizerError:
            raise
        except Exception as exc:
            raise TokenizerError(f"chat template failed on this conversation: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _check_messages(messages: Any) -> list[dict]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TokenizerError("conversation must be a non-empty list of {\"role\", \"content\"} dicts")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise TokenizerError(f"message {i} is a {type(m).__name__}, expected a dict with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in KNOWN_ROLES:
                raise TokenizerError(f"message {i} has unknown role {role!r} (expected one of {', '.join(KNOWN_ROLES)})")
            if not isinstance(content, str):
                raise TokenizerError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
            out.append({"role": role, "content": content})
        return out

    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Render a conversation with the chat template and mark the assistant tokens.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``.

        Returns:
            ``(input_ids, assistant_mask)``: two lists of equal length. ``assistant_mask[t]`` is True on
            every token of every assistant turn's content and on the token(s) closing it (the eos token,
            ``<|im_end|>`` for ChatML), False elsewhere (system/user text, role headers, newlines).
            Spans are found by rendering ``messages[:i]`` with ``add_generation_prompt=True`` (start of
            turn i's content) and ``messages[:i+1]`` (its end) and mapping character spans to tokens by
            the tokenizer's offsets (a token overlapping a span is marked).

        Raises:
            TokenizerError: unknown role, non-string content, no assistant turn, a template error, or a
                template whose prefix renderings are not prefixes of the full rendering.
        """
        msgs = self._check_messages(messages)
        if not any(m["role"] == "assistant" for m in msgs):
            raise TokenizerError("conversation has no assistant turn (nothing to train on)")
        full = self._render(msgs, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], add_generation_prompt=True) if i else ""
            upto = self._render(msgs[: i + 1], add_generation_prompt=False)
            if not upto.startswith(prefix) or not full.startswith(upto):
                raise TokenizerError("chat template is not prefix-stable (rendering messages[:i] is not a prefix "
                                     "of the full conversation); cannot locate assistant turns")
            start = len(prefix)
            if i == 0:  # no generation prompt to diff against: locate the content itself
                found = upto.find(m["content"]) if m["content"] else -1
                start = found if found >= 0 else 0
            search_from = start + len(m["content"]) if upto[start:start + len(m["content"])] == m["content"] else start
            end = upto.find(self.eos_token, search_from) if self.eos_token else -1
            end = end + len(self.eos_token) if end >= 0 else len(upto.rstrip())
            spans.append((start, end))
        ids, offsets = self._encode_offsets(full)
        mask = []
        for s, e in offsets:
            mask.append(any(s < b and max(e, s + 1) > a for a, b in spans))
        return ids, mask

    def render_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text for ``messages`` (what :meth:`render_prompt` tokenizes), e.g. for
        lm-evaluation-harness's ``apply_chat_template``.

        Raises TokenizerError on an unknown role / non-string content / template error.
        """
        return self._render(self._check_messages(messages), add_generation_prompt)

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered with ``add_generation_prompt=True`` (the generation prompt).

        Raises TokenizerError on an unknown role / non-string content / template error.
        """
        msgs = self._check_messages(messages)
        return self.encode(self._render(msgs, add_generation_prompt=True))

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        """A JSON-serialisable description used to check that data and model share a tokenizer.

        Keys: ``path`` (absolute tokenizer file), ``sha256`` (of that file), ``config_sha256`` (of
        tokenizer_config.json or None), ``backend``, ``vocab_size``, ``padded_vocab_size`` (multiple 64),
        ``mask_token``, ``mask_token_id``, ``eos_token_id``, ``bos_token_id``, ``pad_token_id``.
        """
        return {
            "path": self.path,
            "sha256": _sha256_file(self.path),
            "config_sha256": _sha256_file(self.config_path) if self.config_path else None,
            "backend": self.backend,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size(64),
            "mask_token": self.mask_token,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token_id}, mask={self.mask_token_id})")

    def __getstate__(self):  # picklable for multiprocessing: reload from file in the child
        return {"path": self.path, "mask_token": self.mask_token}

    def __setstate__(self, state):
        other = Tokenizer.load(state["path"], mask_token=state["mask_token"])
        self.__dict__.update(other.__dict__)
