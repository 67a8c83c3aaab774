"""GLMTokenizer: ChatGLM2/3 layout, chat format and loss mask, training, caching and errors."""
import pickle

import pytest
import sentencepiece as spm
import torch

import engine.data.tokenizer as tokenizer_module
from engine.config import load_config
from engine.data.tokenizer import (SPECIAL_TOKENS, GLMTokenizer, default_corpus, default_tokenizer,
                                   train_tokenizer)

ROUND_TRIP_TEXTS = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, double  spaces and a trailing space ",
    "tabs\tand\nnewlines\n\n\r\nend\n",
    "def f(x):\n    return x ** 2  # squared\n",
    "numbers 1234567890 and 3.14159e-10",
    "héllo wörld, façade, naïve",            # Latin-1 letters not in the training text
    "中文分词测试，日本語のテキスト，한국어",   # CJK: byte fallback
    "emoji 🤖🚀 and combining e\u0301 and RTL עברית",
    "<|user|> [gMASK] sop are plain text here",
]

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable sequence."},
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 600-token BPE tokenizer trained on a few pydoc topics, saved to disk."""
    d = tmp_path_factory.mktemp("small")
    tok = train_tokenizer(default_corpus()[:12], 600, d)
    return tok, d


@pytest.fixture(scope="module")
def raw_sp(small):
    """The same model loaded straight into sentencepiece, independent of GLMTokenizer."""
    return spm.SentencePieceProcessor(model_file=str(small[1] / "tokenizer.model"))


@pytest.fixture(scope="module")
def default_tok(tmp_path_factory):
    cache = tmp_path_factory.mktemp("default-cache")
    return default_tokenizer(cache_dir=cache), cache


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(small, text):
    tok, _ = small
    ids = tok.encode(text)
    assert all(0 <= i < tok.sp_vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == text


def test_unicode_goes_through_byte_fallback(small):
    tok, _ = small
    pieces = [tok.id_to_token(i) for i in tok.encode("中🤖")]
    # 3 UTF-8 bytes for 中, 4 for the emoji, each its own <0xNN> piece
    assert sum(p.startswith("<0x") for p in pieces) == 7
    assert tok.token_to_id("<0xE4>") in tok.encode("中")


def test_encode_equals_sentencepiece(small, raw_sp):
    tok, _ = small
    for text in ROUND_TRIP_TEXTS:
        assert tok.encode(text) == raw_sp.encode(text)
        assert tok.encode(text, add_special_tokens=True) == [tok.token_to_id("[gMASK]"), tok.token_to_id("sop")] \
            + raw_sp.encode(text)
    assert tok.encode_batch(ROUND_TRIP_TEXTS) == [raw_sp.encode(t) for t in ROUND_TRIP_TEXTS]


def test_special_token_layout(small, raw_sp):
    tok, d = small
    n = raw_sp.get_piece_size()
    assert tok.sp_vocab_size == n == 600 - 9
    assert tok.vocab_size == 600
    assert tok.special_ids == {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert list(tok.special_ids) == ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    for name, i in tok.special_ids.items():
        assert i >= n and tok.token_to_id(name) == i and tok.id_to_token(i) == name
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("<unk>") == 0
    assert tok.stop_ids == [2, n + 6, n + 8]
    # text never turns into special ids, so user input cannot forge a turn boundary
    assert not set(tok.encode("<|assistant|> [gMASK] sop eop")) & set(tok.special_ids.values())
    reloaded = GLMTokenizer.from_file(d)
    assert reloaded.special_ids == tok.special_ids and reloaded.vocab_size == tok.vocab_size


def test_chatglm3_special_ids():
    # ChatGLM3-6B's sentencepiece model has 64789 pieces; its published ids are [gMASK]=64790,
    # sop=64792, <|user|>=64795, <|assistant|>=64796, <|observation|>=64797, n_words=64798.
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(train_tokenizer(["a tiny corpus of text"], 300).model_proto)
    for k in range(64789 - len(proto.pieces)):
        proto.pieces.add(piece=f"<filler{k}>", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    tok = GLMTokenizer(proto.SerializeToString())
    assert tok.sp_vocab_size == 64789 and tok.vocab_size == 64798
    ids = tok.special_ids
    assert (ids["[MASK]"], ids["[gMASK]"], ids["sop"], ids["<|system|>"], ids["<|user|>"], ids["<|assistant|>"],
            ids["<|observation|>"]) == (64789, 64790, 64792, 64794, 64795, 64796, 64797)
    assert tok.stop_ids == [2, 64795, 64797]


def test_decode_special_tokens(small):
    tok, _ = small
    ids, _ = tok.encode_chat(CONVERSATION[1:3])
    assert tok.decode(ids, skip_special_tokens=False) == \
        "[gMASK]sop<|user|>\n What is a list?<|assistant|>\n A mutable sequence.</s>"
    assert tok.decode(ids) == "\n What is a list?\n A mutable sequence."
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode([tok.pad_id] * 3 + tok.encode("ok")) == "ok"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


def test_encode_chat_matches_hand_built_sequence(small, raw_sp):
    tok, _ = small
    sid = tok.special_ids
    enc = raw_sp.encode
    nl = enc("\n")
    assert [raw_sp.id_to_piece(i) for i in nl] == ["▁", "<0x0A>"]  # the reference's role-line newline

    def turn(role, content):
        return [sid[f"<|{role}|>"]] + nl + enc(content)

    expected = [sid["[gMASK]"], sid["sop"]]
    expected_mask = [0, 0]
    for m in CONVERSATION:
        seg = turn(m["role"], m["content"])
        expected += seg
        if m["role"] == "assistant":
            # role token stays unmasked (prompt); "\n" + content are trained
            expected_mask += [0] + [1] * (len(seg) - 1)
        else:
            expected_mask += [0] * len(seg)
    expected.append(tok.eos_id)
    expected_mask.append(1)  # eos ends the final assistant turn
    # the <|user|> after the first assistant answer ends that turn: it is trained too
    first_user_after_assistant = 2 + len(turn("system", CONVERSATION[0]["content"])) \
        + len(turn("user", CONVERSATION[1]["content"])) + len(turn("assistant", CONVERSATION[2]["content"]))
    assert expected[first_user_after_assistant] == sid["<|user|>"]
    expected_mask[first_user_after_assistant] = 1

    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids == expected
    assert mask == expected_mask
    # the masked tokens are exactly the two answers' bodies plus the token ending each answer
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == nl + enc("A mutable sequence.") + [sid["<|user|>"]] \
        + nl + enc("An immutable sequence.") + [tok.eos_id]


def test_encode_chat_observation_metadata_and_consecutive_roles(small, raw_sp):
    tok, _ = small
    sid = tok.special_ids
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "metadata": "get_weather", "content": "{}"},
            {"role": "observation", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}]
    ids, mask = tok.encode_chat(msgs)
    e = raw_sp.encode
    call = e("get_weather\n") + e("{}")
    expected = [sid["[gMASK]"], sid["sop"], sid["<|user|>"], *e("\n"), *e("weather?"),
                sid["<|assistant|>"], *call, sid["<|observation|>"], *e("\n"), *e("sunny"),
                sid["<|assistant|>"], *e("\n"), *e("Sunny."), tok.eos_id]
    assert ids == expected
    trained = [i for i, m in zip(ids, mask) if m]
    # tool call and the <|observation|> that ends it are trained; the tool output is not
    assert trained == call + [sid["<|observation|>"]] + e("\n") + e("Sunny.") + [tok.eos_id]


def test_generation_prompt(small):
    tok, _ = small
    sid = tok.special_ids
    prompt, pmask = tok.encode_chat(CONVERSATION[:4], add_generation_prompt=True)
    assert prompt[-1] == sid["<|assistant|>"] and tok.eos_id not in prompt
    assert len(pmask) == len(prompt) and pmask[-1] == 0
    # the prompt is a prefix of the training sequence for the full conversation
    full, _ = tok.encode_chat(CONVERSATION)
    assert full[:len(prompt)] == prompt
    assert tok.encode_prompt("And a tuple?") == \
        tok.encode_chat([{"role": "user", "content": "And a tuple?"}], add_generation_prompt=True)[0]
    assert tok.encode_prompt("hi", system="Be brief.") == tok.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True)[0]


def test_fingerprint(small, tmp_path):
    tok, d = small
    fp = tok.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert GLMTokenizer.from_file(d / "tokenizer.model").fingerprint() == fp
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.fingerprint() == fp and copy.encode("pickled") == tok.encode("pickled")
    tok.save(tmp_path)
    assert GLMTokenizer.from_file(tmp_path).fingerprint() == fp
    other_vocab = train_tokenizer(default_corpus()[:12], 601)
    other_text = train_tokenizer(default_corpus()[12:24], 600)
    assert len({fp, other_vocab.fingerprint(), other_text.fingerprint()}) == 3


def test_unigram_model_round_trips():
    tok = train_tokenizer(default_corpus()[:12], 600, model_type="unigram")
    assert tok.vocab_size == 600
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_train_tokenizer_output_paths(tmp_path):
    texts = default_corpus()[:3]
    train_tokenizer(texts, 400, tmp_path / "prefix")
    assert (tmp_path / "prefix.model").is_file()
    train_tokenizer(texts, 400, tmp_path / "named.model")
    assert (tmp_path / "named.model").is_file()
    (tmp_path / "dir").mkdir()
    tok = train_tokenizer(texts, 400, tmp_path / "dir")
    assert GLMTokenizer.from_file(tmp_path / "dir").fingerprint() == tok.fingerprint()


def test_default_corpus():
    corpus = default_corpus()
    from pydoc_data.topics import topics
    assert corpus == [topics[k] for k in sorted(topics)]
    assert len(corpus) > 50 and all(isinstance(t, str) and t for t in corpus)


def test_default_tokenizer_matches_tiny_config(default_tok):
    tok, _ = default_tok
    cfg = load_config("tiny")
    assert tok.vocab_size == cfg.vocab_size == 4096
    assert tok.sp_vocab_size == 4087
    assert tok.pad_id == cfg.pad_token_id and [tok.eos_id] == cfg.eos_token_id
    text = default_corpus()[0][:500]
    assert tok.decode(tok.encode(text)) == text
    # trained on English: far fewer tokens than bytes
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_default_tokenizer_deterministic_and_cached(default_tok, tmp_path, monkeypatch):
    tok, cache = default_tok
    again = default_tokenizer(cache_dir=tmp_path)  # a second training in another directory
    assert again.model_proto == tok.model_proto
    assert again.fingerprint() == tok.fingerprint()
    cached = list(cache.glob("*.model"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("default_tokenizer retrained although the cache holds the model")

    with monkeypatch.context() as m:
        m.setattr(tokenizer_module, "train_tokenizer", no_training)
        assert default_tokenizer(cache_dir=cache).fingerprint() == tok.fingerprint()
    # a corrupt cache entry is replaced by a fresh training
    cached[0].write_bytes(b"truncated")
    assert default_tokenizer(cache_dir=cache).fingerprint() == tok.fingerprint()
    assert cached[0].read_bytes() == tok.model_proto


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        GLMTokenizer.from_file(tmp_path / "nowhere.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        GLMTokenizer.from_file(tmp_path)  # a directory without tokenizer.model
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a sentencepiece model"):
        GLMTokenizer.from_file(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        GLMTokenizer.from_file(empty)


def test_chat_errors(small):
    tok, _ = small
    with pytest.raises(ValueError, match="empty"):
        tok.encode_chat([])
    with pytest.raises(ValueError, match=r"messages\[1\] has unknown role 'robot'"):
        tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match=r"messages\[0\] needs keys 'role' and 'content'"):
        tok.encode_chat([{"role": "user", "text": "hi"}])
    with pytest.raises(TypeError, match=r"messages\[0\] \(user\) content"):
        tok.encode_chat([{"role": "user", "content": None}])
    with pytest.raises(TypeError, match="list of message dicts"):
        tok.encode_chat({"role": "user", "content": "hi"})
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(KeyError, match="neither a special token"):
        tok.token_to_id("<|tool|>")


def test_train_errors():
    with pytest.raises(TypeError, match="single string"):
        train_tokenizer("one long document", 400)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["some text"], 200)
    with pytest.raises(ValueError, match="no non-blank lines"):
        train_tokenizer(["", "  \n\n"], 400)
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer(["tiny corpus"], 4096)
