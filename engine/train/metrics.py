"""Per-step training metrics: the record, the communication delta from a ledger, and a JSONL writer."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine.parallel.comm import CommLedger


@dataclass
class StepMetrics:
    """What one optimizer step reports (identical on every rank except the per-rank fields)."""

    step: int
    """Optimizer steps completed before this one (0-based)."""
    loss: float
    """Mean token cross entropy over the global batch, before the update."""
    grad_norm: float
    """Global L2 norm of the gradient before clipping."""
    lr: float
    tokens: int
    """Input tokens in the global batch (rows * seq_length; padding included)."""
    loss_tokens: int
    """Units the loss averages over in the global batch: tokens that took loss (labels != ignore
    index) for a language model, preference pairs for a reward model."""
    seconds: float
    tokens_per_s: float
    skipped: bool = False
    """True when the update was skipped (non-finite gradient norm)."""
    schedule: str = "no_pipeline"
    num_microbatches: int = 1
    """Micro-batches per data-parallel rank."""
    comm_bytes: dict = field(default_factory=dict)
    """Bytes this rank sent during the step, per group (tp, pp, dp, mp), from the ledger."""
    bubble_fraction: float = 0.0
    """Pipeline idle fraction from wall clocks, mean over stages (``schedules`` module doc)."""
    bubble_fraction_cpu: float = 0.0
    """Pipeline idle fraction replayed from measured compute costs, mean over stages."""
    bubble_fraction_analytic: float = 0.0
    busy_s: float = 0.0
    """This rank's compute seconds in the schedule."""
    idle_s: float = 0.0
    """This rank's seconds blocked on pipeline receives."""
    peak_memory_bytes: Optional[int] = None
    """Peak CUDA memory allocated during the step (None on CPU)."""
    stats: dict = field(default_factory=dict)
    """The objective's statistics, means over the loss units (reward model: accuracy, margin, ...)."""

    def record(self) -> dict:
        """Flat JSON-ready dict: the fields, with ``stats`` merged in at the top level."""
        d = asdict(self)
        d.update(d.pop("stats"))
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)  # JSON has no inf/nan
        return d

    def to_json(self) -> str:
        return json.dumps(self.record(), sort_keys=False)


def ledger_totals(ledger: CommLedger) -> dict[str, float]:
    """``{group: bytes sent}`` so far."""
    return {name: g["bytes"] for name, g in ledger.snapshot().items()}


def ledger_delta(before: dict[str, float], after: dict[str, float], exclude=("metrics",)) -> dict[str, float]:
    """Bytes sent per group between two ``ledger_totals`` (groups with traffic only)."""
    out = {}
    for name in sorted(set(before) | set(after)):
        if name in exclude:
            continue
        delta = after.get(name, 0.0) - before.get(name, 0.0)
        if delta:
            out[name] = delta
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class SavedActivationMeter:
    """Peak bytes autograd holds for backward (activations) while the context is open, on any device.

    Counts every tensor packed through autograd's saved-tensor hooks (``torch.autograd.graph.
    saved_tensors_hooks``; custom Functions' ``ctx.save_for_backward`` included) by its storage, once per
    storage however many views of it are saved, from when it is saved until autograd drops it (after its
    backward, or with its graph). ``exclude``: tensors whose storages are not activations (the parameters,
    which matmuls save too). Under activation recompute the tensors recomputed in backward are not
    counted (a lower bound then). For measurement only: while any saved-tensor hook is active autograd
    does not check saved tensors for in-place modification. ``peak`` / ``current``: bytes."""

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list] = {}  # storage address -> [saved references, bytes]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self._exclude or storage.nbytes() == 0:
            return t
        entry = self._live.setdefault(address, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        # detached: a saved output holds its grad_fn, which holds this record: a cycle that only the garbage
        # collector would free if the graph is dropped without a backward
        return _Saved(t.detach(), self, address)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, address: int) -> None:
        entry = self._live[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[address]


class _Saved:
    """A saved tensor as autograd stores it while metered: dropping it releases its bytes."""

    __slots__ = ("tensor", "meter", "address")

    def __init__(self, tensor: torch.Tensor, meter: SavedActivationMeter, address: int):
        self.tensor, self.meter, self.address = tensor, meter, address

    def __del__(self):
        self.meter._release(self.address)


class MetricsWriter:
    """Appends one JSON object per step to ``DIR/metrics.jsonl`` (flushed and fsynced per line, so a
    killed run keeps every finished step)."""

    def __init__(self, log_dir: str | os.PathLike, filename: str = "metrics.jsonl"):
        self.path = Path(log_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, metrics: StepMetrics, **extra) -> None:
        self.write_record({**metrics.record(), **extra})

    def write_record(self, record: dict) -> None:
        """One JSON line from a flat dict (non-finite floats written as strings: JSON has no inf/nan)."""
        d = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(d) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
