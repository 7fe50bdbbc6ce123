"""Datasets and scoring helpers of the lm-evaluation-harness tasks shipped with llada_scale (the YAMLs next to
this file): they read the local eval files of the shared data directory, so the harness runs offline.

The data directory is, in order: the ``data`` model argument / ``--metadata data=PATH`` (lm-eval passes both to
``custom_dataset``), ``$LLADA_DATA``, or ``../shared/data`` next to the repository
(:data:`llada_scale.data.DEFAULT_DATA`). Nothing is copied into the repository or the Hugging Face cache.
"""

from __future__ import annotations

import gzip
import json
import os
import re

from llada_scale.data import default_data


def _dir(data: str | None) -> str:
    return data or default_data()


def _path(data_dir: str, name: str) -> str:
    p = os.path.join(data_dir, "eval", name)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"eval file {p} not found (point --data, the harness model_arg data=, or LLADA_DATA "
                                "at the shared data directory)")
    return p


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _test_split(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def gsm8k(data: str | None = None, **_) -> "datasets.DatasetDict":  # noqa: F821
    """GSM8K test (1,319 problems): ``question``, ``answer`` (reasoning, then ``#### number``)."""
    with _open(_path(_dir(data), "gsm8k_test.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return _test_split([{"question": r["question"], "answer": r["answer"]} for r in rows])


def piqa(data: str | None = None, **_):
    """PIQA validation (1,838): ``goal``, ``sol1``, ``sol2``, ``label`` (0/1, from the separate labels file)."""
    d = _dir(data)
    with _open(_path(d, "piqa_valid.jsonl")) as f, _open(_path(d, "piqa_valid_labels.lst")) as g:
        rows = [{**{k: r[k] for k in ("goal", "sol1", "sol2")}, "label": int(lab)}
                for r, lab in ((json.loads(line), lab.strip()) for line, lab in zip(f, g))]
    return _test_split(rows)


def lambada(data: str | None = None, **_):
    """LAMBADA test passages (5,153): ``text``; the task scores its last word given the rest."""
    with _open(_path(_dir(data), "lambada_test.txt")) as f:
        rows = [{"text": line.strip()} for line in f if " " in line.strip()]
    return _test_split(rows)


_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext2(data: str | None = None, **_):
    """WikiText-2 test as documents (62 articles, split at the top-level `` = Title = `` headings, as
    EleutherAI/wikitext_document_level): ``page``."""
    with _open(_path(_dir(data), "wikitext2_test.txt")) as f:
        lines = f.read().lstrip("\ufeff").splitlines(keepends=True)
    pages: list[list[str]] = []
    for line in lines:
        if _HEADING.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return _test_split([{"page": "".join(p)} for p in pages if "".join(p).strip()])


def wikitext_target(doc: dict) -> str:
    """lm-eval's WikiText detokenizer (its ``wikitext`` task's ``doc_to_target``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def wikitext_results(doc: dict, results):
    """Word/byte perplexity and bits per byte over the original page (lm-eval's ``wikitext`` task)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)


def poem(data: str | None = None, **_):
    """LLaDA's reversal-curse poem set (469 couplets): ``first``, ``second``."""
    with _open(_path(_dir(data), "poem_reversal.json")) as f:
        rows = json.load(f)
    return _test_split([{"first": r["first"], "second": r["second"]} for r in rows])


_PUNCT = re.compile(r"[\s，。！？、；：,.!?;:\"'“”‘’「」『』《》()（）]+")


def first_line(text: str) -> str:
    """The first non-empty piece of ``text`` cut at a line break or a sentence/clause mark (Chinese or ASCII)."""
    for part in re.split(r"[\n，。！？,.!?；;]", text):
        if part.strip():
            return part.strip()
    return ""


def poem_match(line: str, reference: str) -> bool:
    """``line`` equals ``reference`` with punctuation and whitespace ignored."""
    return _PUNCT.sub("", line) == _PUNCT.sub("", reference)


def poem_results(doc: dict, results, target_key: str):
    """exact_match: the first line of the generation (:func:`first_line`) equals the reference line, punctuation
    and spaces ignored (LLaDA's reversal-curse protocol)."""
    return {"exact_match": float(poem_match(first_line(results[0]), doc[target_key]))}


def poem_forward_results(doc: dict, results):
    return poem_results(doc, results, "second")


def poem_reversal_results(doc: dict, results):
    return poem_results(doc, results, "first")
