"""Data pipeline: indexed files, preprocessing CLI, sample/blending indices (C++ vs Python vs reference),
datasets, bucket balancing and the resumable data-parallel iterator."""
import json

import numpy as np
import pytest
import torch

from engine.data import samples
from engine.data.datasets import (IGNORE_INDEX, BlendedDataset, DataIterator, MicroBatchSampler,
                                  PreferenceDataset, PretrainDataset, SFTDataset, bucket_balance, collate)
from engine.data.indexed_dataset import (DatasetFormatError, IndexedDataset, IndexedDatasetBuilder,
                                         data_file_path, index_file_path, mask_file_path)
from launch import preprocess as preprocess_cli

needs_cpp = pytest.mark.skipif(not samples.cpp_available(),
                               reason="engine.data._helpers is not built (pip install -e . builds it; CI does)")


class StandInTokenizer:
    """Byte-level tokenizer with the GLMTokenizer interface the data pipeline uses (no sentencepiece).

    ids: 0 pad, 2 eos, 3 + byte for text; 259.. the chat specials. The chat format and loss mask follow
    GLMTokenizer.encode_chat: [gMASK] sop {<|role|> "\\n" content}* </s>; mask 1 on assistant bodies and
    on the token after each assistant message.
    """

    pad_id, eos_id = 0, 2
    ROLES = {"system": 261, "user": 262, "assistant": 263, "observation": 264}

    def __init__(self, vocab_size=300, name="stand-in-v1"):
        self.vocab_size, self.name = vocab_size, name

    def fingerprint(self):
        return self.name

    def encode(self, text):
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return [3 + b for b in text.encode()]

    def encode_chat(self, messages):
        if not isinstance(messages, list) or not messages:
            raise TypeError("encode_chat expects a non-empty list of messages")
        ids, mask, after_assistant = [259, 260], [0, 0], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in self.ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] is not a valid message")
            body = self.encode("\n" + m["content"])
            is_assistant = int(m["role"] == "assistant")
            ids += [self.ROLES[m["role"]]] + body
            mask += [after_assistant] + [is_assistant] * len(body)
            after_assistant = is_assistant
        return ids + [self.eos_id], mask + [after_assistant]


TOK = StandInTokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _random_sizes(rng, n, max_size=40, empty_fraction=0.15):
    sizes = rng.integers(1, max_size, n)
    sizes[rng.random(n) < empty_fraction] = 0
    return sizes.astype(np.int32)


# -- sample index and blending -----------------------------------------------------------------------

def _reference_sample_idx(sizes, doc_idx, seq_length):
    """Token by token: write down (doc_idx position, offset) of every token of the stream, then read
    sample i's last token at stream position (i + 1) * seq_length."""
    stream = [(pos, off) for pos, d in enumerate(doc_idx) for off in range(sizes[d])]
    num_samples = (len(stream) - 1) // seq_length if stream else 0
    return np.array([(0, 0)] + [stream[(i + 1) * seq_length] for i in range(num_samples)]).reshape(-1, 2)


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_sample_idx_matches_token_by_token_reference(backend):
    rng = np.random.default_rng(0)
    for trial in range(30):
        sizes = _random_sizes(rng, int(rng.integers(1, 30)))
        sizes[0] = 0 if trial % 3 == 0 else sizes[0]     # an empty first document keeps row 0 at (0, 0)
        doc_idx = samples.build_document_index(len(sizes), int(rng.integers(1, 4)), rng)
        seq_length = int(rng.integers(1, 25))
        got = samples.build_sample_idx(sizes, doc_idx, seq_length, backend=backend)
        np.testing.assert_array_equal(got, _reference_sample_idx(sizes, doc_idx, seq_length))


@needs_cpp
def test_sample_idx_cpp_equals_python_on_random_configs():
    rng = np.random.default_rng(1)
    configs = [(int(rng.integers(1, 3000)), int(rng.integers(1, 600)), int(rng.integers(1, 6)), dtype)
               for dtype in (np.int32, np.int64) for _ in range(6)]
    for num_docs, seq_length, epochs, dtype in configs:
        sizes = _random_sizes(rng, num_docs, max_size=900).astype(dtype)
        doc_idx = samples.build_document_index(num_docs, epochs, rng).astype(dtype)
        cpp = samples.build_sample_idx(sizes, doc_idx, seq_length, backend="cpp")
        py = samples.build_sample_idx(sizes, doc_idx, seq_length, backend="python")
        assert cpp.dtype == py.dtype == np.int32
        np.testing.assert_array_equal(cpp, py)


@needs_cpp
def test_blending_cpp_equals_python_on_random_configs():
    rng = np.random.default_rng(2)
    weight_sets = [[1.0], [0.5, 0.5], [0.3, 0.2, 0.5], [1, 0, 3], [1 / 3, 1 / 3, 1 / 3]]
    weight_sets += [rng.random(int(rng.integers(2, 9))).tolist() for _ in range(5)]
    weight_sets.append(rng.random(300).tolist())                  # > 256 datasets: int32 dataset_index
    for weights in weight_sets:
        size = int(rng.integers(0, 4000))
        cpp = samples.build_blending_indices(weights, size, backend="cpp")
        py = samples.build_blending_indices(weights, size, backend="python")
        for a, b in zip(cpp, py):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        assert cpp[0].dtype == (np.uint8 if len(weights) <= 256 else np.int32)


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_sample_idx_switches_to_int64_for_huge_documents(backend):
    sizes = np.array([2**31 + 5, 7], dtype=np.int64)      # one document longer than int32 can offset
    got = samples.build_sample_idx(sizes, np.array([1, 0, 1]), 2**30, backend=backend)
    assert got.dtype == np.int64
    assert got.tolist() == [[0, 0], [1, 2**30 - 7], [1, 2**31 - 7]]


def test_sample_idx_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        samples.build_sample_idx([3, 4], [0, 2], 2, backend="python")
    with pytest.raises(ValueError, match="seq_length"):
        samples.build_sample_idx([3, 4], [0, 1], 0)
    if samples.cpp_available():
        with pytest.raises(ValueError, match="outside"):
            samples.build_sample_idx([3, 4], [0, 2], 2, backend="cpp")


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_blending_shares_track_weights(backend):
    weights = np.array([0.5, 0.3, 0.2])
    dataset_index, dataset_sample_index = samples.build_blending_indices(weights, 1000, backend=backend)
    counts = np.zeros(3, dtype=int)
    for i, d in enumerate(dataset_index):
        assert dataset_sample_index[i] == counts[d]          # the k-th pick of d serves its sample k
        counts[d] += 1
        assert np.all(np.abs(counts - weights * (i + 1)) <= 1.0 + 1e-9), (i, counts)
    # by hand: errors w * max(i, 1) - taken at i = 0..4 pick 0, 1, 2, then 0 (.5 > -.1), then 1 (.2 > 0)
    assert dataset_index[:5].tolist() == [0, 1, 2, 0, 1]


def test_explicit_cpp_backend_without_build_says_how_to_build(monkeypatch):
    monkeypatch.setattr(samples, "_helpers", None)
    with pytest.raises(RuntimeError, match=r"pip install -e \."):
        samples.build_sample_idx([5, 5], [0, 1], 3, backend="cpp")
    assert samples.backend_name("auto") == "python"
    assert samples.build_sample_idx([5, 5], [0, 1], 3).tolist() == [[0, 0], [0, 3], [1, 1], [1, 4]]
    with pytest.raises(ValueError, match="backend"):
        samples.build_blending_indices([1.0], 3, backend="fast")


def test_gpt_sample_index_epochs_and_shuffle():
    sizes = np.full(10, 11, dtype=np.int32)                   # 110 tokens per epoch, 10 samples of 11
    one = samples.build_gpt_sample_index(sizes, 10, None, seed=3)
    assert (one.num_epochs, one.total_samples, one.separate_last_epoch) == (1, 10, False)
    assert sorted(one.shuffle_idx.tolist()) == list(range(10))
    again = samples.build_gpt_sample_index(sizes, 10, None, seed=3)
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(one, name), getattr(again, name))
    assert not np.array_equal(one.doc_idx, samples.build_gpt_sample_index(sizes, 10, None, seed=4).doc_idx)
    # 12 samples need a second epoch that gives only 2 of its ~11: it is shuffled separately, at the end.
    two = samples.build_gpt_sample_index(sizes, 10, 12, seed=3)
    assert two.num_epochs == 2 and two.separate_last_epoch and two.total_samples >= 12
    assert sorted(two.doc_idx[:10].tolist()) == list(range(10)) == sorted(two.doc_idx[10:].tolist())
    first_epoch = ((1 * 110) - 1) // 10
    assert sorted(two.shuffle_idx[:first_epoch].tolist()) == list(range(first_epoch))
    full = samples.build_gpt_sample_index(sizes, 10, 20, seed=3)   # 20 samples use 90% of epoch 2: mixed
    assert full.num_epochs == 2 and not full.separate_last_epoch
    with pytest.raises(ValueError, match="fewer than one sample"):
        samples.build_gpt_sample_index([3, 2], 10, None, seed=0)


# -- indexed files -----------------------------------------------------------------------------------

def _build(prefix, kind, tok=TOK, docs=()):
    with IndexedDatasetBuilder(prefix, tok, kind) as b:
        for doc in docs:
            (b.add_pair if kind == "preference" else b.add_document)(*doc)
    return prefix


def test_round_trip_text_chat_preference(tmp_path):
    rng = np.random.default_rng(5)
    texts = [rng.integers(0, 300, int(n)).tolist() for n in (5, 0, 17, 1)]
    ds = IndexedDataset(_build(tmp_path / "text", "text", docs=[(t,) for t in texts]), TOK, kind="text")
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == 4 and ds.num_tokens == 23
    assert [ds[i].tolist() for i in range(4)] == texts and ds[-2].tolist() == texts[2]
    assert ds.get(2, 3, 4).tolist() == texts[2][3:7] and ds.get(2, 15).tolist() == texts[2][15:]
    with pytest.raises(IndexError):
        ds.get(0, 3, 4)

    chats = [TOK.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}])
             for c in ("yes", "a longer reply")]
    chat = IndexedDataset(_build(tmp_path / "chat", "chat", docs=chats), TOK)
    assert chat.has_loss_mask and mask_file_path(tmp_path / "chat").is_file()
    for i, (ids, mask) in enumerate(chats):
        assert chat[i].tolist() == ids and chat.get_loss_mask(i).tolist() == mask
    assert chat.get_loss_mask(1, 2, 5).tolist() == chats[1][1][2:7]

    pairs = [([1, 2, 3, 4, 5], [1, 2, 3, 9], 3), ([7, 8], [7, 8, 9, 10, 11, 12], 2)]
    pref = IndexedDataset(_build(tmp_path / "pref", "preference", docs=pairs), TOK, kind="preference")
    assert len(pref) == 4 and pref.num_documents == 2
    for i, (c, r, p) in enumerate(pairs):
        got = pref.get_pair(i)
        assert (got[0].tolist(), got[1].tolist(), got[2]) == (c, r, p)

    big = StandInTokenizer(vocab_size=70000)                         # >= 65500 ids: int32 storage
    wide = IndexedDataset(_build(tmp_path / "wide", "text", big, docs=[([69999, 0, 65535],)]), big)
    assert wide.dtype == np.int32 and wide[0].tolist() == [69999, 0, 65535]


def test_builder_validates_and_leaves_nothing_behind_on_error(tmp_path):
    prefix = tmp_path / "x"
    with pytest.raises(ValueError, match=r"document 1: token ids \[300\] are outside \[0, vocab_size=300\)"):
        _build(prefix, "text", docs=[([1, 2],), ([5, 300],)])
    assert not index_file_path(prefix).exists() and not data_file_path(prefix).exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="loss_mask"):
        _build(prefix, "chat", docs=[([1, 2],)])
    with pytest.raises(ValueError, match="differ within the first prompt_length"):
        _build(prefix, "preference", docs=[([1, 2, 3], [1, 5, 3], 2)])
    with IndexedDatasetBuilder(prefix, TOK, "preference") as b:                # the bulk form names the pair
        with pytest.raises(ValueError, match="pair 1 rejected: token ids"):
            b.add_pairs([1, 2, 1, 3, 4, 4, 999], [2, 2, 2, 1], [1, 0])
        b.add_pairs([1, 2, 1, 3, 4, 4, 9], [2, 2, 2, 1], [1, 0])
    assert IndexedDataset(prefix, TOK).get_pair(1)[1].tolist() == [9]


def test_fingerprint_mismatch_is_refused(tmp_path):
    prefix = _build(tmp_path / "d", "text", docs=[([1, 2, 3],)])
    other = StandInTokenizer(name="other-tokenizer")
    with pytest.raises(DatasetFormatError) as e:
        IndexedDataset(prefix, other)
    msg = str(e.value)
    assert "stand-in-v1" in msg and "other-tokenizer" in msg and str(index_file_path(prefix)) in msg
    with pytest.raises(DatasetFormatError, match="holds text data"):
        IndexedDataset(prefix, TOK, kind="chat")


@pytest.mark.parametrize("which", ["bin", "idx", "mask"])
def test_truncated_files_are_refused_with_sizes(tmp_path, which):
    chats = [TOK.encode_chat([{"role": "assistant", "content": "x" * n}]) for n in (10, 20)]
    prefix = _build(tmp_path / "d", "chat", docs=chats)
    path = {"bin": data_file_path, "idx": index_file_path, "mask": mask_file_path}[which](prefix)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(DatasetFormatError) as e:
        IndexedDataset(prefix, TOK)
    assert str(path) in str(e.value) and "truncated" in str(e.value)
    assert f"expected {size} bytes, found {size - 3}" in str(e.value)


def test_bad_magic_is_refused(tmp_path):
    prefix = _build(tmp_path / "d", "text", docs=[([1, 2, 3],)])
    raw = bytearray(index_file_path(prefix).read_bytes())
    raw[:4] = b"MMID"
    index_file_path(prefix).write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match="bad magic"):
        IndexedDataset(prefix)


# -- preprocessing -----------------------------------------------------------------------------------

TEXT_ROWS = [{"text": "The first document."}, {"text": "Second, a little longer document here."},
             {"text": ""}, {"text": "ünïcode and 中文"}]
CHAT_ROWS = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye!"}]}]
PREF_ROWS = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I cannot say, sorry."},
             {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Count to three."}],
              "chosen": "1, 2, 3", "rejected": "1"}]


def _check_preprocessed(prefix, kind, tok):
    ds = IndexedDataset(prefix, tok, kind=kind)
    if kind == "text":
        expected = [tok.encode(r["text"]) + [tok.eos_id] for r in TEXT_ROWS]
        assert [ds[i].tolist() for i in range(len(ds))] == expected
    elif kind == "chat":
        for i, row in enumerate(CHAT_ROWS):
            ids, mask = tok.encode_chat(row["messages"])
            assert ds[i].tolist() == list(ids) and ds.get_loss_mask(i).tolist() == list(mask)
    else:
        for i, row in enumerate(PREF_ROWS):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            chosen, rejected, p = ds.get_pair(i)
            assert chosen.tolist() == tok.encode_chat(prompt + [{"role": "assistant", "content": row["chosen"]}])[0]
            assert rejected.tolist() == tok.encode_chat(prompt + [{"role": "assistant", "content": row["rejected"]}])[0]
            # the answer (everything after the prompt) is exactly what the loss mask trains on
            mask = tok.encode_chat(prompt + [{"role": "assistant", "content": row["chosen"]}])[1]
            assert p > 0 and mask[p - 1] == 0 and all(mask[p:])
    return ds


@pytest.mark.parametrize("kind,rows", [("text", TEXT_ROWS), ("chat", CHAT_ROWS), ("preference", PREF_ROWS)])
def test_preprocess_each_kind_with_stand_in(tmp_path, kind, rows):
    src = _write_jsonl(tmp_path / "in.jsonl", rows[:1] + [""] + rows[1:])   # a blank line is ignored
    summary = preprocess_cli.preprocess([src], tmp_path / "out" / "d", kind, TOK, append_eod=kind == "text")
    ds = _check_preprocessed(tmp_path / "out" / "d", kind, TOK)
    assert summary.documents == len(rows) == ds.num_documents and summary.tokens == ds.num_tokens
    assert summary.skipped == 0


def test_bad_line_names_file_and_line_or_is_skipped(tmp_path, capsys):
    good = {"text": "fine"}
    a = _write_jsonl(tmp_path / "a.jsonl", [good, good])
    b = _write_jsonl(tmp_path / "b.jsonl", [good, "{not json", good, {"text": 7}, {"txt": "x"}, ["a list"]])
    prefix = tmp_path / "out"
    with pytest.raises(preprocess_cli.BadLineError, match=rf"{b}:2: invalid JSON"):
        preprocess_cli.preprocess([a, b], prefix, "text", TOK)
    assert not index_file_path(prefix).exists() and not data_file_path(prefix).exists()
    summary = preprocess_cli.preprocess([a, b], prefix, "text", TOK, skip_bad_lines=True)
    assert (summary.documents, summary.skipped) == (4, 4)
    assert [line.split(": ")[0] for line in summary.bad_lines] == [f"{b}:{n}" for n in (2, 4, 5, 6)]
    assert "'text' is a int, expected a string" in summary.bad_lines[1]
    assert "missing key 'text'" in summary.bad_lines[2] and "JSON object" in summary.bad_lines[3]
    assert "4 skipped lines" in summary.format() and f"{b}:4" in summary.format()
    assert len(IndexedDataset(prefix, TOK)) == 4
    bad_chat = _write_jsonl(tmp_path / "c.jsonl", [CHAT_ROWS[0], {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(preprocess_cli.BadLineError, match=rf"{bad_chat}:2: 'messages'"):
        preprocess_cli.preprocess([bad_chat], prefix, "chat", TOK)
    # one line per task: the second task holds only the bad line, and skipping it leaves an empty block
    summary = preprocess_cli.preprocess([bad_chat], prefix, "chat", TOK, skip_bad_lines=True, chunksize=1)
    assert (summary.documents, summary.skipped) == (1, 1) and len(IndexedDataset(prefix, TOK)) == 1


def test_preprocess_cli_with_default_tokenizer(tmp_path, capsys):
    tokenizer_module = pytest.importorskip("engine.data.tokenizer", reason="engine.data.tokenizer not written yet")
    tok = tokenizer_module.default_tokenizer()
    for kind, rows in (("text", TEXT_ROWS), ("chat", CHAT_ROWS), ("preference", PREF_ROWS)):
        src = _write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        argv = ["--input", str(src), "--output-prefix", str(tmp_path / kind), "--kind", kind, "--quiet",
                "--tokenizer", "default"]
        if kind == "text":                       # two worker processes, one line per task: order is kept
            argv += ["--append-eod", "--workers", "2", "--chunksize", "1"]
        assert preprocess_cli.main(argv) == 0
        out = capsys.readouterr().out
        assert f"{len(rows)} documents" in out and "tokens/s" in out
        _check_preprocessed(tmp_path / kind, kind, tok)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{oops"])
    argv = ["--input", str(bad), "--output-prefix", str(tmp_path / "bad"), "--kind", "text", "--quiet"]
    assert preprocess_cli.main(argv) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert preprocess_cli.main(argv + ["--skip-bad-lines"]) == 0
    assert "1 skipped lines" in capsys.readouterr().out


# -- datasets ----------------------------------------------------------------------------------------

@pytest.fixture
def text_dataset(tmp_path):
    rng = np.random.default_rng(7)
    docs = [rng.integers(3, 250, int(n)).tolist() + [TOK.eos_id] for n in rng.integers(0, 30, 40)]
    return IndexedDataset(_build(tmp_path / "pre", "text", docs=[(d,) for d in docs]), TOK), docs


def test_pretrain_samples_are_windows_of_the_shuffled_stream(text_dataset, tmp_path):
    indexed, docs = text_dataset
    ds = PretrainDataset(indexed, seq_length=16, num_samples=100, seed=1)
    stream = np.concatenate([docs[d] for d in ds.index.doc_idx])
    assert ds.index.num_epochs > 1 and len(ds) == 100
    for i in range(len(ds)):
        j = int(ds.index.shuffle_idx[i])
        window = stream[j * 16: j * 16 + 17]
        item = ds[i]
        assert item["input_ids"].dtype == np.int64 and item["input_ids"].shape == (16,)
        np.testing.assert_array_equal(item["input_ids"], window[:-1])
        expected_labels = np.where(window[:-1] == TOK.eos_id, IGNORE_INDEX, window[1:])   # no loss across EOD
        np.testing.assert_array_equal(item["labels"], expected_labels)
    plain = PretrainDataset(indexed, 16, 100, seed=1, eod_mask_loss=False)
    np.testing.assert_array_equal(plain[3]["labels"], plain.tokens(3)[1:])
    cached = PretrainDataset(indexed, 16, 100, seed=1, cache_dir=tmp_path / "cache")
    reloaded = PretrainDataset(indexed, 16, 100, seed=1, cache_dir=tmp_path / "cache", backend="python")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(cached.index, name), getattr(ds.index, name))
        assert isinstance(getattr(reloaded.index, name), np.memmap)          # loaded, not rebuilt
    np.testing.assert_array_equal(reloaded[5]["input_ids"], ds[5]["input_ids"])


def test_sft_labels_follow_loss_mask_with_padding_and_truncation(tmp_path):
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xyz"}]
    ids, mask = TOK.encode_chat(msgs)                                        # 12 tokens
    assert len(ids) == 12
    indexed = IndexedDataset(_build(tmp_path / "sft", "chat", docs=[(ids, mask)]), TOK)
    long = SFTDataset(indexed, seq_length=20)[0]
    assert long["input_ids"].tolist() == ids + [TOK.pad_id] * 8
    assert long["attention_mask"].tolist() == [1] * 12 + [0] * 8
    expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(11)] + [IGNORE_INDEX] * 9
    assert long["labels"].tolist() == expected
    assert sum(label != IGNORE_INDEX for label in expected) == 5             # "\n", "xyz" and </s>
    short = SFTDataset(indexed, seq_length=10)
    assert short.num_truncated == 1
    assert short[0]["input_ids"].tolist() == ids[:10] and short[0]["labels"].tolist() == expected[:10]
    with pytest.raises(ValueError, match="chat data"):
        SFTDataset(IndexedDataset(_build(tmp_path / "t", "text", docs=[([1, 2],)]), TOK), 8)


def test_preference_dataset_items(tmp_path):
    pairs = [([1, 2, 3, 4, 5], [1, 2, 3, 9], 3), ([7, 8], [7, 8, 9, 10, 11, 12], 2)]
    indexed = IndexedDataset(_build(tmp_path / "p", "preference", docs=pairs), TOK)
    ds = PreferenceDataset(indexed, seq_length=5)
    assert ds.pair_lengths().tolist() == [[5, 4], [2, 6]]
    item = ds[1]
    assert item["chosen_input_ids"].tolist() == [7, 8, 0, 0, 0]
    assert item["chosen_attention_mask"].tolist() == [1, 1, 0, 0, 0]
    assert item["rejected_input_ids"].tolist() == [7, 8, 9, 10, 11] and int(item["rejected_length"]) == 5
    assert int(item["prompt_length"]) == 2
    assert PreferenceDataset(indexed, 5, indices=[1])[0]["chosen_length"] == 2
    batch = collate([ds[0], ds[1]])
    assert batch["rejected_input_ids"].shape == (2, 5) and batch["prompt_length"].tolist() == [3, 2]


def test_bucket_balance_equalises_longer_wins_and_loses_per_bucket():
    rng = np.random.default_rng(11)
    n = 2000
    chosen = rng.integers(10, 400, n)
    # a length-biased preference set: the chosen answer tends to be the longer one
    rejected = np.where(rng.random(n) < 0.75, chosen - rng.integers(0, 150, n), chosen + rng.integers(1, 150, n))
    lengths = np.stack([chosen, np.maximum(rejected, 1)], axis=1)
    result = bucket_balance(lengths, num_buckets=5, seed=0)
    diff = np.abs(lengths[:, 0] - lengths[:, 1])
    kept = result.kept
    assert len(np.unique(kept)) == len(kept) and len(result.buckets) == 5
    assert result.ties == int((diff == 0).sum()) > 0 and np.all(np.isin(np.flatnonzero(diff == 0), kept))
    for b in result.buckets:
        in_bucket = kept[(diff[kept] >= b.low) & (diff[kept] < b.high) & (diff[kept] > 0)]
        wins = int((lengths[in_bucket, 0] > lengths[in_bucket, 1]).sum())
        loses = len(in_bucket) - wins
        assert wins == loses == b.kept_per_side == min(b.longer_wins, b.longer_loses)
        assert b.longer_wins > b.longer_loses > 0                            # the bias was there before
    assert np.array_equal(bucket_balance(lengths, num_buckets=5, seed=0).kept, kept)
    assert not np.array_equal(bucket_balance(lengths, num_buckets=5, seed=1).kept, kept)
    # explicit edges, and the winner flag given separately from the column order
    swapped = lengths[:, ::-1]
    explicit = bucket_balance(swapped, winner_is_longer=lengths[:, 0] > lengths[:, 1], bucket_edges=[20, 80],
                              seed=0, keep_ties=False)
    assert [(b.low, b.high) for b in explicit.buckets] == [(0.0, 20.0), (20.0, 80.0), (80.0, np.inf)]
    assert len(explicit.kept) == 2 * sum(b.kept_per_side for b in explicit.buckets)


def test_blended_dataset_maps_to_the_right_items():
    a, b = [("a", i) for i in range(80)], [("b", i) for i in range(40)]
    blended = BlendedDataset([a, b], [2, 1], 90)
    items = [blended[i] for i in range(90)]
    assert [x for x in items if x[0] == "a"] == a[:60] and [x for x in items if x[0] == "b"] == b[:30]
    assert samples.blended_samples_needed([2, 1], 90) == [60, 30]
    with pytest.raises(ValueError, match="dataset 1 must provide 50 samples but has 40"):
        BlendedDataset([a, b], [1, 1], 100)


# -- data-parallel iteration and resume --------------------------------------------------------------

def test_dp_ranks_read_disjoint_slices_of_each_global_batch():
    dp_size, mbs = 3, 2
    samplers = [MicroBatchSampler(40, mbs, r, dp_size, shuffle=True, seed=5, num_epochs=2) for r in range(dp_size)]
    per_step = list(zip(*samplers))
    assert len(per_step) == 2 * (40 // 6) == len(MicroBatchSampler(40, mbs, 0, dp_size, num_epochs=2))
    for step, batches in enumerate(per_step[:6]):                            # epoch 0: 6 global micro batches
        flat = [i for batch in batches for i in batch]
        assert len(set(flat)) == len(flat) == dp_size * mbs
    epoch0 = [i for batches in per_step[:6] for batch in batches for i in batch]
    assert len(set(epoch0)) == 36 and set(epoch0) <= set(range(40))
    order = samplers[0].epoch_order(0)
    assert [i for batch in per_step[0] for i in batch] == order[:6].tolist()   # rank r takes slice r
    assert samplers[0].epoch_order(1).tolist() != order.tolist()


def test_sampler_resume_continues_identically():
    full = MicroBatchSampler(23, 2, 1, 2, shuffle=True, seed=9, num_epochs=3)
    reference = list(full)
    interrupted = MicroBatchSampler(23, 2, 1, 2, shuffle=True, seed=9, num_epochs=3)
    head = [next(interrupted) for _ in range(7)]                              # crosses the epoch boundary (5/epoch)
    state = interrupted.state_dict()
    assert state["consumed_samples"] == 7 * 4
    resumed = MicroBatchSampler(23, 2, 1, 2, shuffle=True, seed=9, num_epochs=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))                   # survives a JSON round trip
    assert head + list(resumed) == reference
    with pytest.raises(ValueError, match="seed"):
        MicroBatchSampler(23, 2, 1, 2, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_micro_batch"):
        MicroBatchSampler(23, 2, 0, 3, shuffle=True, seed=9).load_state_dict(state)
    # the same global micro batch on another layout resumes too: 4 ranks x 1 sample
    ranks = [MicroBatchSampler(23, 1, r, 4, shuffle=True, seed=9, num_epochs=3) for r in range(4)]
    for s in ranks:
        s.load_state_dict(state)
    assert [x for s in ranks[2:] for x in next(s)] == reference[7]


def test_data_iterator_resume_gives_the_same_batches(text_dataset):
    indexed, _ = text_dataset
    ds = PretrainDataset(indexed, seq_length=8, num_samples=64, seed=2)
    it = DataIterator.for_rank(ds, micro_batch_size=2, dp_rank=1, dp_size=2)
    batches = [next(it) for _ in range(3)]
    assert batches[0]["input_ids"].shape == (2, 8) and batches[0]["input_ids"].dtype == torch.int64
    state = it.state_dict()
    expected = [next(it) for _ in range(4)]
    resumed = DataIterator.for_rank(ds, micro_batch_size=2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert resumed.consumed_samples == 12
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        for key in ("input_ids", "labels"):
            assert torch.equal(want[key], got[key])
    other_rank = DataIterator.for_rank(ds, micro_batch_size=2, dp_rank=0, dp_size=2)
    assert not torch.equal(next(other_rank)["input_ids"], batches[0]["input_ids"])
    assert len(resumed) == 64 // 4 - 7
