"""Sample indices over tokenized documents: GPT-style packing, shuffling and weighted blending.

Pretraining concatenates documents into one token stream and cuts it into samples of
``seq_length + 1`` tokens (``seq_length`` inputs plus the label of the last one). Three arrays
describe that, following the semantics of Megatron's GPT dataset:

``doc_idx`` ``[num_epochs * num_docs]``
    Document ids in reading order: every document once per epoch, shuffled by a seeded numpy RNG.
    When the last epoch is needed only for a small part of its samples it is shuffled on its own
    (``separate_last_epoch``), so that part is not one epoch's documents diluted over all epochs.
``sample_idx`` ``[num_samples + 1, 2]``
    Row ``i`` = (position in ``doc_idx``, token offset in that document) where sample ``i``
    starts; row ``i + 1`` is where it ends, inclusive. Consecutive samples share that one token.
    ``num_samples = (total_tokens - 1) // seq_length``; the partial tail is dropped.
``shuffle_idx`` ``[num_samples]``
    The order in which samples are served (a seeded permutation; with ``separate_last_epoch``
    the samples of the last epoch are permuted among themselves, after the others).

Blending several datasets with weights picks, for each global sample ``i``, the dataset ``d``
maximising ``w[d] * max(i, 1) - taken[d]`` (the one furthest below its share; ties go to the
lowest index), giving ``dataset_index[i] = d`` and ``dataset_sample_index[i] = taken[d]``.

``build_sample_idx`` and ``build_blending_indices`` run in C++ (``engine.data._helpers``, built by
``pip install -e .``) when it is importable and in numpy/Python otherwise; both give identical
arrays. ``backend="cpp"`` insists on C++, ``"python"`` on the fallback, ``"auto"`` picks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

try:  # built by setup.py; every function here has a numpy fallback
    from engine.data import _helpers
except Exception as _error:  # noqa: BLE001 - a missing or broken build must never break imports
    _helpers = None
    _HELPERS_ERROR: Optional[str] = f"{type(_error).__name__}: {_error}"
else:
    _HELPERS_ERROR = None

BACKENDS = ("auto", "cpp", "python")
"""Accepted values of every ``backend=`` argument in this module."""
SEPARATE_LAST_EPOCH_FRACTION = 0.8
"""Megatron's rule: shuffle the last epoch on its own when it supplies fewer than this fraction of an
epoch's samples."""
_INT32_MAX = int(np.iinfo(np.int32).max)


def cpp_available() -> bool:
    """Whether the C++ helpers (``engine.data._helpers``) imported."""
    return _helpers is not None


def _use_cpp(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and _helpers is None:
        raise RuntimeError("backend='cpp' but the C++ data helpers (engine.data._helpers) are not built "
                           f"({_HELPERS_ERROR}); run `pip install -e .` in the repository root to build "
                           "them, or use backend='auto' for the Python fallback")
    return backend != "python" and _helpers is not None


def _int_vector(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.dtype not in (np.int32, np.int64):
        a = a.astype(np.int64)
    return np.ascontiguousarray(a)


# -- sample index ----------------------------------------------------------------------------------

def build_sample_idx(sizes, doc_idx, seq_length: int, backend: str = "auto") -> np.ndarray:
    """``[num_samples + 1, 2]`` sample boundaries (module docstring) of the stream ``sizes[doc_idx]``.

    ``sizes``: tokens per document (int32/int64 ``[num_docs]``); ``doc_idx``: document ids in
    reading order. Returns int32, or int64 when a ``doc_idx`` position or a document size exceeds int32.
    """
    sizes = _int_vector(sizes, "sizes")
    doc_idx = _int_vector(doc_idx, "doc_idx")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    if _use_cpp(backend):
        return _helpers.build_sample_idx(sizes, doc_idx, int(seq_length))
    return _build_sample_idx_numpy(sizes, doc_idx, int(seq_length))


def _build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    if sizes.size and sizes.min() < 0:
        i = int(np.argmin(sizes))
        raise ValueError(f"sizes[{i}] = {sizes[i]} is negative")
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.size):
        i = int(np.flatnonzero((doc_idx < 0) | (doc_idx >= sizes.size))[0])
        raise ValueError(f"doc_idx[{i}] = {doc_idx[i]} is outside [0, {sizes.size})")
    doc_sizes = sizes[doc_idx].astype(np.int64)
    doc_ends = np.cumsum(doc_sizes)                        # exclusive end of each doc_idx position
    total = int(doc_ends[-1]) if doc_ends.size else 0
    num_samples = (total - 1) // seq_length if total > 0 else 0
    wide = doc_idx.size > _INT32_MAX or (sizes.size and int(sizes.max()) > _INT32_MAX)
    out = np.zeros((num_samples + 1, 2), dtype=np.int64 if wide else np.int32)
    # Sample i ends on stream token (i + 1) * seq_length: find the document holding it. side="right"
    # skips empty documents (their end equals the previous one), as the C++ walk steps over them.
    ends = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(doc_ends, ends, side="right")
    out[1:, 0] = pos
    out[1:, 1] = ends - (doc_ends[pos] - doc_sizes[pos])
    return out


def build_document_index(num_documents: int, num_epochs: int, rng: np.random.Generator,
                         separate_last_epoch: bool = False) -> np.ndarray:
    """``doc_idx``: ids ``0..num_documents-1`` once per epoch, shuffled by ``rng`` (int32, or int64 if large).

    With ``separate_last_epoch`` the first ``num_epochs - 1`` epochs are shuffled together and the
    last one on its own, appended after them.
    """
    if num_documents < 0 or num_epochs < 1:
        raise ValueError(f"need num_documents >= 0 and num_epochs >= 1, got {num_documents} and {num_epochs}")
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(num_documents, num_epochs - 1, rng)
        last = build_document_index(num_documents, 1, rng)
        return np.concatenate([first, last.astype(first.dtype)])
    dtype = np.int32 if num_documents * num_epochs <= _INT32_MAX else np.int64
    doc_idx = np.tile(np.arange(num_documents, dtype=dtype), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_shuffle_idx(num_samples: int, total_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation of ``0..num_samples-1`` followed by one of ``num_samples..total_samples-1``.

    uint32 while it fits (half the memory of int64 for large indices), int64 beyond.
    """
    if not 0 <= num_samples <= total_samples:
        raise ValueError(f"need 0 <= num_samples <= total_samples, got {num_samples} and {total_samples}")
    dtype = np.uint32 if total_samples < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_samples:
        return first
    last = np.arange(num_samples, total_samples, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream yields at least ``num_samples`` samples of ``seq_length + 1``."""
    if tokens_per_epoch <= 0:
        raise ValueError(f"the dataset has no tokens (tokens_per_epoch={tokens_per_epoch})")
    # samples(e) = (e * tokens_per_epoch - 1) // seq_length >= num_samples
    #          <=> e * tokens_per_epoch >= num_samples * seq_length + 1
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


@dataclass(frozen=True)
class SampleIndex:
    """The three arrays of a packed pretraining dataset (module docstring) and how they were made."""

    doc_idx: np.ndarray
    """Document ids in reading order, ``[num_epochs * num_docs]``."""
    sample_idx: np.ndarray
    """Sample boundaries, ``[total_samples + 1, 2]`` (doc_idx position, offset)."""
    shuffle_idx: np.ndarray
    """Serving order, ``[total_samples]``; sample ``i`` served is ``shuffle_idx[i]``."""
    num_epochs: int
    """Epochs of the document list covered by ``doc_idx``."""
    separate_last_epoch: bool
    """Whether the last epoch was shuffled on its own."""

    @property
    def total_samples(self) -> int:
        """Samples the index describes (at least the number asked for)."""
        return len(self.sample_idx) - 1


def build_gpt_sample_index(sizes, seq_length: int, num_samples: Optional[int], seed: int,
                           backend: str = "auto") -> SampleIndex:
    """Document, sample and shuffle indices for ``num_samples`` samples (None: one epoch's worth).

    ``sizes[d]`` is the token count of document ``d``. The same (sizes, seq_length, num_samples,
    seed) always give the same arrays, whichever backend builds ``sample_idx``.
    """
    sizes = _int_vector(sizes, "sizes")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    if tokens_per_epoch <= seq_length:
        raise ValueError(f"the dataset has {tokens_per_epoch} tokens, fewer than one sample of "
                         f"seq_length + 1 = {seq_length + 1}")
    per_epoch = (tokens_per_epoch - 1) // seq_length
    if num_samples is None:
        num_samples = per_epoch
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    separate_last_epoch = False
    before_last = 0
    if num_epochs > 1:
        before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        separate_last_epoch = num_samples - before_last < int(SEPARATE_LAST_EPOCH_FRACTION * per_epoch)
    rng = np.random.default_rng(seed)
    doc_idx = build_document_index(len(sizes), num_epochs, rng, separate_last_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, backend=backend)
    total = len(sample_idx) - 1
    shuffle_idx = build_shuffle_idx(before_last if separate_last_epoch else total, total, rng)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx, num_epochs, separate_last_epoch)


# -- blending --------------------------------------------------------------------------------------

def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64 summing to 1; each must be finite and >= 0, and their sum > 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D list, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return np.ascontiguousarray(w / w.sum())


def build_blending_indices(weights: Sequence[float], size: int, backend: str = "auto"
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index [size], dataset_sample_index [size])`` by the greedy rule (module docstring).

    ``weights`` are normalised first. ``dataset_index`` is uint8 for up to 256 datasets, else int32;
    ``dataset_sample_index`` is int64 (the k-th time dataset d is picked it serves its sample k).
    """
    w = normalize_weights(weights)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if _use_cpp(backend):
        return _helpers.build_blending_indices(w, int(size))
    return _build_blending_indices_python(w, int(size))


def _build_blending_indices_python(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(weights)
    dataset_index = np.empty(size, dtype=np.uint8 if k <= 256 else np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    w = weights.tolist()  # Python floats are IEEE doubles: the same arithmetic as the C++ loop
    taken = [0] * k
    for i in range(size):
        scale = float(i) if i > 0 else 1.0
        best, best_error = 0, w[0] * scale - taken[0]
        for d in range(1, k):
            error = w[d] * scale - taken[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, dataset_sample_index


def blended_samples_needed(weights: Sequence[float], size: int, backend: str = "auto") -> list[int]:
    """How many samples each dataset must provide for ``size`` blended samples (exact, from the indices)."""
    dataset_index, _ = build_blending_indices(weights, size, backend=backend)
    return np.bincount(dataset_index, minlength=len(weights)).tolist()


def backend_name(backend: Union[str, None] = "auto") -> str:
    """Which implementation ``backend`` resolves to: ``"cpp"`` or ``"python"``."""
    return "cpp" if _use_cpp(backend or "auto") else "python"


__all__ = ["BACKENDS", "SampleIndex", "backend_name", "blended_samples_needed", "build_blending_indices",
           "build_document_index", "build_gpt_sample_index", "build_sample_idx", "build_shuffle_idx",
           "cpp_available", "normalize_weights", "num_epochs_for"]
