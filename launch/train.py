"""Train a GLM model on any TP x PP x DP layout: pretraining, SFT, a reward model or DPO.

    torchrun --nproc-per-node N -m launch.train --config configs/runs/{pretrain,sft,rm,dpo}.yaml \\
        [--mode pretrain|sft|rm|dpo] [--tp T] [--pp P] [--vpp V] [--cp C] [--sequence-parallel] [--micro-batch-size M] \\
        [--global-batch-size G] [--train-steps K] [--seed S] [--log-dir DIR] [--recompute none|full|selective] \\
        [--lr LR] [--save DIR --save-interval N] [--load DIR] [--init-from DIR] [--eval-interval N] ...
    python -m launch.train --config ...          # one process, no torch.distributed

The run YAML composes a model (a preset name, a model YAML path, or a mapping with ``preset:`` plus
field overrides) with the ``mode``, ``parallel``, ``train``, ``optim``, ``lr``, ``data``, ``reward``, ``dpo``
and ``checkpoint`` sections; command-line flags override it, and everything is parsed once into typed
dataclasses (``RunConfig``).

Modes (one Trainer, one objective each, ``engine.train.objectives``):
  pretrain  GLMForCausalLM, token cross entropy. Data: ``data.path`` (text/chat indexed dataset from
            ``launch.preprocess``) or the built-in corpus (``pydoc_data.topics``, default tokenizer),
            packed into ``seq_length + 1`` windows.
  sft       GLMForCausalLM, cross entropy on assistant tokens only. Data: a chat indexed dataset or the
            built-in conversations (``engine.data.builtin``); ``data.pack`` packs several per row.
  rm        GLMForScalarHead, pairwise ranking loss + ``reward.l2_coef`` L2 penalty on the scores, with
            held-out accuracy. Data: a preference indexed dataset or the built-in pairs; optional
            bucket-based length balancing (``data.balance_buckets``).
  dpo       GLMForCausalLM, direct preference optimization (``dpo.beta``, ``dpo.label_smoothing``, ``dpo.loss_type``: DPO, IPO
            or SLiC's hinge) against a frozen reference: the ``--init-from`` checkpoint (required), held on
            the same layout, whose log-probs of each batch's answers are computed before the step; or
            SimPO (``dpo.loss_type: simpo``, ``dpo.gamma``), with no reference. Data: as rm; the answers are the
            tokens after each pair's prompt.
Held-out evaluation: ``data.eval_path`` or ``data.eval_fraction`` of the data, every
``train.eval_interval`` steps and after the last one. ``--init-from DIR`` starts from another run's
checkpoint weights (SFT from pretraining; RM from SFT: trunk copied, fresh value head) when
``--load`` finds nothing to resume.

Backend: NCCL when CUDA is available, else gloo. Rank 0 appends one JSON line per step to
``DIR/metrics.jsonl`` (loss, grad_norm, lr, tokens_per_s, comm bytes per group, bubble, objective
statistics, eval_* on evaluation steps). An invalid configuration prints ``launch.train: error: ...``
and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from engine.config import GLMConfig, config_section, model_from_spec, read_run_file, run_dict
from engine.model.lora import LoRAConfig, add_lora, lora_disabled
from engine.parallel import ParallelDims
from engine.train.lr import LRConfig
from engine.train.objectives import DPO_KEYS, PREFERENCE_LOSSES, DPOObjective, RewardObjective
from engine.train.step import OptimizerConfig, TrainConfig
from launch.runtime import Processes, check_tokenizer, close_after_error, error, exit_process

PROG = "launch.train"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "runs" / "pretrain.yaml"


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    path: Optional[str] = None
    """Indexed dataset prefix (``launch.preprocess`` output; text/chat for pretrain, chat for sft,
    preference for rm); None: the built-in data of the mode."""
    eval_path: Optional[str] = None
    """Held-out indexed dataset prefix (same kind); None: hold out ``eval_fraction`` of the data."""
    eval_fraction: float = 0.0
    """Fraction of the samples held out for evaluation when ``eval_path`` is None (0: no evaluation).
    Not for an indexed pretraining dataset, whose windows repeat across epochs: use eval_path."""
    balance_buckets: int = 0
    """rm: bucket-based length balancing of the training pairs into this many length-difference
    buckets (ChatGLM-RLHF); 0: off."""
    pack: bool = False
    """sft: pack several conversations per row (``PackedSFTDataset``: per-conversation positions, no
    attention across conversations) instead of one padded conversation per row."""
    tokenizer: Optional[str] = None
    """A ChatGLM tokenizer.model (or the model directory holding it), which data.path must have been
    preprocessed with; None: the built-in tokenizer of the tiny model."""
    tokenizer_cache: Optional[str] = None
    """Cache directory of the default tokenizer and built-in datasets (None: ~/.cache/glm-engine)."""


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
    async_save: bool = False
    """Write checkpoints in the background while training goes on (``checkpoint.AsyncCheckpointer``):
    a save blocks only while it copies this rank's state to host memory."""
    init_from: Optional[str] = None
    """Start from the model weights of this checkpoint directory when there is nothing to resume
    (no optimizer state; a reward model takes an LM checkpoint's trunk and keeps a fresh value head). For
    dpo with a reference (every loss but simpo) it is also the frozen reference, on every run, resumes
    included (it must be the same checkpoint)."""


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees of the training layout (dp is derived from the world size)."""

    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline stages."""
    vpp: int = 1
    """Model chunks per pipeline stage (interleaved schedule)."""
    cp: int = 1
    """Context-parallel degree: each sequence split over cp ranks (pretrain and sft)."""

    def dims(self) -> ParallelDims:
        return ParallelDims(tp=self.tp, pp=self.pp, dp=None, vpp=self.vpp, cp=self.cp)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, parsed once from YAML + command line."""

    model: GLMConfig
    mode: str = "pretrain"
    """pretrain, sft or rm."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reward: RewardObjective = field(default_factory=RewardObjective)
    """rm: the loss options (``l2_coef``)."""
    dpo: DPOObjective = field(default_factory=DPOObjective)
    """dpo: the loss and its options (``loss_type``, ``beta``, ``label_smoothing``, ``gamma``, ``offload_reference``)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (``rank`` > 0): train them (and an rm's value head) instead of the model's weights; dpo's
    reference is then the model with its adapters off, no second copy."""
    log_dir: str = "runs/pretrain"

    def to_dict(self) -> dict:
        return run_dict(self)


# ---- config parsing -------------------------------------------------------------------------------
RUN_SECTIONS = {"model", "mode", "parallel", "train", "optim", "lr", "data", "checkpoint", "reward", "dpo", "lora",
                "log_dir"}
MODES = ("pretrain", "sft", "rm", "dpo")


def load_run_config(path: Optional[str | os.PathLike], overrides: Optional[dict] = None) -> RunConfig:
    """Read a run YAML and apply ``overrides`` ``{section: {field: value}}`` (``log_dir``/``model``/``mode``: a value)."""
    raw, base = read_run_file(path, RUN_SECTIONS, overrides)
    mode = raw.get("mode", "pretrain")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    return RunConfig(model=model_from_spec(raw.get("model", "tiny"), base), mode=mode,
                     parallel=config_section(ParallelConfig, raw.get("parallel"), "parallel"),
                     train=config_section(TrainConfig, raw.get("train"), "train"),
                     optim=config_section(OptimizerConfig, raw.get("optim"), "optim"),
                     lr=config_section(LRConfig, raw.get("lr"), "lr"),
                     data=config_section(DataConfig, raw.get("data"), "data"),
                     checkpoint=config_section(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
                     reward=config_section(RewardObjective, raw.get("reward"), "reward"),
                     dpo=config_section(DPOObjective, raw.get("dpo"), "dpo"),
                     lora=LoRAConfig.from_dict(raw.get("lora")),
                     log_dir=str(raw.get("log_dir", f"runs/{mode}")))


def validate_run(run: RunConfig, world_size: int) -> ParallelDims:
    """Every check that needs no process group; ValueError naming each problem. Returns the dims."""
    dims = run.train.validate(run.parallel.dims(), run.model, world_size)
    if dims.cp > 1 and run.mode in ("rm", "dpo"):
        raise ValueError(f"parallel.cp={dims.cp}: context parallelism is for pretrain and sft; {run.mode} scores whole "
                         "sequences (use cp=1)")
    check_tokenizer(run.data.tokenizer, run.checkpoint.init_from, "--init-from")
    if run.mode == "dpo" and not run.checkpoint.init_from and (run.dpo.uses_reference or not run.checkpoint.load):
        raise ValueError("mode dpo needs --init-from DIR: the SFT checkpoint that is the starting policy and (but for "
                         "simpo, which needs it only to start) the frozen reference")
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
    if ck.async_save and not ck.save:
        raise ValueError("--async-save needs --save DIR")
    d = run.data
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_path and d.eval_fraction:
        raise ValueError("give data.eval_path or data.eval_fraction, not both")
    if run.mode == "pretrain" and not d.path and d.eval_path:
        raise ValueError("data.eval_path is a held-out indexed dataset for data.path; the built-in corpus holds "
                         "out data.eval_fraction of its windows instead")
    if run.mode == "pretrain" and d.path and d.eval_fraction:
        raise ValueError("data.eval_fraction splits samples, but an indexed pretraining dataset repeats its "
                         "documents across epochs; preprocess a held-out file and pass data.eval_path")
    if d.balance_buckets < 0 or (d.balance_buckets and run.mode not in ("rm", "dpo")):
        raise ValueError(f"data.balance_buckets={d.balance_buckets} must be >= 0 and is for preference pairs (mode rm "
                         "or dpo) only")
    if not isinstance(d.pack, bool) or (d.pack and run.mode != "sft"):
        raise ValueError(f"data.pack={d.pack!r} must be true or false and packs conversations: mode sft only "
                         "(a reward model packs its pairs with reward.pack, --pack-pairs)")
    if run.lora.enabled and run.mode == "dpo" and run.dpo.offload_reference:
        raise ValueError("dpo.offload_reference: a LoRA run has no reference copy to offload (its reference is the "
                         "model with the adapters off); drop --offload-reference")
    if run.reward.pack and (run.mode != "rm" or run.parallel.pp > 1):
        raise ValueError(f"reward.pack packs preference pairs: mode rm with pp=1 (got mode {run.mode}, "
                         f"pp={run.parallel.pp}; pipeline stages exchange fixed-size micro-batches)")
    return dims


def check_resumed(extra: dict, run: RunConfig, reference_id: Optional[str]) -> None:
    """CheckpointError unless the run saved in ``checkpoint.load`` (its ``extra`` state) continues as ``run``:
    the same mode; for dpo the same loss type and, with a reference, the same reference checkpoint
    (``reference_id``: the fingerprint of ``--init-from``)."""
    from engine.train.checkpoint import CheckpointError
    ck = run.checkpoint
    if extra.get("mode", run.mode) != run.mode:
        raise CheckpointError(f"--load {ck.load} holds a {extra['mode']} run; this run is {run.mode}")
    if run.mode != "dpo":
        return
    saved_loss = extra.get("dpo_loss")
    if saved_loss is not None and saved_loss != run.dpo.loss_type:
        raise CheckpointError(f"--load {ck.load} is a dpo run with loss_type {saved_loss}; this run asks for "
                              f"{run.dpo.loss_type} (to change the loss, start a new run with --init-from that "
                              "checkpoint)")
    # older dpo checkpoints did not save their loss, but all of them trained against a reference
    if saved_loss is None and "reference" in extra and not run.dpo.uses_reference:
        raise CheckpointError(f"--load {ck.load} is a dpo run against a reference; this run asks for "
                              f"{run.dpo.loss_type}, which has none (start a new run with --init-from that checkpoint)")
    if reference_id is not None and extra.get("reference", reference_id) != reference_id:
        raise CheckpointError(f"--load {ck.load} is a dpo run against another reference than --init-from "
                              f"{ck.init_from} (checkpoint fingerprints {extra['reference']} vs {reference_id}): "
                              "resume with the SFT checkpoint it started from")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="run YAML (default: configs/runs/<mode>.yaml, i.e. pretrain.yaml without --mode)")
    p.add_argument("--model", help="model preset name, model YAML, or a Hugging Face / THUDM model directory "
                                   "(its config.json; overrides the run's model)")
    p.add_argument("--mode", choices=MODES, help="what to train (overrides the run's mode)")
    p.add_argument("--dpo-beta", type=float, help="dpo: strength of the KL constraint to the reference (default 0.1)")
    p.add_argument("--dpo-loss", choices=PREFERENCE_LOSSES,
                   help="dpo: sigmoid (DPO, default), ipo, hinge (SLiC) or simpo (SimPO: no reference model)")
    p.add_argument("--dpo-gamma", type=float, help="dpo with --dpo-loss simpo: the target reward margin")
    p.add_argument("--offload-reference", action=argparse.BooleanOptionalAction, default=None,
                   help="dpo: keep the frozen reference in host memory between its forwards")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights (0: off)")
    p.add_argument("--lora-alpha", type=float, help="LoRA: adapters' outputs are scaled by alpha / rank (default 16)")
    p.add_argument("--lora-targets", type=lambda s: tuple(s.split(",")),
                   help="LoRA: comma-separated projections to adapt (default qkv,dense,gate_up,down)")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--vpp", type=int)
    p.add_argument("--cp", type=int, help="context parallel: split each sequence over C ranks (seq length divisible "
                                          "by 2 C)")
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
    p.add_argument("--data-path", help="indexed dataset prefix (default: the mode's built-in data)")
    p.add_argument("--tokenizer", help="ChatGLM tokenizer.model, or the model directory holding it (default: the "
                                       "built-in tokenizer of the tiny model)")
    p.add_argument("--eval-path", help="held-out indexed dataset prefix")
    p.add_argument("--eval-fraction", type=float, help="fraction of the data held out for evaluation")
    p.add_argument("--pack", action="store_true", default=None,
                   help="sft: pack several conversations per row (data.pack)")
    p.add_argument("--pack-pairs", action="store_true", default=None,
                   help="rm: pack each micro-batch's chosen and rejected sequences into as few rows as hold them "
                        "(reward.pack; pp=1)")
    p.add_argument("--eval-interval", type=int, help="evaluate every N steps (0: after the last step only)")
    p.add_argument("--init-from", help="checkpoint directory whose weights initialise a fresh run")
    p.add_argument("--save", help="checkpoint directory to write")
    p.add_argument("--save-interval", type=int, help="save every N steps (0: only at the end)")
    p.add_argument("--load", help="checkpoint directory to resume from (its latest step; layouts may differ)")
    p.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints")
    p.add_argument("--async-save", action="store_true", default=None,
                   help="write checkpoints in the background while training goes on (checkpoint.async_save)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s; when given, metrics include MFU (model FLOPs, Megatron's count) "
                        "and HFU (plus activation recompute)")
    p.add_argument("--log-dir")
    return p


_FLAG_TARGETS = {
    "tp": ("parallel", "tp"), "pp": ("parallel", "pp"), "vpp": ("parallel", "vpp"), "cp": ("parallel", "cp"),
    "sequence_parallel": ("train", "sequence_parallel"), "layers_per_stage": ("train", "layers_per_stage"),
    "micro_batch_size": ("train", "micro_batch_size"), "global_batch_size": ("train", "global_batch_size"),
    "seq_length": ("train", "seq_length"), "train_steps": ("train", "train_steps"), "seed": ("train", "seed"),
    "recompute": ("train", "recompute"), "lr": ("lr", "lr"), "min_lr": ("lr", "min_lr"),
    "warmup_steps": ("lr", "warmup_steps"), "weight_decay": ("optim", "weight_decay"),
    "clip_grad": ("optim", "clip_grad"), "distributed_optimizer": ("optim", "use_distributed_optimizer"),
    "mixed_precision": ("optim", "mixed_precision"), "data_path": ("data", "path"), "tokenizer": ("data", "tokenizer"),
    "eval_path": ("data", "eval_path"), "eval_fraction": ("data", "eval_fraction"), "pack": ("data", "pack"),
    "eval_interval": ("train", "eval_interval"), "init_from": ("checkpoint", "init_from"),
    "save": ("checkpoint", "save"), "save_interval": ("checkpoint", "save_interval"),
    "load": ("checkpoint", "load"), "keep_last": ("checkpoint", "keep_last"),
    "async_save": ("checkpoint", "async_save"), "pack_pairs": ("reward", "pack"), "dpo_beta": ("dpo", "beta"),
    "dpo_loss": ("dpo", "loss_type"), "dpo_gamma": ("dpo", "gamma"), "offload_reference": ("dpo", "offload_reference"),
    "lora_rank": ("lora", "rank"), "lora_alpha": ("lora", "alpha"), "lora_targets": ("lora", "targets"),
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
    if args.mode is not None:
        out["mode"] = args.mode
    return out


# ---- multi-node command line ----------------------------------------------------------------------
def torchrun_command(nnodes: int, nproc_per_node: int, rdzv_endpoint: str, rdzv_id: str,
                     train_args: Sequence[str], python: str = "python") -> list[str]:
    """The per-node torchrun command (c10d rendezvous) that ``launch/slurm_train.sh`` runs under srun."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            f"--rdzv-id={rdzv_id}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
            "-m", PROG, *train_args]


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The run's data: ``train(step) -> global batch``, held-out global batches, the batch keys."""

    train: object
    held_out: list
    tokenizer_fingerprint: Optional[str] = None
    left_out: int = 0
    """dpo: pairs left out because seq_length cuts an answer off entirely (nothing to score)."""


KEYS = {"pretrain": ("input_ids", "labels"), "sft": ("input_ids", "labels", "attention_mask"),
        "rm": ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"),
        "dpo": DPO_KEYS}
PACKED_SFT_KEYS = KEYS["sft"] + ("position_ids", "segment_ids")
KINDS = {"sft": "chat", "rm": "preference", "dpo": "preference"}


def _tokenizer(run: RunConfig, rank: int, procs):
    return procs.tokenizer(rank, run.data.tokenizer, run.data.tokenizer_cache, run.model.vocab_size)


def _open_indexed(prefix: str, run: RunConfig, what: str, tokenizer=None):
    """``prefix``'s dataset; with ``tokenizer`` (``--tokenizer``) a dataset tokenized by another is refused."""
    from engine.data.indexed_dataset import IndexedDataset
    indexed = IndexedDataset(prefix, tokenizer)
    if indexed.vocab_size > run.model.vocab_size:
        raise ValueError(f"{what} {prefix} was tokenized with vocab_size={indexed.vocab_size}, more than the "
                         f"model's vocab_size={run.model.vocab_size}")
    return indexed


def _dataset(indexed, run: RunConfig):
    from engine.data.datasets import PackedSFTDataset, PreferenceDataset, PretrainDataset, SFTDataset
    t = run.train
    if run.mode == "sft":
        if run.data.pack:
            return PackedSFTDataset(indexed, t.seq_length, seed=t.seed)
        return SFTDataset(indexed, t.seq_length)
    if run.mode in ("rm", "dpo"):
        return PreferenceDataset(indexed, t.seq_length)
    return PretrainDataset(indexed, t.seq_length, max(1, t.train_steps) * t.global_batch_size, t.seed)


def build_data(run: RunConfig, rank: int, procs) -> RunData:
    """Training batches and held-out batches of the run's mode (the same on every rank)."""
    from engine.data.datasets import bucket_balance
    from engine.data.builtin import split_indices
    from engine.train.batches import CorpusBatches, DatasetBatches, Subset, eval_batches
    d, t, keys = run.data, run.train, (PACKED_SFT_KEYS if run.data.pack else KEYS[run.mode])
    fingerprint = None
    if d.path is None:
        tokenizer = _tokenizer(run, rank, procs)
        fingerprint = tokenizer.fingerprint()
        if run.mode == "pretrain":
            from engine.data.tokenizer import default_corpus
            corpus = CorpusBatches(default_corpus(), tokenizer, t.seq_length, t.global_batch_size, t.seed,
                                   d.eval_fraction)
            return RunData(corpus, corpus.held_out(t.eval_batches), fingerprint)
        from engine.data.builtin import builtin_dataset
        from engine.data.indexed_dataset import IndexedDataset
        prefix = procs.rank0_first(rank, lambda: builtin_dataset(KINDS[run.mode], tokenizer, d.tokenizer_cache))
        dataset = _dataset(IndexedDataset(prefix, tokenizer), run)
    else:
        tokenizer = _tokenizer(run, rank, procs) if d.tokenizer is not None else None
        fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
        dataset = _dataset(_open_indexed(d.path, run, "data.path", tokenizer), run)
    train_idx, held_idx = split_indices(len(dataset), d.eval_fraction, t.seed)
    left_out = 0
    if run.mode == "dpo":  # a pair whose prompt fills the window has no answer token to score: left out, counted
        fits = dataset.answers_fit()
        left_out = int((~fits).sum())
        train_idx, held_idx = train_idx[fits[train_idx]], held_idx[fits[held_idx]]
        if not len(train_idx):
            raise ValueError(f"seq_length={t.seq_length} cuts off an answer of every training pair (prompts fill the "
                             "window): raise --seq-length")
    if run.mode == "pretrain":  # windows of one epoch in order; eval_fraction is refused for it
        train_idx = None
    if d.balance_buckets:
        lengths = dataset.pair_lengths()[train_idx]
        train_idx = train_idx[bucket_balance(lengths, num_buckets=d.balance_buckets, seed=t.seed).kept]
    held = Subset(dataset, held_idx)
    if d.eval_path:
        held = _dataset(_open_indexed(d.eval_path, run, "data.eval_path", tokenizer if d.path else None), run)
        if run.mode == "dpo":
            fits = held.answers_fit()
            left_out += int((~fits).sum())
            held = Subset(held, np.nonzero(fits)[0])
    held_out = eval_batches(held, t.global_batch_size, t.eval_batches, keys) if len(held) else []
    if len(held) and not held_out:
        raise ValueError(f"the held-out split has {len(held)} samples, fewer than one global batch of "
                         f"{t.global_batch_size}: raise data.eval_fraction or lower global_batch_size")
    return RunData(DatasetBatches(Subset(dataset, train_idx), t.global_batch_size, t.seed, keys), held_out,
                   fingerprint, left_out)


# ---- main ---------------------------------------------------------------------------------------
def _error(message: str) -> int:
    return error(PROG, message)


def run_from_args(args: argparse.Namespace) -> RunConfig:
    """The run YAML (``--config``, else the mode's own ``configs/runs/<mode>.yaml``) with the flags applied."""
    config = args.config or DEFAULT_CONFIG.parent / f"{args.mode or 'pretrain'}.yaml"
    return load_run_config(config, cli_overrides(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run = run_from_args(args)
        run.lora.check_flags(args.lora_alpha is not None, args.lora_targets is not None)
        validate_run(run, world_size)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        return _error(str(e))
    return train(run, peak_tflops=args.peak_tflops)


def _summary(metrics, record: dict) -> str:
    line = (f"step {metrics.step:5d}  loss {metrics.loss:.4f}  grad_norm {metrics.grad_norm:.3f}  lr {metrics.lr:.2e}  "
            f"{metrics.tokens_per_s:,.0f} tok/s  bubble {metrics.bubble_fraction:.2f}")
    if "accuracy" in record:
        line += f"  acc {record['accuracy']:.3f}"
    for k in ("eval_loss", "eval_accuracy"):
        if k in record:
            line += f"  {k} {record[k]:.4f}"
    return line + ("  SKIPPED (non-finite grad norm)" if metrics.skipped else "")


def _initialise(run: RunConfig, chunks, layout, tokenizer_fingerprint) -> None:
    """``checkpoint.init_from``: copy a checkpoint's model weights (any layout) into fresh chunks; a
    reward model may start from a causal LM's trunk (its value head stays freshly initialised)."""
    from engine.train.checkpoint import load_model_weights
    load_model_weights(run.checkpoint.init_from, chunks, layout, run.model, tokenizer_fingerprint=tokenizer_fingerprint,
                       allow_missing=("value_head.",) if run.mode == "rm" else ())


def train(run: RunConfig, peak_tflops: Optional[float] = None) -> int:
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    from engine.parallel import ParallelLayout
    from engine.parallel.pipeline import build_model_chunks
    from engine.train import LRSchedule, MetricsWriter, Trainer, build_optimizer
    from engine.train.checkpoint import (AsyncCheckpointer, CheckpointError, latest_step, load_checkpoint,
                                         save_checkpoint)
    from engine.train.objectives import LanguageModelObjective

    with Processes() as procs:
        device = procs.device
        dims = run.parallel.dims()
        layout = ParallelLayout.build(dims) if procs.distributed else ParallelLayout.single()
        rank = layout.rank
        torch.manual_seed(run.train.seed)
        try:
            data = build_data(run, rank, procs)
        except ValueError as e:
            return _error(str(e))
        model_cls = GLMForScalarHead if run.mode == "rm" else GLMForCausalLM
        objective = {"rm": run.reward, "dpo": run.dpo}.get(run.mode, LanguageModelObjective(run.train.ignore_index))
        def build(cls) -> list:
            return [c.to(device) for c in build_model_chunks(run.model, layout, model_cls=cls,
                                                              sequence_parallel=run.train.sequence_parallel,
                                                              layers_per_stage=run.train.layers_per_stage,
                                                              seed=run.train.seed)]
        chunks = build(model_cls)
        if run.lora.enabled:  # before any loading: init-from folds a checkpoint's adapters into the weights
            add_lora(chunks, run.lora, layout, seed=run.train.seed,
                     keep_trainable=("value_head.",) if run.mode == "rm" else ())
        ck = run.checkpoint
        try:
            # a damaged checkpoint raises CheckpointError here
            resume = bool(ck.load) and latest_step(ck.load) is not None
            if ck.load and not resume and ck.load != ck.save:  # never a silent fresh start from a mistyped --load
                return _error(f"--load {ck.load}: no checkpoint found there")
            if run.mode == "dpo" and not resume and not ck.init_from:  # --load found nothing: this run starts
                return _error("mode dpo needs --init-from DIR to start: the SFT checkpoint it trains from")
            if ck.init_from and not resume:
                # before the optimizer exists: under ZeRO-1 / bf16 it copies the weights into its fp32
                # master at construction, and a later load into the params alone would be undone by step()
                _initialise(run, chunks, layout, data.tokenizer_fingerprint)
        except CheckpointError as e:
            return _error(str(e))
        reference, reference_id = None, None
        if run.mode == "dpo" and run.dpo.uses_reference:  # the frozen reference: --init-from, on the same layout
            from engine.train.checkpoint import checkpoint_fingerprint, load_model_weights
            try:
                if not run.lora.enabled:  # with LoRA the reference is the policy's base model: no copy
                    reference = build(GLMForCausalLM)
                    load_model_weights(ck.init_from, reference, layout, run.model,
                                       tokenizer_fingerprint=data.tokenizer_fingerprint)
                reference_id = checkpoint_fingerprint(ck.init_from)  # saved with the run, checked on resume
            except CheckpointError as e:
                return _error(str(e))
        optimizer = build_optimizer(chunks, layout, run.optim, run.lr.lr)
        trainer = Trainer(chunks, optimizer, layout, run.model, run.train, LRSchedule(run.lr, run.train.train_steps),
                          objective)
        for chunk in reference or ():  # in the policy's compute dtype (bf16 under mixed precision), no gradients
            chunk.to(trainer.dtype).eval().requires_grad_(False)
        offloader = None
        if reference is not None and run.dpo.offload_reference:
            from engine.rlhf.offload import Offloader
            offloader = Offloader(trainer.device)
            offloader.add_model("reference", reference)
            offloader.ensure()  # to host memory until the first batch needs it

        def with_reference(batch: dict) -> dict:
            """dpo: the batch with the reference's log-probs of its answers (other modes: as it is)."""
            if reference_id is not None and reference is None:  # LoRA: the policy with its adapters off
                with lora_disabled(chunks):
                    return {**batch, **run.dpo.reference_logprobs(trainer, chunks, batch)}
            if reference is None:
                return batch
            if offloader is not None:
                offloader.ensure("reference")
            out = {**batch, **run.dpo.reference_logprobs(trainer, reference, batch)}
            if offloader is not None:
                offloader.ensure()  # back to host memory while the policy trains
            return out
        if resume:
            try:
                extra = load_checkpoint(ck.load, chunks, optimizer, layout, run.model,
                                        tokenizer_fingerprint=data.tokenizer_fingerprint)
                check_resumed(extra, run, reference_id)
            except CheckpointError as e:
                return _error(str(e))
            trainer.steps_done = extra["step"]  # the data order is a function of the step
        # fixed batches, scored by the reference once: after a resume has loaded the weights (with LoRA the
        # reference is the policy's frozen weights, which the checkpoint holds)
        held_out = [with_reference(b) for b in data.held_out]
        writer = None
        if rank == 0:
            Path(run.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.log_dir) / "config.json").write_text(json.dumps(run.to_dict(), indent=2))
            writer = MetricsWriter(run.log_dir)
            print(f"{PROG}: {run.mode} {model_cls.__name__} {run.model.name} "
                  f"({run.model.num_parameters() / 1e6:.1f}M params), "
                  f"tp={layout.tp_size} pp={layout.pp_size} vpp={layout.vpp_size} cp={layout.cp_size} "
                  f"dp={layout.dp_size}, {procs.backend}, device {device}", flush=True)
            if run.lora.enabled:
                n = sum(p.numel() for p in optimizer.params)
                print(f"{PROG}: LoRA rank {run.lora.rank} alpha {run.lora.alpha:g} on {','.join(run.lora.targets)}: "
                      f"{n / 1e6:.2f}M trainable parameters on this rank, the model's weights frozen", flush=True)
            if resume:
                print(f"{PROG}: resumed from {ck.load} at step {trainer.steps_done}", flush=True)
            elif ck.init_from:
                print(f"{PROG}: initialised from the weights in {ck.init_from}", flush=True)
            if run.mode == "dpo":
                print(f"{PROG}: {run.dpo.loss_type} loss, beta {run.dpo.beta}, "
                      + ("frozen reference from --init-from" if reference is not None else
                         "reference: the --init-from weights with the adapters off" if reference_id else
                         "no reference model")
                      + (", in host memory between its forwards" if offloader is not None else ""), flush=True)
            if data.left_out:
                print(f"{PROG}: {data.left_out} preference pairs left out: seq_length={run.train.seq_length} cuts off "
                      "an answer entirely", flush=True)

        saver = AsyncCheckpointer(layout) if ck.async_save else None

        def save() -> None:
            (saver.save if saver is not None else save_checkpoint)(
                ck.save, trainer.steps_done, chunks, optimizer, layout, run.model,
                extra_state={"mode": run.mode, **({"dpo_loss": run.dpo.loss_type} if run.mode == "dpo" else {}),
                             **({"reference": reference_id} if reference_id else {})},
                keep_last=ck.keep_last, tokenizer_fingerprint=data.tokenizer_fingerprint)

        from engine.train.observe import ProgressBar, TensorBoardLogger, flops_per_token
        # model FLOPs (what MFU counts) leave out activation recompute; hardware FLOPs (HFU) include it
        flops = flops_per_token(run.model, run.train.seq_length, "none", lm_head=run.mode != "rm", lora=run.lora)
        hw_flops = flops_per_token(run.model, run.train.seq_length, run.train.recompute, lm_head=run.mode != "rm",
                                   lora=run.lora)
        progress = ProgressBar(run.train.train_steps - trainer.steps_done, rank)
        board = TensorBoardLogger(Path(run.log_dir) / "tensorboard", rank)
        t = run.train
        try:
            while trainer.steps_done < t.train_steps:
                batch = data.train(trainer.steps_done)
                started = time.perf_counter()
                batch = with_reference(batch)
                reference_s = time.perf_counter() - started
                metrics = trainer.train_step(batch)
                # dpo: the reference's forward (and its offload round trip), which tokens_per_s does not time
                extra = {"reference_s": reference_s} if reference_id is not None else {}
                done = trainer.steps_done
                if held_out and ((t.eval_interval and done % t.eval_interval == 0) or done == t.train_steps):
                    extra.update({f"eval_{k}": v for k, v in trainer.evaluate(held_out).items()})
                if writer is not None:
                    # achieved TFLOP/s per device (Megatron's count): model (recompute excluded) -> MFU,
                    # hardware (recompute included) -> HFU; equal without recompute
                    tflops = metrics.tokens_per_s * flops / layout.world_size / 1e12
                    hw_tflops = metrics.tokens_per_s * hw_flops / layout.world_size / 1e12
                    extra.update(model_tflops_per_device=tflops, hardware_tflops_per_device=hw_tflops)
                    if peak_tflops:
                        extra.update(mfu=tflops / peak_tflops, hfu=hw_tflops / peak_tflops)
                    writer.write(metrics, **extra)
                    record = {**metrics.record(), **extra}
                    board.log(record, metrics.step)
                    progress.update(record)
                    if not progress.enabled:  # the bar replaces the per-step line on a terminal
                        print(_summary(metrics, record), flush=True)
                if ck.save and ck.save_interval and trainer.steps_done % ck.save_interval == 0:
                    save()
            if ck.save and (not ck.save_interval or trainer.steps_done % ck.save_interval):
                save()
        except BaseException:
            if saver is not None:
                close_after_error(saver.close, PROG)  # the training error is the one to report
            raise
        if saver is not None:  # the save in flight completes (or raises) before the process group goes
            saver.close()
        progress.close()
        board.close()
        if writer is not None:
            writer.close()
        procs.done()
        return 0


if __name__ == "__main__":
    exit_process(main())
