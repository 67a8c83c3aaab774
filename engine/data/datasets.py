"""Training datasets over ``IndexedDataset`` files, length balancing for reward data, and a resumable
data-parallel iterator.

Every dataset returns numpy int64 arrays of length ``seq_length`` with labels already shifted:
``labels[t]`` is the token that position ``t`` must predict, ``-100`` (``IGNORE_INDEX``) where no
loss is taken, matching ``kernels.cross_entropy(logits, labels)``.

- ``PretrainDataset``: documents packed into a token stream and cut into samples (``samples.py``).
- ``SFTDataset``: one conversation per sample, truncated or right-padded; loss only where the chat
  loss mask is 1 (assistant replies).
- ``PreferenceDataset``: (prompt + chosen, prompt + rejected) pairs for reward models and DPO.
- ``BlendedDataset``: several datasets mixed by weight (Megatron's greedy rule, ``samples.py``).
- ``bucket_balance``: ChatGLM-RLHF's bucket-based length balancing of preference pairs.
- ``MicroBatchSampler`` / ``DataIterator``: each data-parallel rank reads its own slice of every
  global micro batch; the position (consumed samples) is saved and restored with the checkpoint.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from engine.data.indexed_dataset import IndexedDataset
from engine.data.samples import (SampleIndex, build_blending_indices, build_gpt_sample_index,
                                 normalize_weights)

IGNORE_INDEX = -100
"""Label of positions that take no loss (``torch.nn.functional.cross_entropy``'s default ignore_index)."""
_INDEX_CACHE_VERSION = 1


# -- pretraining -----------------------------------------------------------------------------------

class PretrainDataset:
    """Packed next-token samples: ``{"input_ids", "labels"}``, each int64 ``[seq_length]``.

    Each sequence of ``indexed`` is a document; documents are shuffled per epoch, concatenated and cut
    into ``seq_length + 1``-token windows (``samples.build_gpt_sample_index``), and the windows are
    served in a seeded shuffled order. With ``eod_mask_loss`` the position whose input is the
    end-of-document token takes no loss: its next token starts an unrelated document.
    ``num_samples=None`` gives one epoch. ``cache_dir`` keeps the index arrays as ``.npy`` files so
    later runs (and other ranks) load them instead of rebuilding.
    """

    def __init__(self, indexed: IndexedDataset, seq_length: int, num_samples: Optional[int] = None,
                 seed: int = 0, *, eod_mask_loss: bool = True, backend: str = "auto",
                 cache_dir: Union[str, os.PathLike, None] = None):
        if indexed.kind == "preference":
            raise ValueError(f"{indexed.prefix} holds preference pairs; pretrain on text or chat data")
        self.indexed = indexed
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.eod_mask_loss = eod_mask_loss
        self.eod_id = indexed.eos_id
        key = None
        if cache_dir is not None:
            key = Path(cache_dir) / _index_cache_key(indexed, self.seq_length, num_samples, self.seed)
        index = _load_index(key) if key is not None else None
        if index is None:
            index = build_gpt_sample_index(indexed.sizes, self.seq_length, num_samples, self.seed, backend=backend)
            if key is not None:
                _save_index(key, index)
        self.index: SampleIndex = index
        self.num_samples = index.total_samples if num_samples is None else int(num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of served sample ``i`` (int64)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} is out of range ({self.num_samples} samples)")
        j = int(self.index.shuffle_idx[i % self.num_samples])
        (first, first_offset), (last, last_offset) = self.index.sample_idx[j], self.index.sample_idx[j + 1]
        doc_idx = self.index.doc_idx
        if first == last:
            return self.indexed.get(int(doc_idx[first]), int(first_offset),
                                    int(last_offset - first_offset + 1)).astype(np.int64)
        parts = [self.indexed.get(int(doc_idx[first]), int(first_offset))]
        parts += [self.indexed[int(d)] for d in doc_idx[first + 1:last]]
        parts.append(self.indexed.get(int(doc_idx[last]), 0, int(last_offset) + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tokens = self.tokens(i)
        input_ids, labels = tokens[:-1], tokens[1:].copy()
        if self.eod_mask_loss:
            labels[input_ids == self.eod_id] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


def _index_cache_key(indexed: IndexedDataset, seq_length: int, num_samples: Optional[int], seed: int) -> str:
    h = hashlib.sha256(repr((_INDEX_CACHE_VERSION, str(Path(indexed.prefix).resolve()), indexed.fingerprint,
                             indexed.num_tokens, len(indexed), seq_length, num_samples, seed)).encode())
    h.update(np.ascontiguousarray(indexed.sizes).tobytes())
    return f"gpt-index-{h.hexdigest()[:20]}"


_CACHED_ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def _load_index(key: Path) -> Optional[SampleIndex]:
    meta = key.with_name(key.name + "-meta.npy")
    if not meta.is_file():
        return None
    num_epochs, separate = (int(v) for v in np.load(meta))
    arrays = [np.load(key.with_name(f"{key.name}-{name}.npy"), mmap_mode="r") for name in _CACHED_ARRAYS]
    return SampleIndex(*arrays, num_epochs=num_epochs, separate_last_epoch=bool(separate))


def _save_index(key: Path, index: SampleIndex) -> None:
    # Several ranks may build the same index at once: each writes temp files and renames them over; the
    # meta file is renamed last, so a reader that sees it sees complete arrays.
    key.parent.mkdir(parents=True, exist_ok=True)
    items = [(name, getattr(index, name)) for name in _CACHED_ARRAYS]
    items.append(("meta", np.array([index.num_epochs, int(index.separate_last_epoch)], dtype=np.int64)))
    for name, array in items:
        final = key.with_name(f"{key.name}-{name}.npy")
        tmp = key.with_name(f"{key.name}-{name}.tmp{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, final)


# -- supervised fine-tuning ------------------------------------------------------------------------

class SFTDataset:
    """One conversation per sample: ``{"input_ids", "labels", "attention_mask"}``, int64 ``[seq_length]``.

    ``input_ids`` are the first ``seq_length`` tokens, right-padded with the pad id; ``labels[t]`` is
    token ``t + 1`` where the chat loss mask of token ``t + 1`` is 1, else ``-100`` (padding too);
    ``attention_mask`` is 1 on real tokens. Longer conversations are truncated (``num_truncated``).
    ``indices`` restricts the dataset to those conversations (e.g. a train/validation split).
    """

    def __init__(self, indexed: IndexedDataset, seq_length: int, indices: Optional[Sequence[int]] = None):
        if not indexed.has_loss_mask:
            raise ValueError(f"{indexed.prefix} holds {indexed.kind} data without a loss mask; SFT needs chat "
                             "data (preprocess with --kind chat)")
        self.indexed = indexed
        self.seq_length = int(seq_length)
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.indices = np.arange(len(indexed)) if indices is None else _check_indices(indices, len(indexed))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_truncated(self) -> int:
        """Conversations longer than ``seq_length + 1`` tokens (their tail is cut off)."""
        return int((self.indexed.sizes[self.indices] > self.seq_length + 1).sum())

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        seq = int(self.indices[i])
        n = min(int(self.indexed.sizes[seq]), self.seq_length + 1)
        ids = self.indexed.get(seq, 0, n).astype(np.int64)
        mask = self.indexed.get_loss_mask(seq, 0, n)
        input_ids = np.full(self.seq_length, self.indexed.pad_id, dtype=np.int64)
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros(self.seq_length, dtype=np.int64)
        m = min(n, self.seq_length)
        input_ids[:m] = ids[:m]
        attention_mask[:m] = 1
        if n > 1:
            labels[:n - 1] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def first_fit_bins(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """First-fit bin packing: item k (in order) goes to the lowest-numbered bin with room for
    ``lengths[k]`` (every length in [0, capacity]); returns each item's bin index [n]. A max-tree over
    the bins' free space finds that bin in O(log n), so n items take O(n log n), not O(n * bins)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > capacity):
        raise ValueError(f"first_fit_bins: lengths must lie in [0, capacity={capacity}], got "
                         f"[{lengths.min()}, {lengths.max()}]")
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: free space of bins 0..size-1 (unopened bins are empty)
    bins = np.empty(len(lengths), dtype=np.int64)
    for k, n in enumerate(lengths.tolist()):
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= n
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        bins[k] = node - size
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


class PackedSFTDataset:
    """Conversations packed into rows of ``seq_length`` tokens, with no attention across them.

    Item keys, int64 ``[seq_length]``: ``input_ids`` (pad id after the last conversation), ``labels``
    (as ``SFTDataset`` per conversation; the last token of each conversation predicts nothing, so no
    loss crosses a boundary), ``attention_mask`` (1 on real tokens), ``position_ids`` (restart at 0
    in every conversation) and ``segment_ids`` (1, 2, ... per conversation in the row, 0 on padding;
    the model's attention keeps to one segment). A packed row gives each conversation the same
    logits and loss terms as its own padded row would (tested), for far fewer padding tokens.

    Packing: the conversations (``indices``, default all) in a seeded random order, first-fit: each
    goes to the first row with room for it (``first_fit_bins``), so short conversations fill the gaps
    that long ones leave. Deterministic for a seed; rows mix conversations of every length, kept in
    arrival order. A conversation longer than ``seq_length`` tokens is cut to ``seq_length``
    (``num_truncated``); ``packing_efficiency`` is real tokens / row capacity.
    """

    def __init__(self, indexed: IndexedDataset, seq_length: int, indices: Optional[Sequence[int]] = None,
                 seed: int = 0):
        if not indexed.has_loss_mask:
            raise ValueError(f"{indexed.prefix} holds {indexed.kind} data without a loss mask; SFT needs chat "
                             "data (preprocess with --kind chat)")
        self.indexed = indexed
        self.seq_length = int(seq_length)
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2 to pack conversations, got {seq_length}")
        chosen = np.arange(len(indexed)) if indices is None else _check_indices(indices, len(indexed))
        order = chosen[np.random.default_rng(seed).permutation(len(chosen))]
        lengths = np.minimum(indexed.sizes[order].astype(np.int64), self.seq_length)
        bins = first_fit_bins(lengths, self.seq_length)
        grouped = np.argsort(bins, kind="stable")  # by row, arrival order within a row
        self._order, self._lengths = order[grouped], lengths[grouped]
        counts = np.bincount(bins, minlength=int(bins.max()) + 1) if len(bins) else np.zeros(0, np.int64)
        self._row_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_truncated = int((indexed.sizes[chosen] > self.seq_length).sum())

    def __len__(self) -> int:
        return len(self._row_starts) - 1

    @property
    def packing_efficiency(self) -> float:
        return float(self._lengths.sum()) / max(1, len(self) * self.seq_length)

    def conversations(self, i: int) -> np.ndarray:
        """Indices (into the indexed dataset) of the conversations in row ``i``, in order."""
        return self._order[self._row_starts[i]:self._row_starts[i + 1]]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        L = self.seq_length
        out = {"input_ids": np.full(L, self.indexed.pad_id, dtype=np.int64),
               "labels": np.full(L, IGNORE_INDEX, dtype=np.int64), "attention_mask": np.zeros(L, dtype=np.int64),
               "position_ids": np.zeros(L, dtype=np.int64), "segment_ids": np.zeros(L, dtype=np.int64)}
        p = 0
        for segment, k in enumerate(range(self._row_starts[i], self._row_starts[i + 1]), start=1):
            seq, n = int(self._order[k]), int(self._lengths[k])
            ids = self.indexed.get(seq, 0, n).astype(np.int64)
            mask = self.indexed.get_loss_mask(seq, 0, n)
            out["input_ids"][p:p + n] = ids
            out["labels"][p:p + n - 1] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
            out["attention_mask"][p:p + n] = 1
            out["position_ids"][p:p + n] = np.arange(n)
            out["segment_ids"][p:p + n] = segment
            p += n
        return out


# -- preference pairs ------------------------------------------------------------------------------

class PreferenceDataset:
    """Preference pairs for reward models / DPO, each side right-padded or truncated to ``seq_length``.

    Item: ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``,
    ``rejected_attention_mask`` (int64 ``[seq_length]``); ``chosen_labels`` / ``rejected_labels`` (int64
    ``[seq_length]``: at position t the response token t + 1, -100 elsewhere: the targets whose log-probs
    DPO sums); and the scalars ``prompt_length``, ``chosen_length``, ``rejected_length`` (after truncation). ``indices`` restricts to those pairs,
    e.g. the ones ``bucket_balance`` keeps.
    """

    def __init__(self, indexed: IndexedDataset, seq_length: int, indices: Optional[Sequence[int]] = None):
        if indexed.kind != "preference":
            raise ValueError(f"{indexed.prefix} holds {indexed.kind} data; preprocess pairs with --kind preference")
        self.indexed = indexed
        self.seq_length = int(seq_length)
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        n = indexed.num_documents
        self.indices = np.arange(n) if indices is None else _check_indices(indices, n)

    def __len__(self) -> int:
        return len(self.indices)

    def answers_fit(self) -> np.ndarray:
        """bool ``[len(self)]``: whether both answers of each pair keep at least one token within ``seq_length``
        (a prompt as long as the window leaves DPO nothing to score)."""
        sizes = self.indexed.sizes.astype(np.int64)
        prompts = np.asarray(self.indexed.prompt_lengths, dtype=np.int64)[self.indices]
        window = np.minimum(np.stack([sizes[2 * self.indices], sizes[2 * self.indices + 1]], axis=1), self.seq_length)
        return (window > prompts[:, None]).all(axis=1)

    def pair_lengths(self) -> np.ndarray:
        """Full (untruncated) ``(chosen, rejected)`` lengths of the pairs, int64 ``[len(self), 2]``."""
        sizes = self.indexed.sizes.astype(np.int64)
        return np.stack([sizes[2 * self.indices], sizes[2 * self.indices + 1]], axis=1)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        chosen, rejected, prompt_length = self.indexed.get_pair(int(self.indices[i]))
        item = {"prompt_length": np.int64(min(prompt_length, self.seq_length))}
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            m = min(len(ids), self.seq_length)
            padded = np.full(self.seq_length, self.indexed.pad_id, dtype=np.int64)
            padded[:m] = ids[:m]
            attention = np.zeros(self.seq_length, dtype=np.int64)
            attention[:m] = 1
            item[f"{name}_input_ids"], item[f"{name}_attention_mask"] = padded, attention
            item[f"{name}_length"] = np.int64(m)
            labels = np.full(self.seq_length, -100, dtype=np.int64)
            start = max(int(prompt_length), 1)  # the first response token is predicted at position start - 1
            labels[start - 1:m - 1] = padded[start:m]
            item[f"{name}_labels"] = labels
        return item


@dataclass(frozen=True)
class BucketCounts:
    """One length-difference bucket of ``bucket_balance``: |len(chosen) - len(rejected)| in [low, high)."""

    low: float
    """Smallest length difference of the bucket (inclusive)."""
    high: float
    """Upper bound of the bucket (exclusive; inf for the last)."""
    longer_wins: int
    """Pairs in the bucket whose chosen (winning) answer is the longer one, before balancing."""
    longer_loses: int
    """Pairs whose chosen answer is the shorter one, before balancing."""
    kept_per_side: int
    """Pairs kept of each side: min(longer_wins, longer_loses)."""


@dataclass(frozen=True)
class BucketBalance:
    """Result of ``bucket_balance``."""

    kept: np.ndarray
    """Indices of the kept pairs, sorted, int64."""
    buckets: list
    """``BucketCounts`` per bucket, in increasing length difference."""
    ties: int
    """Pairs with equal lengths (no longer answer; kept when ``keep_ties``)."""


def bucket_balance(pair_lengths, winner_is_longer=None, num_buckets: Optional[int] = 10,
                   bucket_edges: Optional[Sequence[float]] = None, seed: int = 0,
                   keep_ties: bool = True) -> BucketBalance:
    """ChatGLM-RLHF bucket-based length balancing: remove the "longer answer wins" bias from reward data.

    ``pair_lengths``: ``[n, 2]`` (chosen length, rejected length). ``winner_is_longer`` (``[n]`` bool)
    defaults to ``chosen > rejected``; pass it when the columns are not (winner, loser). Pairs are
    bucketed by ``|len0 - len1|``: ``bucket_edges`` are the increasing inner boundaries (bucket ``b``
    holds differences in ``[edges[b-1], edges[b])``), or ``num_buckets`` buckets are cut at quantiles
    of the nonzero differences. Within each bucket the majority side (longer wins / longer loses) is
    downsampled at random (``seed``) to the size of the minority, so the reward model cannot score by
    length inside any length-difference range. Equal-length pairs carry no length signal: kept if
    ``keep_ties``.
    """
    lengths = np.asarray(pair_lengths)
    if lengths.ndim != 2 or lengths.shape[1] != 2:
        raise ValueError(f"pair_lengths must have shape [n, 2], got {lengths.shape}")
    lengths = lengths.astype(np.int64)
    n = len(lengths)
    diff = np.abs(lengths[:, 0] - lengths[:, 1])
    if winner_is_longer is None:
        wins = lengths[:, 0] > lengths[:, 1]
    else:
        wins = np.asarray(winner_is_longer, dtype=bool)
        if wins.shape != (n,):
            raise ValueError(f"winner_is_longer must have shape [{n}], got {wins.shape}")
    ties = diff == 0
    if bucket_edges is not None:
        edges = np.asarray(bucket_edges, dtype=np.float64)
        if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"bucket_edges must be strictly increasing, got {list(bucket_edges)}")
    else:
        if num_buckets is None or num_buckets < 1:
            raise ValueError(f"give bucket_edges or num_buckets >= 1, got num_buckets={num_buckets}")
        nonzero = diff[~ties]
        qs = np.quantile(nonzero, np.arange(1, num_buckets) / num_buckets) if nonzero.size else np.empty(0)
        edges = np.unique(qs)  # repeated quantiles (many equal differences) merge buckets
    bucket = np.searchsorted(edges, diff, side="right")
    bounds = np.concatenate([[0.0], edges, [np.inf]])
    rng = np.random.default_rng(seed)
    kept = [np.flatnonzero(ties)] if keep_ties else []
    counts = []
    for b in range(len(edges) + 1):
        in_bucket = (bucket == b) & ~ties
        win_idx, lose_idx = np.flatnonzero(in_bucket & wins), np.flatnonzero(in_bucket & ~wins)
        keep = min(len(win_idx), len(lose_idx))
        for side in (win_idx, lose_idx):
            kept.append(side if len(side) == keep else rng.choice(side, size=keep, replace=False))
        counts.append(BucketCounts(float(bounds[b]), float(bounds[b + 1]), len(win_idx), len(lose_idx), keep))
    kept_all = np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.empty(0, dtype=np.int64)
    return BucketBalance(kept_all, counts, int(ties.sum()))


# -- blending --------------------------------------------------------------------------------------

class BlendedDataset:
    """Mixes datasets by weight: sample ``i`` is ``datasets[dataset_index[i]][dataset_sample_index[i]]``.

    The indices follow Megatron's greedy rule (``samples.build_blending_indices``): after any prefix of
    samples each dataset's share is within one sample of its weight. Each dataset must hold at least
    the samples it is asked for; ``samples.blended_samples_needed`` says how many that is.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int, backend: str = "auto"):
        if len(datasets) != len(weights):
            raise ValueError(f"got {len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, num_samples,
                                                                               backend=backend)
        needed = np.bincount(self.dataset_index, minlength=len(datasets))
        short = [(d, int(needed[d]), len(ds)) for d, ds in enumerate(self.datasets) if needed[d] > len(ds)]
        if short:
            raise ValueError("blended datasets too small for num_samples=" + str(num_samples) + ": " + "; ".join(
                f"dataset {d} must provide {need} samples but has {have}" for d, need, have in short))

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def _check_indices(indices, size: int) -> np.ndarray:
    a = np.asarray(indices, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= size):
        raise IndexError(f"indices must lie in [0, {size}), got min {a.min()} and max {a.max()}")
    return a


# -- data-parallel sampling ------------------------------------------------------------------------

class MicroBatchSampler:
    """Dataset indices of this rank's micro batches, resumable from a count of consumed samples.

    A global micro batch is ``micro_batch_size * dp_size`` consecutive positions of the epoch order;
    rank ``r`` reads positions ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it, so the ranks
    are disjoint and together read every position once. The epoch order is ``0..dataset_size-1``, or a
    permutation seeded by ``(seed, epoch)`` with ``shuffle``; the tail that does not fill a global micro
    batch is dropped each epoch. ``num_epochs=None`` cycles forever. ``consumed_samples`` counts samples
    of all ranks, so the same state resumes on any (micro_batch_size, dp_size) of the same global size.
    """

    def __init__(self, dataset_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, *,
                 shuffle: bool = False, seed: int = 0, num_epochs: Optional[int] = 1, consumed_samples: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got micro_batch_size="
                             f"{micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.dataset_size = int(dataset_size)
        self.micro_batch_size, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        self.global_micro_batch = self.micro_batch_size * self.dp_size
        if self.dataset_size < self.global_micro_batch:
            raise ValueError(f"the dataset has {self.dataset_size} samples, fewer than one global micro batch "
                             f"(micro_batch_size {micro_batch_size} x dp_size {dp_size})")
        self.shuffle, self.seed, self.num_epochs = bool(shuffle), int(seed), num_epochs
        self.samples_per_epoch = self.dataset_size // self.global_micro_batch * self.global_micro_batch
        self.consumed_samples = 0
        self._set_consumed(int(consumed_samples))
        self._order_epoch, self._order = -1, None

    def _set_consumed(self, consumed: int) -> None:
        if consumed < 0 or consumed % self.global_micro_batch:
            raise ValueError(f"consumed_samples={consumed} is not a multiple of the global micro batch "
                             f"{self.global_micro_batch} (micro_batch_size {self.micro_batch_size} x dp_size "
                             f"{self.dp_size})")
        self.consumed_samples = consumed

    @property
    def epoch(self) -> int:
        """The epoch the next micro batch comes from."""
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of dataset indices in ``epoch`` (all ranks share it)."""
        if not self.shuffle:
            return np.arange(self.dataset_size, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        """This rank's next micro batch of dataset indices; advances the position by a global micro batch."""
        epoch = self.epoch
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        start = self.consumed_samples % self.samples_per_epoch + self.dp_rank * self.micro_batch_size
        self.consumed_samples += self.global_micro_batch
        return self._order[start:start + self.micro_batch_size].tolist()

    def __len__(self) -> int:
        """Micro batches left for this rank (raises for an endless sampler)."""
        if self.num_epochs is None:
            raise TypeError("an endless sampler (num_epochs=None) has no length")
        total = self.num_epochs * self.samples_per_epoch
        return max(0, total - self.consumed_samples) // self.global_micro_batch

    def state_dict(self) -> dict:
        """The position (consumed samples of all ranks) and what it is only meaningful with."""
        return {"consumed_samples": self.consumed_samples, "dataset_size": self.dataset_size,
                "global_micro_batch": self.global_micro_batch, "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the dataset, shuffle, seed and global micro batch must match."""
        for name in ("dataset_size", "global_micro_batch", "shuffle", "seed"):
            if state[name] != getattr(self, name):
                raise ValueError(f"cannot resume the data position: the checkpoint has {name}={state[name]!r} "
                                 f"but this run has {name}={getattr(self, name)!r}")
        self._set_consumed(int(state["consumed_samples"]))


def collate(items: Sequence[dict]) -> dict:
    """Stack a list of item dicts (numpy arrays or scalars) into a dict of torch tensors ``[batch, ...]``."""
    import torch
    if not items:
        raise ValueError("collate got an empty list of items")
    return {key: torch.from_numpy(np.stack([np.asarray(item[key]) for item in items])) for key in items[0]}


class DataIterator:
    """Batches of ``dataset`` for one DP rank: ``next(it)`` -> ``collate([dataset[i] for i in micro batch])``.

    ``state_dict()``/``load_state_dict()`` save and restore the position, so a resumed run continues
    with exactly the batches the interrupted run would have read next.
    """

    def __init__(self, dataset, sampler: MicroBatchSampler, collate_fn: Callable[[Sequence[dict]], dict] = collate):
        if sampler.dataset_size != len(dataset):
            raise ValueError(f"the sampler covers {sampler.dataset_size} samples but the dataset has {len(dataset)}")
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn

    @classmethod
    def for_rank(cls, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 **sampler_kwargs) -> "DataIterator":
        """``DataIterator(dataset, MicroBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, ...))``."""
        return cls(dataset, MicroBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, **sampler_kwargs))

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        indices = next(self.sampler)
        return self.collate_fn([self.dataset[i] for i in indices])

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def consumed_samples(self) -> int:
        """Samples all ranks have read so far."""
        return self.sampler.consumed_samples

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


__all__ = ["IGNORE_INDEX", "BlendedDataset", "BucketBalance", "BucketCounts", "DataIterator", "MicroBatchSampler",
           "PreferenceDataset", "PretrainDataset", "SFTDataset", "bucket_balance", "collate"]
