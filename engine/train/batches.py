"""Global batches as a pure function of the step, for every training mode.

Every rank builds the same global batch for step k (the Trainer slices the DP rank's rows), and the
batch depends on nothing but the data, the seed and k: resuming from a checkpoint at step k
continues the exact data order with no iterator state to save.

    CorpusBatches    pretraining on a list of texts (the built-in corpus): packed windows
    DatasetBatches   any map-style dataset of equal-shape numpy items (PretrainDataset, SFTDataset,
                     PreferenceDataset): seeded shuffle per epoch, the incomplete last batch dropped
    eval_batches     the first k full global batches of a held-out dataset, in order
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from engine.data.builtin import split_indices


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


__all__ = ["CorpusBatches", "DatasetBatches", "Subset", "collate_items", "eval_batches"]
