"""ChatGLM2/3-layout tokenizer: a sentencepiece model with nine special tokens appended after its vocab.

Layout (the one of THUDM's ChatGLM2/3 ``tokenizer.model``): ids ``0 .. n-1`` are the sentencepiece
pieces (``<unk>`` = 0 doubles as the pad token, ``<s>`` = 1, ``</s>`` = 2 is eos), and ids
``n .. n+8`` are, in this order::

    [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>

(ChatGLM3-6B: n = 64789, so ``[gMASK]`` = 64790, ``sop`` = 64792, ``<|user|>`` = 64795.) The special
tokens are not sentencepiece pieces: ``encode`` never produces them from text, so a user who types
``<|assistant|>`` cannot forge a turn boundary.

Chat format (ChatGLM3)::

    [gMASK] sop  {<|role|> enc(metadata + "\\n") enc(content)}*  (</s> | <|assistant|>)

``enc`` is one sentencepiece call (with its dummy-prefix space, as the reference tokenizer does), so
the newline after a role is ``enc("\\n")`` = ``["▁", "<0x0A>"]`` and the content is encoded on its own.
The sequence ends with ``</s>`` for training, or with ``<|assistant|>`` alone when a generation
prompt is asked for: the model itself emits the ``"\\n"`` and the reply, then ``<|user|>``,
``<|observation|>`` or ``</s>`` (``stop_ids``).

Loss mask (ChatGLM3 SFT, ``finetune_hf.process_batch``, which shifts a per-message mask right by one):
1 on every token of an assistant message after its role token (the ``"\\n"`` line and the content)
and on the one token that follows the message (the next role token, or the final ``</s>``); 0
everywhere else, including the ``<|assistant|>`` role token itself, which is part of the prompt.
Unlike ChatGLM3's demo, observation (tool output) tokens are not trained on: they come from the
environment, not the model (GLM-4's fine-tuning script excludes them too).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
"""ChatGLM2/3 special tokens, in id order after the sentencepiece vocab."""
ROLES = ("system", "user", "assistant", "observation")
"""Chat roles; each has the special token ``<|role|>``."""
TOKENIZER_FILE = "tokenizer.model"
"""File name of the sentencepiece model inside a checkpoint or tokenizer directory."""
DEFAULT_VOCAB_SIZE = 4096
"""Total vocab (sentencepiece + specials) of the default tokenizer; equals the ``tiny`` preset's vocab_size."""
DEFAULT_CACHE_DIR = Path("~/.cache/glm-engine")
"""Where ``default_tokenizer`` keeps its trained model unless given a cache_dir."""

# Sentencepiece training options shared by train_tokenizer and the default tokenizer's cache key.
# identity normalisation + no whitespace squeezing + byte fallback: decode(encode(s)) == s for any
# text without U+2581 (sentencepiece's own space symbol). unk=0/bos=1/eos=2 and pad=unk as ChatGLM.
_TRAINER_OPTIONS = dict(
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    split_digits=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    max_sentence_length=1 << 16,
)
# How default_tokenizer trains (part of its cache key). The pydoc corpus is small (465 KB, ~100
# distinct characters), so every character it contains gets a piece.
_DEFAULT_TRAINING = dict(model_type="bpe", character_coverage=1.0)
# Training is deterministic for a fixed corpus and sentencepiece version with one thread and a fixed
# seed (the seed matters for unigram sampling; BPE is deterministic given one thread).
_TRAIN_SEED = 1234


class GLMTokenizer:
    """A sentencepiece model plus the ChatGLM2/3 special tokens; see the module docstring for the format."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        """Build from the serialized sentencepiece model; ``source`` only names it in error messages."""
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError("GLMTokenizer needs the serialized sentencepiece model as bytes, "
                            f"got {type(model_proto).__name__}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(model_proto))
        except RuntimeError as e:  # sentencepiece reports parse failures as RuntimeError
            raise ValueError(f"{source} is not a sentencepiece model: {e}") from None
        if sp.eos_id() < 0:
            raise ValueError(f"{source}: the sentencepiece model has no eos piece (train it with eos_id >= 0)")
        self._proto = bytes(model_proto)
        self._source = source
        self.sp = sp
        """The underlying ``sentencepiece.SentencePieceProcessor`` (ids below ``sp_vocab_size``)."""
        n = sp.get_piece_size()
        self._special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        self._role_ids = {role: self._special_ids[f"<|{role}|>"] for role in ROLES}

    # -- construction / persistence ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "GLMTokenizer":
        """Load ``path`` (a ``tokenizer.model`` file, or a directory holding one)."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        return cls(p.read_bytes(), source=str(p))

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``directory/tokenizer.model`` (created if needed) and return its path."""
        path = Path(directory).expanduser() / TOKENIZER_FILE
        _atomic_write(path, self._proto)
        return path

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model."""
        return self._proto

    def fingerprint(self) -> str:
        """16 hex digits identifying the model bytes and the special-token layout.

        Datasets store it so that data tokenized by another tokenizer is refused, not silently misread.
        """
        h = hashlib.sha256(self._proto)
        h.update(b"\0" + "\0".join(SPECIAL_TOKENS).encode())
        return h.hexdigest()[:16]

    def __getstate__(self) -> dict:
        # SentencePieceProcessor is rebuilt from bytes, so the tokenizer pickles into DataLoader workers.
        return {"model_proto": self._proto, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return (f"GLMTokenizer(vocab_size={self.vocab_size}, sp_vocab_size={self.sp_vocab_size}, "
                f"fingerprint={self.fingerprint()}, source={self._source!r})")

    # -- vocabulary ----------------------------------------------------------------------------

    @property
    def sp_vocab_size(self) -> int:
        """Pieces in the sentencepiece model; the first special token's id."""
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces + special tokens (ChatGLM's ``n_words``); the model may pad beyond it."""
        return self.sp_vocab_size + len(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        """``</s>``: ends a document (pretraining) and a chat sample (SFT)."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id; ChatGLM pads with ``<unk>``."""
        return self.sp.unk_id()

    @property
    def bos_id(self) -> Optional[int]:
        """``<s>`` if the model has one (ChatGLM never inserts it; ``[gMASK] sop`` starts a sequence)."""
        b = self.sp.bos_id()
        return b if b >= 0 else None

    @property
    def special_ids(self) -> dict[str, int]:
        """The nine appended special tokens, name -> id (a copy)."""
        return dict(self._special_ids)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated assistant turn: ``</s>``, ``<|user|>``, ``<|observation|>`` (as ChatGLM3)."""
        return [self.eos_id, self._role_ids["user"], self._role_ids["observation"]]

    def token_to_id(self, name: str) -> int:
        """Id of a special token (``"[gMASK]"``) or a sentencepiece piece (``"</s>"``, ``"▁the"``)."""
        if name in self._special_ids:
            return self._special_ids[name]
        i = self.sp.piece_to_id(name)
        if i == self.sp.unk_id() and name != self.sp.id_to_piece(i):
            raise KeyError(f"{name!r} is neither a special token {list(SPECIAL_TOKENS)} nor a piece of {self._source}")
        return i

    def id_to_token(self, i: int) -> str:
        """Name of a special token or the sentencepiece piece for id ``i``."""
        self._check_ids([i])
        return self._special_names.get(i) or self.sp.id_to_piece(i)

    # -- plain text ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` prefixed by ``[gMASK] sop`` (ChatGLM's prefix)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return self._prefix() + ids if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one sentencepiece call (faster for preprocessing)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] is a {type(t).__name__}, not a str")
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple or 1-D tensor).

        With ``skip_special_tokens`` the appended specials and ``<s>``/``</s>``/pad(``<unk>``) are
        dropped; otherwise they are written by name, e.g. ``"<|user|>"``.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        control = {self.eos_id, self.pad_id} | ({self.bos_id} if self.bos_id is not None else set())
        out, run = [], []
        for i in ids:
            if i in self._special_names or i in control:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._special_names.get(i) or self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # -- chat ----------------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """ChatGLM3 token ids of a conversation and its SFT loss mask (0/1, same length).

        ``messages``: ``[{"role": "system"|"user"|"assistant"|"observation", "content": str}, ...]``;
        an optional ``"metadata"`` str is written on the role line (ChatGLM3 puts a tool name there).
        Ends with ``</s>``, or with ``<|assistant|>`` if ``add_generation_prompt``. The mask is 1 on
        assistant message bodies and on the token right after each assistant message (module docstring).
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"encode_chat expects a list of message dicts, got {type(messages).__name__}")
        if len(messages) == 0:
            raise ValueError("encode_chat: the message list is empty; a conversation needs at least one message")
        ids = self._prefix()
        mask = [0] * len(ids)
        after_assistant = 0  # mask value of the token that follows the previous message
        for index, message in enumerate(messages):
            role, content, metadata = _check_message(index, message)
            ids.append(self._role_ids[role])
            mask.append(after_assistant)
            body = self.sp.encode(metadata + "\n") + self.sp.encode(content)
            is_assistant = int(role == "assistant")
            ids += body
            mask += [is_assistant] * len(body)
            after_assistant = is_assistant
        ids.append(self._role_ids["assistant"] if add_generation_prompt else self.eos_id)
        mask.append(after_assistant)
        return ids, mask

    def encode_prompt(self, text: str, system: Optional[str] = None) -> list[int]:
        """Generation prompt for one user turn (after an optional system message), ending in ``<|assistant|>``."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": text})
        return self.encode_chat(messages, add_generation_prompt=True)[0]

    # -- helpers -------------------------------------------------------------------------------

    def _prefix(self) -> list[int]:
        return [self._special_ids["[gMASK]"], self._special_ids["sop"]]

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside [0, vocab_size={self.vocab_size})")


def _check_message(index: int, message) -> tuple[str, str, str]:
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{index}] is a {type(message).__name__}, not a dict with 'role' and 'content'")
    if "role" not in message or "content" not in message:
        raise ValueError(f"messages[{index}] needs keys 'role' and 'content', has {sorted(message)}")
    role, content, metadata = message["role"], message["content"], message.get("metadata", "")
    if role not in ROLES:
        raise ValueError(f"messages[{index}] has unknown role {role!r}; expected one of {list(ROLES)}")
    if not isinstance(content, str):
        raise TypeError(f"messages[{index}] ({role}) content is a {type(content).__name__}, not a str")
    if not isinstance(metadata, str):
        raise TypeError(f"messages[{index}] ({role}) metadata is a {type(metadata).__name__}, not a str")
    return role, content, metadata


def _atomic_write(path: Path, data: bytes) -> None:
    # Several ranks may write the same cached model at once: write a temp file, then rename over.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _training_lines(texts) -> list[str]:
    # sentencepiece learns from lines: split documents so newlines reach the model only as the
    # <0x0A> byte piece, as in ChatGLM's tokenizer.
    if isinstance(texts, (str, bytes)):
        raise TypeError("train_tokenizer expects an iterable of texts, got a single string (wrap it in a list)")
    lines = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"train_tokenizer: text {i} is a {type(t).__name__}, not a str")
        lines.extend(line for line in t.splitlines() if line.strip())
    if not lines:
        raise ValueError("train_tokenizer: the corpus has no non-blank lines")
    return lines


def _model_path(model_prefix_or_path: Union[str, os.PathLike]) -> Path:
    p = Path(model_prefix_or_path).expanduser()
    if p.is_dir() or str(model_prefix_or_path).endswith(("/", os.sep)):
        return p / TOKENIZER_FILE
    if p.suffix == ".model":
        return p
    return p.with_name(p.name + ".model")  # sentencepiece's prefix convention


def train_tokenizer(texts_or_iterator: Iterable[str], vocab_size: int,
                    model_prefix_or_path: Union[str, os.PathLike, None] = None, *,
                    model_type: str = "bpe", character_coverage: float = 1.0,
                    num_threads: int = 1) -> GLMTokenizer:
    """Train a sentencepiece model (ChatGLM layout) on texts and return its tokenizer.

    ``vocab_size`` is the *total* vocab, special tokens included: the sentencepiece model gets
    ``vocab_size - 9`` pieces, so ``train_tokenizer(texts, 4096).vocab_size == 4096``.
    ``model_prefix_or_path``: a directory (writes ``dir/tokenizer.model``), a ``*.model`` file, or a
    sentencepiece prefix (writes ``prefix.model``); None keeps the model in memory only.
    ``model_type``: "bpe" (ChatGLM's) or "unigram". ``character_coverage``: fraction of characters
    that get their own piece (sentencepiece suggests 0.9995 for large CJK corpora); the rest fall
    back to bytes. With ``num_threads=1`` the model bytes are a function of the texts, the options
    and the sentencepiece version.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    sp_vocab = vocab_size - len(SPECIAL_TOKENS)
    if sp_vocab < 256 + 3 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold 256 byte pieces, <unk> <s> </s>, "
                         f"at least one learned piece and the {len(SPECIAL_TOKENS)} special tokens (>= 269)")
    lines = _training_lines(texts_or_iterator)
    buf = io.BytesIO()
    spm.set_random_generator_seed(_TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type=model_type, vocab_size=sp_vocab,
            character_coverage=character_coverage, num_threads=num_threads, minloglevel=2, **_TRAINER_OPTIONS)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size} "
                         f"({sp_vocab} sentencepiece pieces + {len(SPECIAL_TOKENS)} specials) on "
                         f"{len(lines)} lines: {e}") from None
    tokenizer = GLMTokenizer(buf.getvalue(), source="<trained>")
    if model_prefix_or_path is not None:
        path = _model_path(model_prefix_or_path)
        _atomic_write(path, tokenizer.model_proto)
        tokenizer._source = str(path)
    return tokenizer


def default_corpus() -> list[str]:
    """The English texts of ``pydoc_data.topics`` (shipped with Python), sorted by topic name."""
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def default_tokenizer(cache_dir: Union[str, os.PathLike, None] = None,
                      vocab_size: int = DEFAULT_VOCAB_SIZE) -> GLMTokenizer:
    """The built-in tokenizer of the tiny model: BPE trained on ``default_corpus()``, cached on disk.

    Trained once per (corpus, options, sentencepiece version, vocab_size) into ``cache_dir``
    (default ``~/.cache/glm-engine``); later calls load the cached file. The corpus differs between
    Python versions, and so then do the model and its fingerprint.
    """
    corpus = default_corpus()
    key = hashlib.sha256()
    for text in corpus:
        key.update(text.encode() + b"\0")
    key.update(repr((sorted(_TRAINER_OPTIONS.items()), sorted(_DEFAULT_TRAINING.items()), _TRAIN_SEED,
                     spm.__version__, vocab_size)).encode())
    directory = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()
    path = directory / f"default-tokenizer-{vocab_size}-{key.hexdigest()[:12]}.model"
    if path.is_file():
        try:
            return GLMTokenizer.from_file(path)
        except ValueError:
            pass  # a corrupt cache entry (e.g. a disk filled up mid-write elsewhere): train it again
    return train_tokenizer(corpus, vocab_size, path, **_DEFAULT_TRAINING)
