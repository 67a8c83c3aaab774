"""Built-in SFT / reward-model / RLHF data (engine.data.builtin): records, split, cached indexed datasets."""
import os
import re
import threading

import numpy as np
import pytest

from engine.data.builtin import (ANSWER_WORDS, builtin_conversations, builtin_dataset, builtin_dataset_name,
                                 builtin_preference_pairs, builtin_prompts, split_indices)
from engine.data.datasets import IGNORE_INDEX, PreferenceDataset, SFTDataset, bucket_balance
from engine.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path, mask_file_path
from engine.data.tokenizer import default_corpus, default_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return default_tokenizer(cache_dir=tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin-cache")


def _words(text):
    return set(re.findall(r"[a-z_]{4,}", text.lower()))


# -- records ---------------------------------------------------------------------------------------

def test_records_are_deterministic_and_aligned():
    convs, pairs, prompts = builtin_conversations(), builtin_preference_pairs(), builtin_prompts()
    assert convs == builtin_conversations() and pairs == builtin_preference_pairs() and prompts == builtin_prompts()
    assert len(convs) == len(pairs) == len(prompts) >= 100
    assert builtin_conversations(seed=1) != convs  # the seed picks phrasings and answer budgets
    assert len(set(prompts)) == len(prompts)  # a question names exactly one answer
    for conv, pair, prompt in zip(convs, pairs, prompts):
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert conv[0]["content"] == pair["prompt"] == prompt
        assert conv[1]["content"] == pair["chosen"]


def test_answers_are_clean_and_short():
    for conv in builtin_conversations():
        answer = conv[1]["content"]
        assert answer == " ".join(answer.split())  # whitespace-normalized
        assert 8 <= len(answer.split()) <= ANSWER_WORDS[1] + 1  # + the "..." of a clipped sentence
        assert "::=" not in answer  # no grammar rules
        assert re.search(r"[.!?][\"')\u201d]*$", answer), answer


def test_preference_pairs_reward_relevance_not_length():
    from pydoc_data.topics import topics
    pairs = builtin_preference_pairs()
    corpus_words = [(name, _words(text)) for name, text in topics.items()]
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert isinstance(pair["prompt"], str) and pair["chosen"] != pair["rejected"]
        # the chosen answer is text of the topic the question is about: some topic contains all its
        # words, and the rejected answer comes from another topic
        chosen = _words(pair["chosen"])
        assert any(chosen <= words for _, words in corpus_words), pair["chosen"]
    lengths = np.array([[len(p["chosen"].split()), len(p["rejected"].split())] for p in pairs])
    longer_wins, longer_loses = (lengths[:, 0] > lengths[:, 1]).sum(), (lengths[:, 0] < lengths[:, 1]).sum()
    assert min(longer_wins, longer_loses) >= len(pairs) // 4, (longer_wins, longer_loses)


def test_rejected_is_a_scrambled_off_topic_answer():
    from pydoc_data.topics import topics
    pairs = builtin_preference_pairs()
    # compare word sequences: the answers drop emphasis markup and rejoin words wrapped at hyphens
    texts = [" ".join(re.findall(r"\w+", t)) for t in topics.values()]

    def topics_containing(answer):
        head = " ".join(re.findall(r"\w+", answer)[:8])
        return {i for i, t in enumerate(texts) if head in t}

    by_words = {tuple(sorted(p["chosen"].split())): p["chosen"] for p in pairs}
    scrambled = 0
    for pair in pairs:
        source = by_words[tuple(sorted(pair["rejected"].split()))]  # the answer whose words were shuffled
        chosen, other = topics_containing(pair["chosen"]), topics_containing(source)
        assert source != pair["chosen"] and chosen and other and not chosen <= other, pair
        scrambled += pair["rejected"] != source
    assert scrambled >= len(pairs) - 2  # a shuffle can leave a very short answer in order


# -- split -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction", [(163, 0.1), (10, 0.25), (2, 0.01), (5, 0.99), (7, 0.0), (1, 0.5), (0, 0.3)])
def test_split_indices(n, fraction):
    train, held_out = split_indices(n, fraction, seed=3)
    assert train.dtype == held_out.dtype == np.int64
    assert np.intersect1d(train, held_out).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])), np.arange(n))
    if fraction > 0 and n > 1:
        assert 1 <= len(held_out) <= n - 1
    else:
        assert len(held_out) == 0
    again = split_indices(n, fraction, seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], held_out)


def test_split_indices_seed_and_errors():
    assert not np.array_equal(split_indices(100, 0.2, seed=0)[1], split_indices(100, 0.2, seed=1)[1])
    assert len(split_indices(100, 0.2)[1]) == 20
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_indices(10, bad, 0)
    with pytest.raises(ValueError, match="n must be"):
        split_indices(-1, 0.1, 0)


# -- cached indexed datasets -----------------------------------------------------------------------

def test_chat_dataset_trains_only_on_answers(tok, cache):
    prefix = builtin_dataset("chat", tok, cache_dir=cache)
    indexed = IndexedDataset(prefix, tok, kind="chat")
    convs = builtin_conversations()
    assert indexed.num_documents == len(convs)
    ds = SFTDataset(indexed, 256)
    assert ds.num_truncated == 0 and SFTDataset(indexed, 128).num_truncated <= len(convs) // 20
    assistant = tok.special_ids["<|assistant|>"]
    for i in range(0, len(ds), 7):
        item = ds[i]
        labelled = np.flatnonzero(item["labels"] != IGNORE_INDEX)
        start = int(np.flatnonzero(item["input_ids"] == assistant)[0])
        # loss from the <|assistant|> position (predicting the reply's first token) to the closing </s>
        np.testing.assert_array_equal(labelled, np.arange(start, start + len(labelled)))
        assert item["labels"][labelled[-1]] == tok.eos_id
        assert tok.decode(item["labels"][labelled]).strip() == convs[i][1]["content"]


def test_preference_dataset_loads_and_balances(tok, cache):
    prefix = builtin_dataset("preference", tok, cache_dir=cache)
    indexed = IndexedDataset(prefix, tok, kind="preference")
    pairs = builtin_preference_pairs()
    ds = PreferenceDataset(indexed, 256)
    assert len(ds) == len(pairs)
    item = ds[0]
    p = int(item["prompt_length"])
    np.testing.assert_array_equal(item["chosen_input_ids"][:p], item["rejected_input_ids"][:p])
    assert tok.decode(item["chosen_input_ids"][p:item["chosen_length"]]).strip() == pairs[0]["chosen"]
    assert tok.decode(item["rejected_input_ids"][p:item["rejected_length"]]).strip() == pairs[0]["rejected"]
    assert (ds.pair_lengths().max(axis=1) <= 256).all()
    balance = bucket_balance(ds.pair_lengths())
    assert len(balance.kept) >= len(pairs) // 2


def test_cache_reuse_and_tokenizer_key(tok, tmp_path):
    prefix = builtin_dataset("chat", tok, cache_dir=tmp_path)
    assert prefix.parent == tmp_path and prefix.name == builtin_dataset_name("chat", tok)
    assert f"-{tok.fingerprint()}-" in prefix.name and "-v1-" in prefix.name
    files = [data_file_path(prefix), mask_file_path(prefix), index_file_path(prefix)]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert builtin_dataset("chat", tok, cache_dir=tmp_path) == prefix
    assert [f.stat().st_mtime_ns for f in files] == stamps  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)  # no temp files left
    # another tokenizer never reuses the file
    other = train_tokenizer(default_corpus()[:15], 512)
    other_prefix = builtin_dataset("chat", other, cache_dir=tmp_path)
    assert other_prefix != prefix
    IndexedDataset(other_prefix, other, kind="chat")
    # a damaged cache entry is rebuilt
    data_file_path(prefix).write_bytes(b"\0\0")
    assert builtin_dataset("chat", tok, cache_dir=tmp_path) == prefix
    IndexedDataset(prefix, tok, kind="chat")


def test_concurrent_builders_agree(tok, tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(builtin_dataset("preference", tok, cache_dir=tmp_path))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert IndexedDataset(results[0], tok, kind="preference").num_documents == len(builtin_preference_pairs())
    assert not [name for name in os.listdir(tmp_path) if "tmp" in name]


def test_unknown_kind(tok, tmp_path):
    with pytest.raises(ValueError, match="'text'.*chat.*preference"):
        builtin_dataset("text", tok, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
