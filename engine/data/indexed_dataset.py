"""Memory-mapped tokenized datasets: ``PREFIX.bin`` (token ids) + ``PREFIX.idx`` (index).

``PREFIX.bin``
    All sequences' token ids back to back, uint16 when the vocab has fewer than 65500 ids, else int32.
``PREFIX.mask.bin`` (chat data)
    The loss mask: one uint8 (0/1) per token, in the same order as ``.bin``, so token ``j`` of the
    token file and byte ``j`` of the mask belong together.
``PREFIX.idx`` (little endian)::

    header  magic b"GLMIDX\\0\\1" | version u32 | dtype code u8 | kind code u8 | flags u8 | pad u8 |
            vocab_size i64 | eos_id i64 | pad_id i64 |
            num_sequences u64 | num_documents u64 | num_tokens u64 | tokenizer fingerprint (32 bytes, NUL padded)
    pointers          int64 [num_sequences]      byte offset of each sequence in .bin
    document_indices  int64 [num_documents + 1]  documents are sequences [d[i], d[i+1])
    sizes             int32 [num_sequences]      tokens per sequence
    prompt_lengths    int32 [num_sequences / 2]  preference data only

Kinds: ``text`` (one sequence per document), ``chat`` (one conversation per document, with a loss
mask), ``preference`` (a document is a pair: sequence ``2i`` = prompt + chosen answer, ``2i + 1`` =
prompt + rejected answer; both start with the same ``prompt_lengths[i]`` tokens).

The reader refuses a dataset written by another tokenizer (fingerprints differ), truncated files and
foreign files, naming the file. ``IndexedDatasetBuilder`` writes to temporary files and renames them
into place on ``finalize()``, so an interrupted run never leaves a half-written dataset under PREFIX.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

MAGIC = b"GLMIDX\x00\x01"
VERSION = 1
KINDS = ("text", "chat", "preference")
"""Data kinds, in code order (the kind code in the header is the position here)."""
_HEADER = struct.Struct("<8sIBBBBqqqQQQ32s")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_FLAG_LOSS_MASK = 1
UINT16_VOCAB_LIMIT = 65500
"""Vocabularies below this size store token ids as uint16 (half the disk and page-cache footprint)."""

PathLike = Union[str, os.PathLike]


class DatasetFormatError(ValueError):
    """A dataset file is missing, truncated, foreign, or was written by another tokenizer."""


def data_file_path(prefix: PathLike) -> Path:
    """``PREFIX.bin``: the token ids."""
    return Path(f"{prefix}.bin")


def index_file_path(prefix: PathLike) -> Path:
    """``PREFIX.idx``: the index."""
    return Path(f"{prefix}.idx")


def mask_file_path(prefix: PathLike) -> Path:
    """``PREFIX.mask.bin``: the loss mask of chat data."""
    return Path(f"{prefix}.mask.bin")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies below ``UINT16_VOCAB_LIMIT`` ids, int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def _tokenizer_fields(tokenizer) -> tuple[int, int, int, str]:
    try:
        return int(tokenizer.vocab_size), int(tokenizer.eos_id), int(tokenizer.pad_id), str(tokenizer.fingerprint())
    except AttributeError as e:
        raise TypeError(f"expected a tokenizer with vocab_size, eos_id, pad_id and fingerprint(), got "
                        f"{type(tokenizer).__name__} ({e})") from None


class IndexedDatasetBuilder:
    """Writes ``PREFIX.bin``/``.idx`` (and ``.mask.bin`` for chat); use as a context manager or call finalize().

    ``add_document(ids, loss_mask=None)`` for text and chat data (chat requires a mask), ``add_pair(chosen,
    rejected, prompt_length)`` for preference data. Token ids are checked against ``[0, vocab_size)``.
    """

    def __init__(self, prefix: PathLike, tokenizer, kind: str = "text"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.prefix = Path(prefix)
        self.kind = kind
        self.vocab_size, self.eos_id, self.pad_id, self.fingerprint = _tokenizer_fields(tokenizer)
        if len(self.fingerprint.encode()) > 32:
            raise ValueError(f"tokenizer fingerprint {self.fingerprint!r} is longer than 32 bytes")
        self.dtype = token_dtype(self.vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._targets = [data_file_path(prefix), index_file_path(prefix)]
        if kind == "chat":
            self._targets.append(mask_file_path(prefix))
        self._temps = [p.with_name(p.name + f".tmp{os.getpid()}") for p in self._targets]
        self._bin = open(self._temps[0], "wb")
        self._mask = open(self._temps[2], "wb") if kind == "chat" else None
        self._sizes: list[int] = []
        self._doc_starts: list[int] = [0]
        self._prompt_lengths: list[int] = []
        self._num_tokens = 0
        self._closed = False

    # -- writing -------------------------------------------------------------------------------

    def _tokens(self, ids, lengths: np.ndarray, what: str) -> np.ndarray:
        """Validated token ids as the storage dtype; ``what(i)`` names sequence ``i`` of this call in errors."""
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"{what(0)}: token ids must be 1-D, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what(0)}: token ids must be integers, got dtype {a.dtype}")
        if (lengths.size and lengths.min() < 0) or int(lengths.sum()) != a.size:
            raise ValueError(f"{what(0)}: lengths {lengths.tolist()[:8]} do not split {a.size} token ids")
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            bad = np.flatnonzero((a < 0) | (a >= self.vocab_size))
            seq = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
            raise ValueError(f"{what(seq)}: token ids {a[bad[:8]].tolist()} are outside "
                             f"[0, vocab_size={self.vocab_size})")
        return a.astype(self.dtype, copy=False)

    def _write_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(tokens.tobytes())
        self._sizes.extend(lengths.tolist())
        self._num_tokens += len(tokens)

    def add_document(self, ids: Sequence[int], loss_mask: Optional[Sequence[int]] = None) -> None:
        """Append one document (one sequence); chat data needs ``loss_mask`` (0/1, same length)."""
        ids = np.asarray(ids)
        self.add_documents(ids, [ids.size], loss_mask)

    def add_documents(self, tokens, lengths: Sequence[int], loss_mask=None) -> None:
        """Append ``len(lengths)`` documents whose ids are concatenated in ``tokens`` (and their masks in
        ``loss_mask``, chat data): the bulk form of ``add_document``."""
        self._check_open()
        if self.kind == "preference":
            raise ValueError("preference datasets take add_pair(chosen, rejected, prompt_length), not add_document")
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        first = self.num_documents
        tokens = self._tokens(tokens, lengths, lambda i: f"document {first + i}")
        if self.kind == "chat":
            if loss_mask is None:
                raise ValueError(f"document {first}: chat data needs a loss_mask")
            mask = np.asarray(loss_mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"document {first}: loss_mask has shape {mask.shape}, token ids {tokens.shape}")
            if mask.size and not np.isin(mask, (0, 1)).all():
                raise ValueError(f"document {first}: loss_mask must hold only 0 and 1")
            self._mask.write(mask.astype(np.uint8).tobytes())
        elif loss_mask is not None:
            raise ValueError(f"a {self.kind} dataset has no loss mask; write chat data with kind='chat'")
        self._write_sequences(tokens, lengths)
        self._doc_starts.extend(range(self._doc_starts[-1] + 1, self._doc_starts[-1] + 1 + len(lengths)))

    def add_pair(self, chosen: Sequence[int], rejected: Sequence[int], prompt_length: int) -> None:
        """Append a preference pair; both sequences begin with the same ``prompt_length`` prompt tokens."""
        chosen, rejected = np.asarray(chosen), np.asarray(rejected)
        self.add_pairs(np.concatenate([chosen.reshape(-1), rejected.reshape(-1)]), [chosen.size, rejected.size],
                       [prompt_length])

    def add_pairs(self, tokens, lengths: Sequence[int], prompt_lengths: Sequence[int]) -> None:
        """Bulk ``add_pair``: ``tokens`` concatenates chosen_0, rejected_0, chosen_1, ...; ``lengths`` has
        two entries per pair and ``prompt_lengths`` one."""
        self._check_open()
        if self.kind != "preference":
            raise ValueError(f"add_pair is for preference datasets; this one is {self.kind!r}")
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        prompts = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
        first = self.num_documents
        if lengths.size != 2 * prompts.size:
            raise ValueError(f"pair {first}: {lengths.size} lengths for {prompts.size} pairs (need two per pair)")
        tokens = self._tokens(tokens, lengths, lambda i: f"pair {first + i // 2} {('chosen', 'rejected')[i % 2]}")
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for k, p in enumerate(prompts.tolist()):
            c_len, r_len = int(lengths[2 * k]), int(lengths[2 * k + 1])
            if not 0 <= p <= min(c_len, r_len):
                raise ValueError(f"pair {first + k}: prompt_length {p} is outside [0, min(len(chosen)={c_len}, "
                                 f"len(rejected)={r_len})]")
            c0, r0 = int(starts[2 * k]), int(starts[2 * k + 1])
            if not np.array_equal(tokens[c0:c0 + p], tokens[r0:r0 + p]):
                raise ValueError(f"pair {first + k}: chosen and rejected differ within the first "
                                 f"prompt_length={p} tokens")
        self._write_sequences(tokens, lengths)
        self._prompt_lengths.extend(prompts.tolist())
        self._doc_starts.extend(range(self._doc_starts[-1] + 2, self._doc_starts[-1] + 2 + 2 * len(prompts), 2))

    @property
    def num_documents(self) -> int:
        """Documents (pairs, for preference data) added so far."""
        return len(self._doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens written so far (both sequences of each pair count)."""
        return self._num_tokens

    # -- finishing -----------------------------------------------------------------------------

    def finalize(self) -> Path:
        """Write the index, close the files and move them to ``PREFIX.*``; returns the ``.idx`` path."""
        self._check_open()
        for f in (self._bin, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence has {sizes.max()} tokens, more than int32 can index")
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        flags = _FLAG_LOSS_MASK if self.kind == "chat" else 0
        header = _HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[self.dtype], KINDS.index(self.kind), flags, 0,
                              self.vocab_size, self.eos_id, self.pad_id, len(sizes), self.num_documents,
                              self._num_tokens, self.fingerprint.encode())
        with open(self._temps[1], "wb") as f:
            f.write(header)
            f.write(pointers.tobytes())
            f.write(np.asarray(self._doc_starts, dtype=np.int64).tobytes())
            f.write(sizes.astype(np.int32).tobytes())
            if self.kind == "preference":
                f.write(np.asarray(self._prompt_lengths, dtype=np.int32).tobytes())
            f.flush()
            os.fsync(f.fileno())
        # The index goes last: a reader that finds PREFIX.idx finds the data it describes.
        for i in (0, 2, 1):
            if i < len(self._targets):
                os.replace(self._temps[i], self._targets[i])
        self._closed = True
        return self._targets[1]

    def abort(self) -> None:
        """Close and delete the temporary files; PREFIX.* is left as it was."""
        if self._closed:
            return
        for f in (self._bin, self._mask):
            if f is not None and not f.closed:
                f.close()
        for p in self._temps:
            if p.exists():
                p.unlink()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the builder for {self.prefix} is already finalized or aborted")

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()


def _expected_size(path: Path, expected: int) -> None:
    if not path.is_file():
        raise DatasetFormatError(f"dataset file {path} does not exist")
    actual = path.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its index says"
        raise DatasetFormatError(f"{path} is {state}: expected {expected} bytes, found {actual}")


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class IndexedDataset:
    """Reader of a dataset written by ``IndexedDatasetBuilder``; token ids come from a read-only memmap.

    ``tokenizer`` (or ``fingerprint``): refuse data tokenized by a different tokenizer. ``kind``:
    refuse a dataset of another kind. ``ds[i]`` is sequence ``i`` (a numpy view, not a copy).
    """

    def __init__(self, prefix: PathLike, tokenizer=None, *, fingerprint: Optional[str] = None,
                 kind: Optional[str] = None):
        self.prefix = Path(prefix)
        idx_path = index_file_path(prefix)
        if not idx_path.is_file():
            raise DatasetFormatError(f"dataset index {idx_path} does not exist (preprocess the data with "
                                     "`python -m launch.preprocess`)")
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
            raise DatasetFormatError(f"{idx_path} is not a glm-engine dataset index (bad magic "
                                     f"{raw[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if len(raw) < _HEADER.size:
            raise DatasetFormatError(f"{idx_path} is truncated: expected at least {_HEADER.size} bytes of "
                                     f"header, found {idx_size}")
        (_, version, dtype_code, kind_code, flags, _, vocab_size, eos_id, pad_id, num_sequences,
         num_documents, num_tokens, fp) = _HEADER.unpack(raw)
        if version != VERSION:
            raise DatasetFormatError(f"{idx_path} has index version {version}; this reader reads version {VERSION}")
        if dtype_code not in _DTYPES or kind_code >= len(KINDS):
            raise DatasetFormatError(f"{idx_path} has an unknown dtype code {dtype_code} or kind code {kind_code}")
        self.kind = KINDS[kind_code]
        self.dtype = _DTYPES[dtype_code]
        self.vocab_size, self.eos_id, self.pad_id = vocab_size, eos_id, pad_id
        self.fingerprint = fp.rstrip(b"\0").decode()
        self.num_tokens = num_tokens
        self.has_loss_mask = bool(flags & _FLAG_LOSS_MASK)
        num_prompts = num_sequences // 2 if self.kind == "preference" else 0
        expected_idx = _HEADER.size + 8 * num_sequences + 8 * (num_documents + 1) + 4 * num_sequences + 4 * num_prompts
        _expected_size(idx_path, expected_idx)

        if kind is not None and kind != self.kind:
            raise DatasetFormatError(f"{idx_path} holds {self.kind} data, but {kind} data is needed here")
        if tokenizer is not None:
            fingerprint = _tokenizer_fields(tokenizer)[3]
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise DatasetFormatError(
                f"{idx_path} was tokenized by the tokenizer with fingerprint {self.fingerprint}, but the given "
                f"tokenizer has fingerprint {fingerprint}: re-run preprocessing with this tokenizer")

        # One read-only map of the index; the arrays are views into it.
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size

        def take(dtype, count):
            nonlocal offset
            a = index[offset:offset + count * np.dtype(dtype).itemsize].view(dtype)
            offset += count * np.dtype(dtype).itemsize
            return a

        self.pointers = take(np.int64, num_sequences)
        """Byte offset of each sequence in ``.bin``, int64 ``[num_sequences]``."""
        self.document_indices = take(np.int64, num_documents + 1)
        """Document ``d`` is sequences ``document_indices[d]:document_indices[d + 1]``."""
        self.sizes = take(np.int32, num_sequences)
        """Tokens per sequence, int32 ``[num_sequences]``."""
        self.prompt_lengths = take(np.int32, num_prompts)
        """Preference data: prompt tokens shared by pair ``i``'s two sequences, int32 ``[num_pairs]``."""

        self.bin_path = data_file_path(prefix)
        _expected_size(self.bin_path, num_tokens * self.dtype.itemsize)
        self._tokens = _memmap(self.bin_path, self.dtype, num_tokens)
        self.mask_path: Optional[Path] = None
        self._mask = None
        if self.has_loss_mask:
            self.mask_path = mask_file_path(prefix)
            _expected_size(self.mask_path, num_tokens)
            self._mask = _memmap(self.mask_path, np.dtype(np.uint8), num_tokens)

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of sequences (twice the number of pairs for preference data)."""
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        """Documents (pairs, for preference data)."""
        return len(self.document_indices) - 1

    def _span(self, idx: int, offset: int, length: Optional[int]) -> tuple[int, int]:
        n = len(self.sizes)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} is out of range for {self.prefix} ({n} sequences)")
        idx %= n
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {idx} of {size} tokens")
        return int(self.pointers[idx]) // self.dtype.itemsize + offset, length

    def __getitem__(self, idx: int) -> np.ndarray:
        """Token ids of sequence ``idx`` (a read-only view of the memmap)."""
        start, length = self._span(idx, 0, None)
        return self._tokens[start:start + length]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``idx`` (to its end when length is None)."""
        start, length = self._span(idx, offset, length)
        return self._tokens[start:start + length]

    def get_loss_mask(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """The loss mask (uint8 0/1) of the same span as ``get``; chat data only."""
        if self._mask is None:
            raise ValueError(f"{self.prefix} holds {self.kind} data, which has no loss mask")
        start, length = self._span(idx, offset, length)
        return self._mask[start:start + length]

    def get_pair(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Preference pair ``i``: (prompt + chosen ids, prompt + rejected ids, prompt length)."""
        if self.kind != "preference":
            raise ValueError(f"{self.prefix} holds {self.kind} data, not preference pairs")
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"pair {i} is out of range for {self.prefix} ({n} pairs)")
        i %= n
        return self[2 * i], self[2 * i + 1], int(self.prompt_lengths[i])

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, kind={self.kind}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype}, "
                f"fingerprint={self.fingerprint})")


__all__ = ["DatasetFormatError", "IndexedDataset", "IndexedDatasetBuilder", "KINDS", "data_file_path",
           "index_file_path", "mask_file_path", "token_dtype"]
