"""Global batches as a pure function of the step, for every training mode.

Every rank builds the same global batch for step k (the Trainer slices the DP rank's rows), and the
batch depends on nothing but the data, the seed and k: resuming from a checkpoint at step k
continues the exact data order with no iterator state to save.

    CorpusBatches    pretraining on a list of texts (the built-in corpus): packed windows
    DatasetBatches   any map-style dataset of equal-shape numpy items (PretrainDataset, SFTDataset,
                     PreferenceDataset): seeded shuffle per epoch, the incomplete last batch dropped
    eval_batches     the first k full global batches of a held-out dataset, in order
    pack_padded_rows a padded batch's sequences packed into fewer rows (segments, positions)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from engine.data.builtin import split_indices
from engine.data.datasets import first_fit_bins


class CorpusBatches:
    """Global batches of packed next-token samples from a list of texts (deterministic, seeded).

    Documents are tokenized, joined with EOS and cut into ``seq_length + 1`` windows; ``eval_fraction``
    of the windows (seeded) are held out (``held_out()``)."""

    def __init__(self, texts: Sequence[str], tokenizer, seq_length: int, global_batch_size: int, seed: int,
                 eval_fraction: float = 0.0):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eos_id)
        n = len(ids) // (seq_length + 1)
        if n < 1:
            raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one sample of seq_length + 1 = "
                             f"{seq_length + 1}")
        samples = torch.tensor(ids[: n * (seq_length + 1)], dtype=torch.long).view(n, seq_length + 1)
        train, held = split_indices(n, eval_fraction, seed)
        self.samples, self.held = samples[torch.from_numpy(train)], samples[torch.from_numpy(held)]
        self.order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        self.global_batch_size = global_batch_size

    @staticmethod
    def _batch(windows: torch.Tensor) -> dict:
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def __call__(self, step: int) -> dict:
        n = self.samples.shape[0]
        rows = self.order[(step * self.global_batch_size + torch.arange(self.global_batch_size)) % n]
        return self._batch(self.samples[rows])

    def held_out(self, max_batches: int) -> list[dict]:
        """Up to ``max_batches`` global batches of the held-out windows (none when nothing is held out)."""
        G = self.global_batch_size
        if 0 < len(self.held) < G:
            raise ValueError(f"the held-out split has {len(self.held)} windows, fewer than one global batch of {G}: "
                             "raise data.eval_fraction or lower global_batch_size")
        return [self._batch(self.held[i:i + G]) for i in range(0, (len(self.held) // G) * G, G)][:max_batches]


def collate_items(items: Sequence[dict], keys: Sequence[str]) -> dict:
    """Stack numpy items into ``{key: int64 tensor [len(items), ...]}`` for ``keys``."""
    return {k: torch.from_numpy(np.stack([np.asarray(it[k]) for it in items]).astype(np.int64)) for k in keys}


class DatasetBatches:
    """Global batch ``step`` of a map-style dataset: epoch ``e = step // (n // G)`` is a permutation
    seeded by ``seed + e``; each epoch serves ``n // G`` full batches (the rest of the epoch is
    dropped, as Megatron's SFT loader does)."""

    def __init__(self, dataset, global_batch_size: int, seed: int, keys: Sequence[str]):
        self.dataset, self.global_batch_size, self.seed, self.keys = dataset, global_batch_size, seed, tuple(keys)
        self.per_epoch = len(dataset) // global_batch_size
        if self.per_epoch < 1:
            raise ValueError(f"the training split has {len(dataset)} samples, fewer than global_batch_size="
                             f"{global_batch_size}")
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> dict:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.dataset))
        G = self.global_batch_size
        return collate_items([self.dataset[int(j)] for j in self._order[i * G:(i + 1) * G]], self.keys)


def eval_batches(dataset, global_batch_size: int, max_batches: int, keys: Sequence[str]) -> list[dict]:
    """Up to ``max_batches`` full global batches of a held-out dataset, in index order (the same
    held-out tokens at every evaluation)."""
    G = global_batch_size
    count = min(max_batches, len(dataset) // G)
    return [collate_items([dataset[j] for j in range(b * G, (b + 1) * G)], keys) for b in range(count)]


class Subset:
    """``dataset`` restricted to ``indices`` (a train or held-out split)."""

    def __init__(self, dataset, indices: Optional[Sequence[int]]):
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]


def pack_padded_rows(batch: dict, row_multiple: int = 1, fill: Optional[dict] = None,
                     keep: Optional[torch.Tensor] = None) -> dict:
    """A padded batch's sequences packed first-fit decreasing into as few rows as hold them.

    ``batch``: tensors ``[G, S]`` whose ``attention_mask`` marks each row's real tokens, one contiguous
    span per row (left or right padding, or both, as a PPO rollout has). Every tensor moves with its
    tokens: span i lands in a packed row at some offset, shape ``[G', S]`` with G' the rows first-fit
    needs, rounded up to a multiple of ``row_multiple`` (the Trainer's micro-batch x DP granularity).
    Added: ``segment_ids`` (the sequence's index within its packed row, -1 on padding: no attention
    across sequences) and ``position_ids`` (moved when given, else each sequence's 0, 1, ... as
    ``default_positions`` gives the padded row). Padding positions take ``fill[key]`` (default 0;
    ``attention_mask`` 0): e.g. ``{"labels": IGNORE_INDEX}`` so they take no loss. Per-token results
    are unchanged: each sequence sees exactly its own tokens at its own positions, so only padding
    compute is saved. ``keep`` (bool ``[G]``): the rows to pack (default all; rows without a real token
    are always left out). A ``fill`` key holding anything but its fill value outside the real tokens
    (e.g. a label on padding) would be lost: refused. Pure; the same output on every rank for the same
    input."""
    if "attention_mask" not in batch:
        raise ValueError(f"pack_padded_rows needs the batch's attention_mask (has {sorted(batch)})")
    mask = batch["attention_mask"].ne(0)
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [rows, seq], got {tuple(mask.shape)}")
    G, S = mask.shape
    for k, v in batch.items():
        if tuple(v.shape) != (G, S):
            raise ValueError(f"pack_padded_rows: {k} {tuple(v.shape)} must be [rows, seq] = {[G, S]} like "
                             "attention_mask")
    if not isinstance(row_multiple, int) or row_multiple < 1:
        raise ValueError(f"row_multiple={row_multiple!r} must be a positive integer")
    fill = {"attention_mask": 0, **(fill or {})}
    for k, value in fill.items():
        if k in batch and k != "attention_mask" and bool((batch[k][~mask] != value).any()):
            bad = int((batch[k] != value).logical_and(~mask).nonzero()[0, 0])
            raise ValueError(f"pack_padded_rows: row {bad} holds {k} values other than the fill {value} on padding "
                             "(attention_mask 0); packing keeps real tokens only, so they would be lost")
    lengths = mask.sum(1)
    starts = torch.where(lengths > 0, mask.int().argmax(1), 0)
    contiguous = mask.int().cumsum(1).gather(1, (starts + lengths - 1).clamp(min=0)[:, None]).squeeze(1) == lengths
    if not bool(contiguous.all()):
        bad = int((~contiguous).nonzero()[0])
        raise ValueError(f"pack_padded_rows: row {bad}'s attention_mask has holes; each row must hold one contiguous "
                         "span of real tokens")
    source = dict(batch)
    if "position_ids" not in source:
        source["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
    wanted = lengths > 0  # empty rows carry nothing
    if keep is not None:
        if tuple(keep.shape) != (G,) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor [rows] = [{G}], got {keep.dtype} {tuple(keep.shape)}")
        wanted &= keep.to(wanted.device)
    lengths, starts = lengths.tolist(), starts.tolist()  # host lists: one device sync, not two per sequence
    # first-fit decreasing: long sequences first, short ones fill the gaps (~5% fewer rows than row order
    # for PPO-like length mixes); ties keep row order
    keep = sorted(wanted.nonzero().flatten().tolist(), key=lambda i: -lengths[i])
    n = np.array([lengths[i] for i in keep], dtype=np.int64)
    bins = first_fit_bins(n, S) if keep else np.zeros(0, dtype=np.int64)
    rows = int(bins.max()) + 1 if keep else 0
    rows = max(row_multiple, -(-rows // row_multiple) * row_multiple)
    # each sequence's offset and index within its packed row (placement order), then one flat
    # destination -> source index for all tokens: a single scatter per tensor, not one copy per sequence
    at, segment = np.zeros(len(keep), dtype=np.int64), np.zeros(len(keep), dtype=np.int64)
    used, count = [0] * rows, [0] * rows
    for k, row in enumerate(bins.tolist()):
        at[k], segment[k] = used[row], count[row]
        used[row], count[row] = used[row] + int(n[k]), count[row] + 1
    token_seq = np.repeat(np.arange(len(keep)), n)  # the sequence of each packed token
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    src = (np.array(keep, dtype=np.int64) * S + np.array([starts[i] for i in keep], dtype=np.int64))[token_seq] + within
    dst = (bins * S + at)[token_seq] + within
    dst_t, src_t = torch.from_numpy(dst).to(mask.device), torch.from_numpy(src).to(mask.device)
    out = {}
    for k, v in source.items():
        flat = torch.full((rows * S,), fill.get(k, 0), dtype=v.dtype, device=v.device)
        flat[dst_t.to(v.device)] = v.reshape(-1)[src_t.to(v.device)]
        out[k] = flat.view(rows, S)
    seg = torch.full((rows * S,), -1, dtype=torch.long, device=mask.device)
    seg[dst_t] = torch.from_numpy(segment[token_seq]).to(mask.device)
    out["segment_ids"] = seg.view(rows, S)
    return out


__all__ = ["CorpusBatches", "DatasetBatches", "Subset", "collate_items", "eval_batches", "pack_padded_rows"]
