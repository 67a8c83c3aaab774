"""Data pipeline benchmark: ``python -m launch.bench data [options]``.

1. Preprocessing throughput (tokens/s) of ``launch.preprocess`` with 1 and 2 worker processes on a
   generated JSONL file: the paragraphs of ``default_corpus()`` (pydoc topics) repeated to
   ``--corpus-mb``, tokenized by the default tokenizer. Without ``engine.data.tokenizer`` a synthetic
   byte-level tokenizer and synthetic text stand in (the table says which).
2. Sample-index build time for ``--tokens`` tokens in synthetic documents (log-normal sizes, seeded):
   ``build_sample_idx`` in C++ vs the numpy fallback, per sequence length, and the blending indices for
   ``--blend-samples`` samples over three datasets, C++ vs the Python loop.
3. SFT packing: the fraction of row capacity holding real tokens, one padded conversation per row
   (``SFTDataset``) vs ``PackedSFTDataset``, on the built-in conversations per ``--pack-lengths``
   (needs the default tokenizer; the step time of a row is the same either way, so this is the
   speed-up of useful tokens per step).

Prints a markdown table (and writes JSON with ``--json PATH``). Times are the median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class _SyntheticTokenizer:
    """Byte-level tokenizer used only when engine.data.tokenizer is unavailable."""

    vocab_size, eos_id, pad_id = 259, 2, 0

    def fingerprint(self) -> str:
        return "synthetic-bytes"

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode()]

    def encode_chat(self, messages):
        raise NotImplementedError("the synthetic benchmark tokenizer encodes plain text only")


def _corpus_and_tokenizer():
    try:
        from engine.data.tokenizer import default_corpus, default_tokenizer
    except Exception:  # noqa: BLE001 - the benchmark still measures the pipeline without it
        rng = np.random.default_rng(0)
        words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(2000)]
        texts = [" ".join(rng.choice(words, rng.integers(20, 200))) for _ in range(2000)]
        return texts, _SyntheticTokenizer(), "synthetic text, byte tokenizer"
    paragraphs = [p for text in default_corpus() for p in text.split("\n\n") if p.strip()]
    return paragraphs, default_tokenizer(), "pydoc_data.topics paragraphs, default tokenizer (vocab 4096)"


def _write_corpus(path: Path, texts: list[str], megabytes: float) -> int:
    target, written, lines = int(megabytes * 2**20), 0, 0
    with open(path, "w") as f:
        while written < target:
            for t in texts:
                line = json.dumps({"text": t}) + "\n"
                f.write(line)
                written += len(line)
                lines += 1
                if written >= target:
                    break
    return lines


def bench_preprocess(corpus_mb: float, workers_list: list[int], repeats: int) -> list[dict]:
    from launch.preprocess import preprocess
    texts, tokenizer, source = _corpus_and_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        lines = _write_corpus(src, texts, corpus_mb)
        for workers in workers_list:
            runs = [preprocess([src], Path(tmp) / f"out{workers}", "text", tokenizer, workers=workers,
                               append_eod=True, quiet=True) for _ in range(repeats)]
            seconds = statistics.median(r.seconds for r in runs)
            rows.append({"workers": workers, "documents": runs[0].documents, "tokens": runs[0].tokens,
                         "lines": lines, "megabytes": src.stat().st_size / 2**20, "seconds": seconds,
                         "tokens_per_s": runs[0].tokens / seconds, "source": source})
    return rows


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sample_index(tokens: int, seq_lengths: list[int], blend_samples: int, repeats: int) -> list[dict]:
    from engine.data import samples
    rng = np.random.default_rng(0)
    # Log-normal document sizes, median ~ 400 tokens, like web text; trimmed to the token budget.
    sizes = np.maximum(1, rng.lognormal(6.0, 1.0, int(tokens / 400) * 2)).astype(np.int64)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), tokens)) + 1].astype(np.int32)
    doc_idx = samples.build_document_index(len(sizes), 1, rng)
    backends = ["cpp", "python"] if samples.cpp_available() else ["python"]
    rows = []
    for seq_length in seq_lengths:
        results = {}
        for backend in backends:
            results[backend] = samples.build_sample_idx(sizes, doc_idx, seq_length, backend=backend)
            seconds = _median_time(lambda: samples.build_sample_idx(sizes, doc_idx, seq_length, backend=backend),
                                   repeats)
            rows.append({"what": f"build_sample_idx, seq_length {seq_length}", "backend": backend,
                         "documents": len(sizes), "tokens": int(sizes.sum()),
                         "samples": len(results[backend]) - 1, "seconds": seconds})
        if len(results) == 2 and not np.array_equal(results["cpp"], results["python"]):
            raise RuntimeError(f"C++ and Python sample indices differ at seq_length {seq_length}")
    weights = [0.5, 0.3, 0.2]
    for backend in backends:
        seconds = _median_time(lambda: samples.build_blending_indices(weights, blend_samples, backend=backend),
                               max(1, repeats // 2))
        rows.append({"what": "build_blending_indices, 3 datasets", "backend": backend, "documents": None,
                     "tokens": None, "samples": blend_samples, "seconds": seconds})
    return rows


def bench_packing(seq_lengths: list[int]) -> list[dict]:
    from engine.data.builtin import builtin_dataset
    from engine.data.datasets import PackedSFTDataset, SFTDataset
    from engine.data.indexed_dataset import IndexedDataset
    from engine.data.tokenizer import default_tokenizer
    tokenizer = default_tokenizer(None)
    indexed = IndexedDataset(builtin_dataset("chat", tokenizer, None), tokenizer)
    rows = []
    for L in seq_lengths:
        packed, padded = PackedSFTDataset(indexed, L, seed=0), SFTDataset(indexed, L)
        real = int(np.minimum(indexed.sizes, L).sum())
        rows.append({"seq_length": L, "conversations": len(indexed), "mean_tokens": float(indexed.sizes.mean()),
                     "padded_rows": len(padded), "padded_real": real / (len(padded) * L),
                     "packed_rows": len(packed), "packed_real": packed.packing_efficiency})
    return rows


def format_packing(rows: list[dict]) -> str:
    first = rows[0]
    out = [f"SFT packing (built-in conversations: {first['conversations']}, mean {first['mean_tokens']:.0f} tokens):",
           "", "| seq_length | padded rows | real tokens | packed rows | real tokens | useful tokens per step |",
           "|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['seq_length']} | {r['padded_rows']} | {r['padded_real']:.1%} | {r['packed_rows']} | "
            f"{r['packed_real']:.1%} | {r['packed_real'] / r['padded_real']:.2f}x |" for r in rows]
    return "\n".join(out)


def format_tables(pre: list[dict], index: list[dict]) -> str:
    out = [f"Preprocessing ({pre[0]['source']}; {pre[0]['megabytes']:.1f} MB JSONL, {pre[0]['lines']} lines, "
           f"{pre[0]['tokens']:,} tokens):", "",
           "| workers | seconds | tokens/s |", "|---:|---:|---:|"]
    out += [f"| {r['workers']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} |" for r in pre]
    out += ["", f"Index builds ({index[0]['tokens']:,} tokens in {index[0]['documents']:,} synthetic documents):", "",
            "| build | backend | samples | ms |", "|---|---|---:|---:|"]
    out += [f"| {r['what']} | {r['backend']} | {r['samples']:,} | {r['seconds'] * 1e3:.2f} |" for r in index]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=4.0, help="size of the generated JSONL (MiB)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--tokens", type=int, default=10_000_000, help="tokens of the synthetic sample-index corpus")
    p.add_argument("--seq-lengths", default="2048,128", help="comma-separated sequence lengths")
    p.add_argument("--blend-samples", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pack-lengths", default="128,256,512", help="sequence lengths of the SFT packing table")
    p.add_argument("--only", choices=("preprocess", "index", "packing"), help="run one section")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = {}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.only in (None, "preprocess", "index"):
        if args.only != "index":
            out["preprocess"] = bench_preprocess(args.corpus_mb, [int(w) for w in args.workers.split(",")],
                                                 args.repeats)
        if args.only != "preprocess":
            out["index"] = bench_sample_index(args.tokens, [int(s) for s in args.seq_lengths.split(",")],
                                              args.blend_samples, args.repeats)
        if args.only is None:
            print(format_tables(out["preprocess"], out["index"]))
        else:
            print(json.dumps(out, indent=1))
    if args.only in (None, "packing"):
        out["packing"] = bench_packing([int(s) for s in args.pack_lengths.split(",")])
        print(format_packing(out["packing"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
