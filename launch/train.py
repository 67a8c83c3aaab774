"""Pretrain a GLM model on any TP x PP x DP layout.

    torchrun --nproc-per-node N -m launch.train --config configs/runs/pretrain.yaml \\
        [--tp T] [--pp P] [--vpp V] [--sequence-parallel] [--micro-batch-size M] [--global-batch-size G] \\
        [--train-steps K] [--seed S] [--log-dir DIR] [--recompute none|full|selective] [--lr LR] ...
    python -m launch.train --config ...          # one process, no torch.distributed

The run YAML composes a model (a preset name, a model YAML path, or a mapping with ``preset:`` plus
field overrides) with the ``parallel``, ``train``, ``optim``, ``lr`` and ``data`` sections; command-line
flags override it, and everything is parsed once into typed dataclasses (``RunConfig``). Without
``data.path`` the model pretrains on the built-in corpus (``pydoc_data.topics``, default tokenizer):
documents tokenized, joined with EOS, cut into ``seq_length + 1`` windows, served in a seeded order;
every rank builds the same global batches and each DP rank trains on its slice. With ``data.path``
(an indexed dataset prefix from ``launch.preprocess``) it reads ``engine.data.PretrainDataset``.

Backend: NCCL when CUDA is available, else gloo. Rank 0 appends one JSON line per step to
``DIR/metrics.jsonl`` (loss, grad_norm, lr, tokens_per_s, comm bytes per group, bubble, ...).
An invalid configuration prints ``launch.train: error: ...`` and exits with code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from engine.config import GLMConfig, config_section, model_from_spec
from engine.parallel import ParallelDims
from engine.train.lr import LRConfig
from engine.train.step import OptimizerConfig, TrainConfig

PROG = "launch.train"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "runs" / "pretrain.yaml"


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    path: Optional[str] = None
    """Indexed dataset prefix (``launch.preprocess`` output); None: the built-in tiny corpus."""
    tokenizer_cache: Optional[str] = None
    """Cache directory of the default tokenizer (None: ~/.cache/glm-engine)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and when to save, and what to resume from."""

    save: Optional[str] = None
    """Checkpoint directory to write (None: no checkpoints)."""
    save_interval: int = 0
    """Save every N steps; 0 saves only at the end of the run."""
    load: Optional[str] = None
    """Checkpoint directory to resume from (its ``latest`` step); may equal ``save``."""
    keep_last: Optional[int] = None
    """Keep only the newest K checkpoints (None: keep all)."""


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees of the training layout (dp is derived from the world size)."""

    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline stages."""
    vpp: int = 1
    """Model chunks per pipeline stage (interleaved schedule)."""

    def dims(self) -> ParallelDims:
        return ParallelDims(tp=self.tp, pp=self.pp, dp=None, vpp=self.vpp)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, parsed once from YAML + command line."""

    model: GLMConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_dir: str = "runs/pretrain"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


# ---- config parsing -------------------------------------------------------------------------------
RUN_SECTIONS = {"model", "parallel", "train", "optim", "lr", "data", "checkpoint", "log_dir"}


def load_run_config(path: Optional[str | os.PathLike], overrides: Optional[dict] = None) -> RunConfig:
    """Read a run YAML and apply ``overrides`` ``{section: {field: value}}`` (``log_dir``/``model``: a value)."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"run config {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a mapping with sections {sorted(RUN_SECTIONS)}")
        unknown = sorted(set(raw) - RUN_SECTIONS)
        if unknown:
            raise ValueError(f"{p}: unknown section(s) {unknown}; valid sections are {sorted(RUN_SECTIONS)}")
        base = p.parent
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            merged = dict(raw.get(section) or {})
            merged.update(values)
            raw[section] = merged
        else:
            raw[section] = values
    return RunConfig(model=model_from_spec(raw.get("model", "tiny"), base),
                     parallel=config_section(ParallelConfig, raw.get("parallel"), "parallel"),
                     train=config_section(TrainConfig, raw.get("train"), "train"),
                     optim=config_section(OptimizerConfig, raw.get("optim"), "optim"),
                     lr=config_section(LRConfig, raw.get("lr"), "lr"),
                     data=config_section(DataConfig, raw.get("data"), "data"),
                     checkpoint=config_section(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
                     log_dir=str(raw.get("log_dir", "runs/pretrain")))


def validate_run(run: RunConfig, world_size: int) -> ParallelDims:
    """Every check that needs no process group; ValueError naming each problem. Returns the dims."""
    dims = run.train.validate(run.parallel.dims(), run.model, world_size)
    run.lr.validate(run.train.train_steps)
    if run.optim.mixed_precision not in ("fp32", "bf16"):
        raise ValueError(f"optim.mixed_precision={run.optim.mixed_precision!r} must be fp32 or bf16")
    if run.optim.clip_grad < 0:
        raise ValueError(f"optim.clip_grad={run.optim.clip_grad} must be >= 0 (0 disables clipping)")
    ck = run.checkpoint
    if ck.save_interval < 0 or (ck.keep_last is not None and ck.keep_last < 1):
        raise ValueError(f"checkpoint.save_interval={ck.save_interval} must be >= 0 and checkpoint.keep_last="
                         f"{ck.keep_last} must be >= 1")
    if ck.save_interval and not ck.save:
        raise ValueError("--save-interval needs --save DIR")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: configs/runs/pretrain.yaml)")
    p.add_argument("--model", help="model preset name or model YAML (overrides the run's model)")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--vpp", type=int)
    p.add_argument("--sequence-parallel", action="store_true", default=None)
    p.add_argument("--layers-per-stage", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="comma-separated layers per virtual stage, e.g. 3,5")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--train-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--recompute", choices=("none", "full", "selective"))
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip-grad", type=float)
    p.add_argument("--distributed-optimizer", action="store_true", default=None)
    p.add_argument("--mixed-precision", choices=("fp32", "bf16"))
    p.add_argument("--data-path", help="indexed dataset prefix (default: the built-in corpus)")
    p.add_argument("--save", help="checkpoint directory to write")
    p.add_argument("--save-interval", type=int, help="save every N steps (0: only at the end)")
    p.add_argument("--load", help="checkpoint directory to resume from (its latest step; layouts may differ)")
    p.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s; when given, metrics include MFU (Megatron's FLOP count)")
    p.add_argument("--log-dir")
    return p


_FLAG_TARGETS = {
    "tp": ("parallel", "tp"), "pp": ("parallel", "pp"), "vpp": ("parallel", "vpp"),
    "sequence_parallel": ("train", "sequence_parallel"), "layers_per_stage": ("train", "layers_per_stage"),
    "micro_batch_size": ("train", "micro_batch_size"), "global_batch_size": ("train", "global_batch_size"),
    "seq_length": ("train", "seq_length"), "train_steps": ("train", "train_steps"), "seed": ("train", "seed"),
    "recompute": ("train", "recompute"), "lr": ("lr", "lr"), "min_lr": ("lr", "min_lr"),
    "warmup_steps": ("lr", "warmup_steps"), "weight_decay": ("optim", "weight_decay"),
    "clip_grad": ("optim", "clip_grad"), "distributed_optimizer": ("optim", "use_distributed_optimizer"),
    "mixed_precision": ("optim", "mixed_precision"), "data_path": ("data", "path"),
    "save": ("checkpoint", "save"), "save_interval": ("checkpoint", "save_interval"),
    "load": ("checkpoint", "load"), "keep_last": ("checkpoint", "keep_last"),
}


def cli_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for flag, (section, name) in _FLAG_TARGETS.items():
        value = getattr(args, flag)
        if value is not None:
            out.setdefault(section, {})[name] = value
    if args.log_dir is not None:
        out["log_dir"] = args.log_dir
    if args.model is not None:
        out["model"] = args.model
    return out


# ---- multi-node command line ----------------------------------------------------------------------
def torchrun_command(nnodes: int, nproc_per_node: int, rdzv_endpoint: str, rdzv_id: str,
                     train_args: Sequence[str], python: str = "python") -> list[str]:
    """The per-node torchrun command (c10d rendezvous) that ``launch/slurm_train.sh`` runs under srun."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            f"--rdzv-id={rdzv_id}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
            "-m", PROG, *train_args]


# ---- data ---------------------------------------------------------------------------------------
class CorpusBatches:
    """Global batches of packed next-token samples from a list of texts (deterministic, seeded)."""

    def __init__(self, texts: Sequence[str], tokenizer, seq_length: int, global_batch_size: int, seed: int):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eos_id)
        n = len(ids) // (seq_length + 1)
        if n < 1:
            raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one sample of seq_length + 1 = "
                             f"{seq_length + 1}")
        self.samples = torch.tensor(ids[: n * (seq_length + 1)], dtype=torch.long).view(n, seq_length + 1)
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.global_batch_size = global_batch_size

    def __call__(self, step: int) -> dict:
        n = self.samples.shape[0]
        rows = self.order[(step * self.global_batch_size + torch.arange(self.global_batch_size)) % n]
        batch = self.samples[rows]
        return {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


class IndexedBatches:
    """Global batches from an indexed dataset (``engine.data.PretrainDataset``)."""

    def __init__(self, prefix: str, seq_length: int, global_batch_size: int, train_steps: int, seed: int):
        from engine.data.datasets import PretrainDataset
        from engine.data.indexed_dataset import IndexedDataset
        self.dataset = PretrainDataset(IndexedDataset(prefix), seq_length, max(1, train_steps) * global_batch_size,
                                       seed)
        self.global_batch_size = global_batch_size

    def __call__(self, step: int) -> dict:
        items = [self.dataset[(step * self.global_batch_size + i) % len(self.dataset)]
                 for i in range(self.global_batch_size)]
        return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in ("input_ids", "labels")}


def _batches(run: RunConfig, rank: int, barrier):
    t = run.train
    if run.data.path is not None:
        return IndexedBatches(run.data.path, t.seq_length, t.global_batch_size, t.train_steps, t.seed)
    from engine.data.tokenizer import default_corpus, default_tokenizer
    if rank == 0:
        tokenizer = default_tokenizer(run.data.tokenizer_cache)  # trains and caches it the first time
    barrier()
    if rank != 0:
        tokenizer = default_tokenizer(run.data.tokenizer_cache)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(f"the default tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={run.model.vocab_size}")
    return CorpusBatches(default_corpus(), tokenizer, t.seq_length, t.global_batch_size, t.seed)


# ---- main ---------------------------------------------------------------------------------------
def _error(message: str) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run = load_run_config(args.config, cli_overrides(args))
        validate_run(run, world_size)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        return _error(str(e))
    return train(run, peak_tflops=args.peak_tflops)


def train(run: RunConfig, peak_tflops: Optional[float] = None) -> int:
    import torch.distributed as dist

    from engine.parallel import ParallelLayout
    from engine.parallel.pipeline import build_model_chunks
    from engine.train import LRSchedule, MetricsWriter, Trainer, build_optimizer

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if distributed:
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    elif cuda:
        device = torch.device("cuda", 0)
    try:
        dims = run.parallel.dims()
        layout = ParallelLayout.build(dims) if distributed else ParallelLayout.single()
        rank = layout.rank
        barrier = dist.barrier if distributed else (lambda: None)
        torch.manual_seed(run.train.seed)
        try:
            batches = _batches(run, rank, barrier)
        except ValueError as e:
            return _error(str(e))
        chunks = [c.to(device) for c in build_model_chunks(run.model, layout,
                                                            sequence_parallel=run.train.sequence_parallel,
                                                            layers_per_stage=run.train.layers_per_stage,
                                                            seed=run.train.seed)]
        optimizer = build_optimizer(chunks, layout, run.optim, run.lr.lr)
        trainer = Trainer(chunks, optimizer, layout, run.model, run.train, LRSchedule(run.lr, run.train.train_steps))
        writer = None
        if rank == 0:
            Path(run.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.log_dir) / "config.json").write_text(json.dumps(run.to_dict(), indent=2))
            writer = MetricsWriter(run.log_dir)
            print(f"{PROG}: {run.model.name} ({run.model.num_parameters() / 1e6:.1f}M params), "
                  f"tp={layout.tp_size} pp={layout.pp_size} vpp={layout.vpp_size} dp={layout.dp_size}, "
                  f"{dist.get_backend() if distributed else 'single process'}, device {device}", flush=True)
        ck = run.checkpoint
        if ck.load:
            from engine.train.checkpoint import latest_step, load_checkpoint
            if latest_step(ck.load) is not None:  # a damaged checkpoint raises CheckpointError here
                extra = load_checkpoint(ck.load, chunks, optimizer, layout, run.model)
                trainer.steps_done = extra["step"]  # the data order is a function of the step
                if rank == 0:
                    print(f"{PROG}: resumed from {ck.load} at step {trainer.steps_done}", flush=True)
            elif ck.load != ck.save:  # never a silent fresh start from a mistyped --load
                return _error(f"--load {ck.load}: no checkpoint found there")

        def save() -> None:
            from engine.train.checkpoint import save_checkpoint
            save_checkpoint(ck.save, trainer.steps_done, chunks, optimizer, layout, run.model,
                            keep_last=ck.keep_last)

        from engine.train.observe import ProgressBar, TensorBoardLogger, flops_per_token
        flops = flops_per_token(run.model, run.train.seq_length, run.train.recompute)
        progress = ProgressBar(run.train.train_steps - trainer.steps_done, rank)
        board = TensorBoardLogger(Path(run.log_dir) / "tensorboard", rank)
        while trainer.steps_done < run.train.train_steps:
            metrics = trainer.train_step(batches(trainer.steps_done))
            if writer is not None:
                # achieved model TFLOP/s per device (Megatron's count, recompute excluded) and MFU
                tflops = metrics.tokens_per_s * flops / layout.world_size / 1e12
                extra = {"model_tflops_per_device": tflops}
                if peak_tflops:
                    extra["mfu"] = tflops / peak_tflops
                writer.write(metrics, **extra)
                record = {**dataclasses.asdict(metrics), **extra}
                board.log(record, metrics.step)
                progress.update(record)
                if not progress.enabled:  # the bar replaces the per-step line on a terminal
                    print(f"step {metrics.step:5d}  loss {metrics.loss:.4f}  grad_norm {metrics.grad_norm:.3f}  "
                          f"lr {metrics.lr:.2e}  {metrics.tokens_per_s:,.0f} tok/s  bubble "
                          f"{metrics.bubble_fraction:.2f}" + ("  SKIPPED (non-finite grad norm)" if metrics.skipped else ""),
                          flush=True)
            if ck.save and ck.save_interval and trainer.steps_done % ck.save_interval == 0:
                save()
        if ck.save and (not ck.save_interval or trainer.steps_done % ck.save_interval):
            save()
        progress.close()
        board.close()
        if writer is not None:
            writer.close()
        return 0
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
