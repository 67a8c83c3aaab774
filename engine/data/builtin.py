"""Built-in tiny SFT, reward-model and RLHF data, so fine-tuning runs on a fresh machine without user data.

Everything is derived from ``pydoc_data.topics`` (the Python reference shipped with Python, the same
corpus the default tokenizer is trained on). Each section of a topic (a heading and the prose below
it) becomes one question/answer pair:

- conversation: the user asks about the section title in one of a few phrasings, the assistant answers
  with the section's first prose sentences, whitespace-normalized and cut to a seeded budget of
  ``ANSWER_WORDS`` words (so a sample fits ``seq_length`` 128-256 at the default tokenizer);
- preference pair: the same question, chosen = its own answer, rejected = the answer of a section of
  a *different* topic with its words shuffled (seeded). The rule to learn is relevance and
  well-formedness, not length: the lengths are independent, so either side may be the longer one
  and ``bucket_balance`` has both kinds to keep.

``builtin_dataset(kind, tokenizer)`` tokenizes them once into an indexed dataset cached next to the
default tokenizer (``~/.cache/glm-engine``); see its docstring for the file names. Records have the
JSONL forms ``launch.preprocess`` reads (``{"messages": [...]}``; ``{"prompt", "chosen", "rejected"}``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np

from engine.data.indexed_dataset import (DatasetFormatError, IndexedDataset, IndexedDatasetBuilder,
                                         data_file_path, index_file_path, mask_file_path)
from engine.data.tokenizer import DEFAULT_CACHE_DIR

BUILTIN_KINDS = ("chat", "preference")
"""Kinds ``builtin_dataset`` builds."""
FORMAT_VERSION = 1
"""Part of the cache file name: bump it whenever the records or their tokenization change."""
ANSWER_WORDS = (40, 60)
"""Inclusive range of the per-answer word budget (whole sentences are kept while they fit)."""
MIN_ANSWER_WORDS = 8
"""Sections with less prose than this are skipped (headings over a grammar rule or a table only)."""
QUESTION_TEMPLATES = (
    "What does the Python reference say about {title}?",
    "Can you explain {title} in Python?",
    "Briefly describe {title}.",
    "Tell me about {title} in the Python language.",
    "What should I know about {title}?",
)
"""User phrasings; each question picks one with the seeded generator."""

_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")
# A block that starts like one of these is not an answer: version notes, cross references, tables,
# rubrics ("-[ Footnotes ]-") and footnotes ("[1] ...").
_NOT_PROSE = re.compile(r"^(New in version|Changed in version|Added in version|Deprecated|See also|Note:|"
                        r"Warning:|Footnotes|Example|For example:?$|[+|]|-\[|\[\d+\]|(\d+\.|[*\-\u2022]) )")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ABBREVIATION = re.compile(r"(\b(e\.g|i\.e|etc|vs)\.|^\d+\.)$", re.IGNORECASE)
_FOOTNOTE_REF = re.compile(r"\s*\[\d+\]")
# "non-\nnumeric" is "non-numeric" wrapped at the hyphen.
_WRAPPED_HYPHEN = re.compile(r"(?<=[A-Za-z]-)\n(?=[a-z])")
_COMPLETE = re.compile(r"[.!?][\"')\u201d]*$")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
# Leading words of an answer that identify the pydoc passage it comes from.
_SOURCE_WORDS = 8
# Last words of a sentence that only announces the code after it ("... is equivalent to:").
_DANGLING = {"to", "as", "like", "following", "follows", "example", "is", "are", "be", "of", "by", "form",
             "syntax", "code", "with", "this", "these", "below", "here", "e.g.", "i.e."}
# Capitalized words of a title that stay capitalized in a question ("Title Case" -> "title case").
_TITLE_WORD = re.compile(r"[A-Z][a-z]+(-[a-z]+)*[,;:]?")
_PROPER = {"Python", "Unicode", "None", "True", "False", "Ellipsis", "NotImplemented", "PEP", "I/O"}

PathLike = Union[str, os.PathLike]


# -- records ---------------------------------------------------------------------------------------

def _sections() -> list[tuple[str, str, str]]:
    """(topic name, section title, prose) of every pydoc topic section, in topic-name order.

    A section is a heading (a line underlined with ``*``, ``=``, ``-``, ``~`` or ``^``) and the
    unindented prose paragraphs below it up to the next heading; grammar rules, code, tables and
    definition lists are indented or fenced, and lists and version notes are skipped. A later
    section repeating a title (up to case) is dropped, so a question names exactly one answer.
    """
    from pydoc_data.topics import topics

    out, seen = [], set()
    for name in sorted(topics):
        title, prose = None, []

        def flush():
            text = " ".join(prose)
            key = None if title is None else _topic_phrase(title).lower()
            if key is not None and key not in seen and len(text.split()) >= MIN_ANSWER_WORDS:
                seen.add(key)
                out.append((name, title, text))

        for block in re.split(r"\n\s*\n", topics[name]):
            lines = [line.rstrip() for line in block.strip("\n").splitlines()]
            if not lines or not lines[0].strip():
                continue
            if len(lines) >= 2 and _UNDERLINE.match(lines[1]) and len(lines[1]) == len(lines[0]):
                flush()
                title, prose = _EMPHASIS.sub(r"\1", " ".join(lines[0].split())), []
                continue
            first = lines[0]
            if first.startswith("-[ Footnotes ]-"):
                break
            if first[0].isspace() or _NOT_PROSE.match(first) or "::=" in block:
                continue
            text = _WRAPPED_HYPHEN.sub("", "\n".join(line.strip() for line in lines))
            paragraph = _end_paragraph(_FOOTNOTE_REF.sub("", _EMPHASIS.sub(r"\1", " ".join(text.split()))))
            if paragraph:
                prose.append(paragraph)
        flush()
    return out


def _sentences(text: str) -> list[str]:
    """``text`` split after ".", "!" or "?" followed by a capital, but not after "e.g." and the like."""
    out = []
    for piece in _SENTENCE_END.split(text):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def _end_paragraph(text: str) -> str:
    """A paragraph that does not end a sentence (``":"`` or nothing) introduced code that the answer
    leaves out: end its last sentence with "." if it reads as a statement ("... into a program:"),
    else drop that sentence ("... is equivalent to", "Syntax:")."""
    if _COMPLETE.search(text):
        return text
    sentences = _sentences(text)
    last = sentences[-1].rstrip(":;,")
    words = last.split()
    if len(words) >= 6 and words[-1].lower() not in _DANGLING:
        sentences[-1] = last + "."
    else:
        sentences.pop()
    return " ".join(sentences)


def _cut(text: str, budget: int) -> str:
    """Whole leading sentences of ``text`` while they fit ``budget`` words (at least the first, clipped)."""
    words, kept = 0, []
    for sentence in _sentences(text):
        n = len(sentence.split())
        if kept and words + n > budget:
            break
        kept.append(sentence)
        words += n
    answer = " ".join(kept)
    if words > budget:  # a single first sentence longer than the budget
        answer = " ".join(answer.split()[:budget]).rstrip(",;:") + " ..."
    return answer


def _topic_phrase(title: str) -> str:
    # "Value Patterns" -> "value patterns", but acronyms, quoted names and proper names stay as written.
    return " ".join(w.lower() if _TITLE_WORD.fullmatch(w) and w.rstrip(",;:") not in _PROPER else w
                    for w in title.split())


def _qa(seed: int) -> list[tuple[str, str, str]]:
    """(topic name, question, answer) per section; the phrasing and the answer budget come from ``seed``."""
    sections = _sections()
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(QUESTION_TEMPLATES), size=len(sections))
    budgets = rng.integers(ANSWER_WORDS[0], ANSWER_WORDS[1] + 1, size=len(sections))
    return [(name, QUESTION_TEMPLATES[t].format(title=_topic_phrase(title)), _cut(text, int(b)))
            for (name, title, text), t, b in zip(sections, templates.tolist(), budgets.tolist())]


def builtin_conversations(seed: int = 0) -> list[list[dict]]:
    """One user question and one assistant answer per pydoc section (``[{"role", "content"}, ...]``).

    Deterministic for a given ``seed`` and Python version (the pydoc topics differ between versions).
    """
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, q, a in _qa(seed)]


def builtin_prompts(seed: int = 0) -> list[str]:
    """The user questions of ``builtin_conversations(seed)``, in the same order (RLHF generation prompts)."""
    return [q for _, q, _ in _qa(seed)]


def builtin_preference_pairs(seed: int = 0) -> list[dict]:
    """``{"prompt": question, "chosen": its answer, "rejected": another topic's answer, words shuffled}``
    per section.

    Aligned with ``builtin_conversations(seed)``; the rejected answer is drawn (seeded) from the
    sections of other topics whose passages do not occur in the chosen answer's topics, so it is never
    the chosen text and is off-topic, and its word order is scrambled. Why both: relevance alone is
    not learnable by a tiny model from ~150 pairs (measured: a `tiny` reward model memorised the
    training answers and scored 25% on held-out pairs, whose rejected answers are training answers),
    while well-formedness is a rule a pretrained trunk can judge on unseen text.
    """
    from pydoc_data.topics import topics

    qa = _qa(seed)
    # pydoc repeats passages across topics ("naming" and "execmodel" share sections), so "another
    # topic" means: no topic holding the chosen answer's passage holds the rejected one's.
    texts = {name: " ".join(re.findall(r"\w+", text)) for name, text in topics.items()}
    sources = []
    for name, _, answer in qa:
        head = " ".join(re.findall(r"\w+", answer)[:_SOURCE_WORDS])
        sources.append({n for n, text in texts.items() if head in text} | {name})
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the conversations' draws stay unchanged
    pairs = []
    for (_, question, answer), own in zip(qa, sources):
        others = [j for j, theirs in enumerate(sources) if own.isdisjoint(theirs)]
        words = qa[others[int(rng.integers(len(others)))]][2].split()
        rejected = " ".join(words[i] for i in rng.permutation(len(words)))
        pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return pairs


def split_indices(n: int, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted, disjoint (train, held-out) int64 index arrays.

    The held-out part has ``round(n * eval_fraction)`` indices, at least 1 when ``eval_fraction > 0``
    and ``n > 1``, and at most ``n - 1`` so that training keeps one.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= float(eval_fraction) < 1.0:  # NaN fails too
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    n_eval = 0
    if eval_fraction > 0 and n > 1:
        n_eval = min(max(1, int(round(n * eval_fraction))), n - 1)
    order = np.random.default_rng(seed).permutation(int(n)).astype(np.int64)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


# -- tokenized, cached dataset ---------------------------------------------------------------------

def _records(kind: str, seed: int) -> list:
    if kind == "chat":
        return builtin_conversations(seed)
    if kind == "preference":
        return builtin_preference_pairs(seed)
    raise ValueError(f"unknown built-in dataset kind {kind!r}; valid kinds: {list(BUILTIN_KINDS)}")


def _encode_pair(tokenizer, pair: dict) -> tuple[list[int], list[int], int]:
    """(prompt + chosen ids, prompt + rejected ids, prompt length), as ``launch.preprocess`` encodes a pair."""
    messages = [{"role": "user", "content": pair["prompt"]}]
    sides = []
    for key in ("chosen", "rejected"):
        ids, mask = tokenizer.encode_chat(messages + [{"role": "assistant", "content": pair[key]}])
        # The answer is the trailing run of loss-mask ones; everything before it is the shared prompt.
        zeros = np.flatnonzero(np.asarray(mask) == 0)
        sides.append((ids, int(zeros[-1]) + 1 if zeros.size else 0))
    (chosen, prompt_length), (rejected, _) = sides
    return chosen, rejected, prompt_length


def builtin_dataset_name(kind: str, tokenizer, seed: int = 0) -> str:
    """``builtin-{kind}-v{FORMAT_VERSION}-{tokenizer fingerprint}-{records hash}``: the cached prefix's name.

    The records hash covers the generated text (which changes with the Python version's pydoc topics
    and with ``seed``), so neither another tokenizer nor other text ever reuses a cached file.
    """
    return _name(kind, tokenizer, _records(kind, seed))


def _name(kind: str, tokenizer, records: list) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, kind, records], sort_keys=True).encode()).hexdigest()
    return f"builtin-{kind}-v{FORMAT_VERSION}-{tokenizer.fingerprint()}-{digest[:12]}"


def _files(prefix: PathLike, kind: str) -> list[Path]:
    # The index goes last: a reader that finds PREFIX.idx finds the data it describes.
    return [data_file_path(prefix)] + ([mask_file_path(prefix)] if kind == "chat" else []) + [index_file_path(prefix)]


def builtin_dataset(kind: str, tokenizer, cache_dir: Optional[PathLike] = None, *, seed: int = 0) -> Path:
    """Prefix of the built-in ``kind`` ("chat" or "preference") dataset tokenized by ``tokenizer``.

    Built on the first call into ``cache_dir`` (default ``~/.cache/glm-engine``, as ``default_tokenizer``)
    as ``builtin_dataset_name(...)`` ``.bin``/``.idx`` (+ ``.mask.bin`` for chat); later calls return the
    cached prefix. Safe when several ranks call it at once: each builds under a unique temporary prefix
    and renames its files over the final ones (the contents are identical), the index last. A cached
    entry that does not load (truncated, foreign) is rebuilt.
    """
    records = _records(kind, seed)  # raises for an unknown kind before touching the disk
    directory = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()
    prefix = directory / _name(kind, tokenizer, records)
    if index_file_path(prefix).is_file():
        try:
            IndexedDataset(prefix, tokenizer, kind=kind)
            return prefix
        except DatasetFormatError:
            pass  # a damaged cache entry: build it again
    directory.mkdir(parents=True, exist_ok=True)
    tmp_prefix = directory / f".{prefix.name}.{uuid.uuid4().hex}.tmp"
    try:
        with IndexedDatasetBuilder(tmp_prefix, tokenizer, kind) as builder:
            for record in records:
                if kind == "chat":
                    builder.add_document(*tokenizer.encode_chat(record))
                else:
                    builder.add_pair(*_encode_pair(tokenizer, record))
        for src, dst in zip(_files(tmp_prefix, kind), _files(prefix, kind)):
            os.replace(src, dst)
    finally:
        for leftover in directory.glob(tmp_prefix.name + "*"):
            leftover.unlink(missing_ok=True)
    return prefix


__all__ = ["ANSWER_WORDS", "BUILTIN_KINDS", "FORMAT_VERSION", "builtin_conversations", "builtin_dataset",
           "builtin_dataset_name", "builtin_preference_pairs", "builtin_prompts", "split_indices"]
