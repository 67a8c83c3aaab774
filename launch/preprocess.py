"""Tokenize JSONL files into an indexed dataset (PREFIX.bin / PREFIX.idx, see engine/data/indexed_dataset.py).

    python -m launch.preprocess --input FILE.jsonl [FILE2.jsonl ...] --output-prefix PREFIX \\
        --kind {text,chat,preference} [--tokenizer PATH|default] [--workers N] [--skip-bad-lines] \\
        [--append-eod] [--quiet]

One JSON object per line (blank lines are ignored):
  text        {"text": "..."}                                  --append-eod ends each document with </s>
  chat        {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
              (ChatGLM3 format; the loss mask covers the assistant replies)
  preference  {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}
              (each answer is an assistant reply to the prompt; both share the prompt tokens)

A malformed line (bad JSON, a missing key, a wrong type) stops the run with FILE:LINE and the reason,
and nothing is written; with --skip-bad-lines it is skipped, counted, and the first few are listed in
the summary. Tokenization runs in --workers processes (order preserved); the summary gives documents,
tokens, skipped lines, seconds and tokens/s.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

KINDS = ("text", "chat", "preference")
MAX_LISTED_BAD_LINES = 5
"""How many skipped lines the summary names."""


class BadLineError(ValueError):
    """A JSONL line that cannot be tokenized; the message starts with FILE:LINE."""


class _BadRecord(Exception):
    """Raised inside the record encoders; becomes a BadLineError (or a skip) with the line's location."""


@dataclass
class PreprocessSummary:
    """What a preprocessing run wrote."""

    output_prefix: str
    """PREFIX of the written PREFIX.bin / PREFIX.idx."""
    documents: int = 0
    """Documents written (pairs, for preference data)."""
    tokens: int = 0
    """Tokens written (both sides of each pair count)."""
    skipped: int = 0
    """Malformed lines skipped (--skip-bad-lines)."""
    bad_lines: list = field(default_factory=list)
    """The first MAX_LISTED_BAD_LINES skipped lines as "FILE:LINE: reason"."""
    seconds: float = 0.0
    """Wall time of the whole run."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens, "
                 f"{self.skipped} skipped lines, {self.seconds:.2f} s, {self.tokens_per_second:,.0f} tokens/s"]
        if self.skipped:
            lines.append("skipped: " + "; ".join(self.bad_lines)
                         + (" ..." if self.skipped > len(self.bad_lines) else ""))
        return "\n".join(lines)


# -- encoding one record ---------------------------------------------------------------------------

def _require(obj: Mapping, key: str, types: tuple, type_names: str):
    if key not in obj:
        raise _BadRecord(f"missing key {key!r} (keys: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, types):
        raise _BadRecord(f"{key!r} is a {type(value).__name__}, expected {type_names}")
    return value


def _encode_chat(tokenizer, messages, what: str):
    try:
        return tokenizer.encode_chat(messages)
    except (TypeError, ValueError, KeyError) as e:
        raise _BadRecord(f"{what}: {e}") from None


def encode_record(obj, kind: str, tokenizer, append_eod: bool = False):
    """Token arrays of one parsed JSONL object.

    text -> (ids int32, None); chat -> (ids int32, loss mask uint8); preference -> (chosen ids,
    rejected ids, prompt length). Raises ``_BadRecord`` with the reason for a malformed object.
    """
    if not isinstance(obj, Mapping):
        raise _BadRecord(f"expected a JSON object, got a JSON {type(obj).__name__}")
    if kind == "text":
        ids = tokenizer.encode(_require(obj, "text", (str,), "a string"))
        if append_eod:
            ids = list(ids) + [tokenizer.eos_id]
        return np.asarray(ids, dtype=np.int32), None
    if kind == "chat":
        messages = _require(obj, "messages", (list,), "a list of messages")
        ids, mask = _encode_chat(tokenizer, messages, "'messages'")
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
    if kind == "preference":
        prompt = _require(obj, "prompt", (str, list), "a string or a list of messages")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        sides = []
        for key in ("chosen", "rejected"):
            answer = _require(obj, key, (str,), "a string")
            ids, mask = _encode_chat(tokenizer, messages + [{"role": "assistant", "content": answer}], repr(key))
            # The answer is the trailing run of loss-mask ones (its body and the closing </s>); what
            # comes before it (history, earlier replies, the <|assistant|> token) is the prompt.
            zeros = np.flatnonzero(np.asarray(mask) == 0)
            sides.append((np.asarray(ids, dtype=np.int32), int(zeros[-1]) + 1 if zeros.size else 0))
        (chosen, p_chosen), (rejected, p_rejected) = sides
        if p_chosen != p_rejected or not np.array_equal(chosen[:p_chosen], rejected[:p_rejected]):
            raise _BadRecord("the tokenizer encoded the prompt differently before the chosen and the rejected answer")
        return chosen, rejected, p_chosen
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# -- workers ---------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer, kind: str, append_eod: bool) -> None:
    _WORKER.update(tokenizer=tokenizer, kind=kind, append_eod=append_eod)


def _encode_line(file_no: int, line_no: int, raw: bytes):
    """One JSONL line -> (result, None) or (None, reason)."""
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRecord(f"not UTF-8 ({e})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _BadRecord(f"invalid JSON ({e})") from None
        return encode_record(obj, _WORKER["kind"], _WORKER["tokenizer"], _WORKER["append_eod"]), None
    except _BadRecord as e:
        return None, str(e)


def _encode_chunk(chunk: list) -> dict:
    """A chunk of (file_no, line_no, raw bytes) lines -> one block of concatenated arrays.

    Shipping one flat token array per chunk instead of one small array per line keeps the parent
    process (which pickles results back and writes them) from becoming the bottleneck.
    """
    errors, sequences, masks, prompt_lengths, nbytes = [], [], [], [], 0
    for file_no, line_no, raw in chunk:
        nbytes += len(raw)
        result, error = _encode_line(file_no, line_no, raw)
        if error is not None:
            errors.append((file_no, line_no, error))
        elif _WORKER["kind"] == "preference":
            sequences += result[:2]
            prompt_lengths.append(result[2])
        else:
            sequences.append(result[0])
            if result[1] is not None:
                masks.append(result[1])
    return {"errors": errors, "nbytes": nbytes,
            "tokens": np.concatenate(sequences) if sequences else np.empty(0, dtype=np.int32),
            "lengths": np.array([len(x) for x in sequences], dtype=np.int64),
            "mask": np.concatenate(masks) if masks else (np.empty(0, np.uint8) if _WORKER["kind"] == "chat" else None),
            "prompt_lengths": np.array(prompt_lengths, dtype=np.int64)}


def _chunks(paths: Sequence[Path], lines_per_chunk: int) -> Iterator[list]:
    chunk = []
    for file_no, path in enumerate(paths):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    chunk.append((file_no, line_no, raw))
                    if len(chunk) == lines_per_chunk:
                        yield chunk
                        chunk = []
    if chunk:
        yield chunk


# -- driver ----------------------------------------------------------------------------------------

def load_tokenizer(spec: str):
    """``"default"`` -> the built-in default tokenizer; anything else -> a tokenizer.model file or its directory."""
    from engine.data.tokenizer import GLMTokenizer, default_tokenizer
    return default_tokenizer() if spec == "default" else GLMTokenizer.from_file(spec)


def preprocess(inputs: Sequence, output_prefix, kind: str, tokenizer, *, workers: int = 1,
               skip_bad_lines: bool = False, append_eod: bool = False, quiet: bool = True,
               chunksize: int = 256) -> PreprocessSummary:
    """Tokenize ``inputs`` (JSONL paths) into ``output_prefix``; see the module docstring.

    ``tokenizer``: any object with encode / encode_chat / vocab_size / eos_id / pad_id / fingerprint()
    (pickled to the workers when ``workers > 1``). ``workers <= 1`` tokenizes in this process.
    ``chunksize``: lines per task; a task's documents come back as one concatenated array.
    """
    from tqdm import tqdm

    from engine.data.indexed_dataset import IndexedDatasetBuilder

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if append_eod and kind != "text":
        raise ValueError("--append-eod applies to --kind text only (chat and preference sequences already end "
                         "with </s>)")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    start = time.perf_counter()
    summary = PreprocessSummary(str(output_prefix))
    progress = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, file=sys.stderr,
                    desc=f"tokenizing ({kind})", disable=quiet or not sys.stderr.isatty())
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer, kind, append_eod))
            blocks = pool.imap(_encode_chunk, _chunks(paths, chunksize))
        else:
            _init_worker(tokenizer, kind, append_eod)
            blocks = map(_encode_chunk, _chunks(paths, chunksize))
        with IndexedDatasetBuilder(output_prefix, tokenizer, kind) as builder:
            for block in blocks:
                progress.update(block["nbytes"])
                for file_no, line_no, error in block["errors"]:
                    where = f"{paths[file_no]}:{line_no}: {error}"
                    if not skip_bad_lines:
                        raise BadLineError(where + " (use --skip-bad-lines to skip such lines)")
                    summary.skipped += 1
                    if len(summary.bad_lines) < MAX_LISTED_BAD_LINES:
                        summary.bad_lines.append(where)
                if kind == "preference":
                    builder.add_pairs(block["tokens"], block["lengths"], block["prompt_lengths"])
                else:
                    builder.add_documents(block["tokens"], block["lengths"], block["mask"])
            summary.documents, summary.tokens = builder.num_documents, builder.num_tokens
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL files, read in order into one dataset")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (+ PREFIX.mask.bin)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--tokenizer", default="default", help="tokenizer.model file or directory, or 'default'")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1: in this process)")
    p.add_argument("--chunksize", type=int, default=256, help="lines per task sent to a worker")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    p.add_argument("--append-eod", action="store_true", help="text: end each document with </s>")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunksize < 1:
        p.error("--workers and --chunksize must be >= 1")
    if args.append_eod and args.kind != "text":
        p.error("--append-eod applies to --kind text only (chat and preference sequences end with </s>)")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        summary = preprocess(args.input, args.output_prefix, args.kind, tokenizer, workers=args.workers,
                             skip_bad_lines=args.skip_bad_lines, append_eod=args.append_eod, quiet=args.quiet,
                             chunksize=args.chunksize)
    except (BadLineError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
