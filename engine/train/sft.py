"""Supervised fine-tuning: the ``Trainer`` on ``SFTDataset`` batches, with periodic held-out loss.

``SFTDataset`` already yields next-token ``labels`` that are ``-100`` outside assistant turns (and on
padding), plus an ``attention_mask``; the Trainer's loss is the mean cross entropy over the tokens
whose label is not ``-100`` in the global batch, so SFT is the pretraining step on these batches.
``run_sft`` wires model, optimizer, LR schedule, data order, eval, metrics.jsonl and observers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from engine.config import GLMConfig, config_section, model_from_spec
from engine.train.lr import LRConfig, LRSchedule
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer

SFT_KEYS = ("input_ids", "labels", "attention_mask")


@dataclass(frozen=True)
class SFTConfig:
    """What an SFT run adds to the pretraining options."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    eval_interval: int = 0
    """Evaluate the held-out loss every this many steps (0: only after the last step)."""
    eval_batches: int = 1
    """Global batches of the held-out split per evaluation."""
    log_dir: Optional[str] = None
    """Directory of metrics.jsonl and TensorBoard events (None: no files)."""


def global_batches(dataset, global_batch_size: int, seed: int, drop_last: bool = True) -> Iterator[dict]:
    """Endless seeded shuffled global batches ``{input_ids, labels, attention_mask}: [G, s]`` int64
    (every rank builds the same ones; the Trainer slices the DP rank's rows)."""
    n = len(dataset)
    if n < global_batch_size:
        raise ValueError(f"dataset has {n} samples, fewer than global_batch_size={global_batch_size}")
    epoch = 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n)
        for i in range(0, n - global_batch_size + 1 if drop_last else n, global_batch_size):
            items = [dataset[int(j)] for j in order[i:i + global_batch_size]]
            yield {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in SFT_KEYS}
        epoch += 1


def build_sft_trainer(model_config: GLMConfig, config: SFTConfig, layout, chunks=None) -> Trainer:
    """A ``Trainer`` for SFT over ``layout`` (``chunks``: this rank's model chunks, e.g. loaded from a
    pretrained checkpoint; None builds freshly initialised ones)."""
    if chunks is None:
        from engine.parallel.pipeline import build_model_chunks
        chunks = build_model_chunks(model_config, layout, sequence_parallel=config.train.sequence_parallel,
                                    layers_per_stage=config.train.layers_per_stage, seed=config.train.seed)
    optimizer = build_optimizer(chunks, layout, config.optim, config.lr.lr)
    return Trainer(chunks, optimizer, layout, model_config, config.train,
                   LRSchedule(config.lr, config.train.train_steps))


def evaluate_loss(trainer: Trainer, batches) -> float:
    """Token-weighted mean held-out cross entropy over global batches."""
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != trainer.train.ignore_index).sum())
        if n:
            total += trainer.evaluate(batch) * n
            tokens += n
    if tokens == 0:
        raise ValueError("the held-out batches have no token that takes loss")
    return total / tokens


def run_sft(model_config: GLMConfig, config: SFTConfig, train_dataset, eval_dataset=None, layout=None,
            chunks=None, log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train ``config.train.train_steps`` SFT steps; returns one record per step (``StepMetrics``
    fields, plus ``eval_loss`` on evaluation steps). Rank 0 writes ``log_dir/metrics.jsonl``."""
    from dataclasses import asdict

    from engine.parallel import ParallelLayout
    from engine.train.metrics import MetricsWriter
    from engine.train.observe import ProgressBar, TensorBoardLogger

    layout = ParallelLayout.single() if layout is None else layout
    trainer = build_sft_trainer(model_config, config, layout, chunks)
    t = config.train
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    batches = global_batches(train_dataset, t.global_batch_size, t.seed)
    eval_data = None
    if eval_dataset is not None:
        it = global_batches(eval_dataset, t.global_batch_size, t.seed + 1)
        eval_data = [next(it) for _ in range(config.eval_batches)]
    writer = MetricsWriter(config.log_dir) if config.log_dir and rank == 0 else None
    tb = TensorBoardLogger(Path(config.log_dir) / "tb", rank) if config.log_dir else None
    bar = ProgressBar(t.train_steps, rank)
    records = []
    try:
        for step in range(t.train_steps):
            metrics = trainer.train_step(next(batches))
            extra = {}
            last = step + 1 == t.train_steps
            if eval_data is not None and ((config.eval_interval and (step + 1) % config.eval_interval == 0) or last):
                extra["eval_loss"] = evaluate_loss(trainer, eval_data)
            record = {**asdict(metrics), **extra}
            if writer is not None:
                writer.write(metrics, **extra)
            if tb is not None:
                tb.log(record)
            bar.update(record)
            if log is not None:
                log(record)
            records.append(record)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        if writer is not None:
            writer.close()
    return records


__all__ = ["SFTConfig", "build_sft_trainer", "load_sft_run", "evaluate_loss", "global_batches", "run_sft"]


# ---- YAML run files (configs/runs/sft.yaml, rm.yaml) ----------------------------------------------

def read_run_yaml(path, sections: set) -> dict:
    import yaml
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections are {sorted(sections)}")
    return raw


def load_sft_run(path) -> tuple[GLMConfig, SFTConfig]:
    """Parse an SFT run YAML (model, train, optim, lr, eval, log_dir) into typed configs."""
    raw = read_run_yaml(path, {"model", "train", "optim", "lr", "eval", "log_dir", "data"})
    model = model_from_spec(raw.get("model", "tiny"))
    ev = raw.get("eval") or {}
    config = SFTConfig(train=config_section(TrainConfig, raw.get("train"), "train"),
                       optim=config_section(OptimizerConfig, raw.get("optim"), "optim"),
                       lr=config_section(LRConfig, raw.get("lr"), "lr"),
                       eval_interval=int(ev.get("interval", 0)), eval_batches=int(ev.get("batches", 1)),
                       log_dir=raw.get("log_dir"))
    config.lr.validate(config.train.train_steps)
    return model, config
