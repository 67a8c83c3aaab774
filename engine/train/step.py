"""One training step over any TP x PP x DP layout: schedule, loss scaling, grad sync, clip, AdamW step.

Loss: mean token cross entropy over the GLOBAL batch, L = sum_tokens CE / N, N = non-ignored tokens of
the whole global batch (every rank holds the global batch's labels, so N needs no communication).
Each micro-batch backpropagates ``CE_sum(mb) * dp / N``: the DistributedOptimizer averages gradients
over DP (divides by dp, then sums), so the synced gradient is exactly dL/dw of the single-process
full-batch loss, whatever the split into micro-batches and DP ranks (and however unevenly the
ignored tokens fall).

    split the dp rank's rows into m micro-batches -> pipeline schedule (``schedules.run_schedule``;
    pp = 1 is the plain gradient-accumulation loop) -> optimizer.finish_grad_sync() -> clip + AdamW
    step with lr(step) -> metrics (loss reduced over DP and PP, comm bytes from the ledger delta,
    bubble).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import kernels
from engine.config import GLMConfig
from engine.parallel import comm
from engine.parallel.accounting import analytic_bubble
from engine.parallel.pipeline import activation_shape, chunk_named_parameters
from engine.parallel.schedules import check_interleaved, measure_bubble, run_schedule
from engine.train.metrics import (StepMetrics, ledger_delta, ledger_totals, peak_memory, reset_peak_memory)

IGNORE_INDEX = -100
STAT_BYTES = 4  # the vocab-parallel loss reduces fp32 per-row statistics
RECOMPUTE = ("none", "full", "selective")


def record_vocab_parallel_loss(layout, rows: int) -> None:
    """Record the traffic of ``kernels.cross_entropy(..., group=tp)``, which calls torch.distributed
    directly (kernels do not depend on ``engine.parallel``): an all-reduce (max) of the [rows] row
    maxima and one of the packed [2, rows] (sum of exponentials, label logit), fp32 (kernel module
    doc). The backward is local."""
    for numel in (rows, 2 * rows):
        traffic = 2.0 * (layout.tp_size - 1) / layout.tp_size * numel * STAT_BYTES
        layout.ledger.record("tp", "all_reduce", traffic, traffic)


@dataclass(frozen=True)
class TrainConfig:
    """Batch shape, run length and memory options of a training run."""

    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one rank."""
    seq_length: int = 128
    """Tokens per sequence."""
    train_steps: int = 10
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed of the weight init and the data order."""
    recompute: str = "none"
    """Activation recompute: none, full (whole block) or selective (attention core)."""
    sequence_parallel: bool = False
    """Split the residual stream along the sequence over TP ranks (needs seq_length % tp == 0)."""
    layers_per_stage: Optional[tuple[int, ...]] = None
    """Layers per virtual pipeline stage (pp * vpp entries); None splits evenly."""
    ignore_index: int = IGNORE_INDEX
    """Label value that takes no loss."""

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def validate(self, dims, config: GLMConfig, world_size: Optional[int] = None):
        """Validate this run against a layout (and fill in dp): ValueError naming every problem."""
        problems = []
        try:
            dims = dims.validate(world_size, config, self.global_batch_size, self.micro_batch_size,
                                 self.layers_per_stage)
        except ValueError as e:
            problems.append(str(e).removeprefix("invalid parallel layout: "))
        if self.recompute not in RECOMPUTE:
            problems.append(f"recompute={self.recompute!r} must be one of {RECOMPUTE}")
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            problems.append(f"seq_length={self.seq_length!r} must be a positive integer")
        elif self.sequence_parallel and dims.tp > 1 and self.seq_length % dims.tp != 0:
            problems.append(f"sequence_parallel needs seq_length={self.seq_length} divisible by tp={dims.tp}")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            problems.append(f"train_steps={self.train_steps!r} must be a non-negative integer")
        if not problems and dims.vpp > 1:
            try:
                check_interleaved(dims.pp, dims.vpp, self.num_microbatches(dims.dp_size))
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("invalid training setup: " + "; ".join(problems))
        return dims


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and gradient-handling options (the learning rate lives in ``LRConfig``)."""

    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings (not norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard fp32 master weights and moments over data-parallel ranks."""
    mixed_precision: str = "fp32"
    """Parameter/activation dtype: fp32, or bf16 with fp32 master weights and grads."""
    bucket_size_bytes: int = 40 * 2**20
    """Gradient bucket size of the DP reduction."""
    backend: str = "auto"
    """Kernel backend of the AdamW update."""


def build_optimizer(chunks: Sequence[torch.nn.Module], layout, optim: OptimizerConfig, lr: float):
    """A ``DistributedOptimizer`` over every chunk's parameters (clipping done in its ``step``)."""
    from engine.optim import DistributedOptimizer
    return DistributedOptimizer(chunk_named_parameters(chunks), layout, lr=lr, betas=tuple(optim.betas),
                                eps=optim.eps, weight_decay=optim.weight_decay,
                                use_distributed_optimizer=optim.use_distributed_optimizer,
                                bucket_size_bytes=optim.bucket_size_bytes, mixed_precision=optim.mixed_precision,
                                backend=optim.backend, max_grad_norm=optim.clip_grad or None)


class Trainer:
    """Runs training steps of this rank's model chunks.

    ``chunks``: this rank's pipeline chunks (``pipeline.build_model_chunks``; one model when pp = 1).
    ``optimizer``: a ``DistributedOptimizer`` over them (``build_optimizer``). ``lr``: step -> learning
    rate (``LRSchedule``). Every rank passes the same global batch to ``train_step``.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer, layout, config: GLMConfig,
                 train: TrainConfig, lr: Callable[[int], float]):
        self.dims = train.validate(layout.dims, config, layout.world_size)
        self.chunks, self.optimizer, self.layout, self.config = list(chunks), optimizer, layout, config
        self.train, self.lr = train, lr
        self.cross_entropy_backend = self.chunks[-1].spec.kernels.cross_entropy  # the chunks' kernel plan
        self.last_schedule = None  # the last step's ScheduleResult (timeline, per-micro-batch losses)
        for chunk in self.chunks:
            chunk.set_recompute(train.recompute)
        self.steps_done = 0
        param = next(self.chunks[0].parameters())
        self.device, self.dtype = param.device, param.dtype
        self.shape = activation_shape(train.micro_batch_size, train.seq_length, config.hidden_size,
                                      layout.tp_size, train.sequence_parallel)
        self._loss_scale = 0.0

    # ---- batches -------------------------------------------------------------------------------
    def microbatches(self, batch: dict) -> tuple[list[dict], int]:
        """This DP rank's micro-batches of a global batch, and the global count of loss tokens."""
        t = self.train
        ids, labels = batch["input_ids"], batch["labels"]
        expected = (t.global_batch_size, t.seq_length)
        if tuple(ids.shape) != expected or tuple(labels.shape) != expected:
            raise ValueError(f"global batch input_ids {tuple(ids.shape)} / labels {tuple(labels.shape)} must be "
                             f"[global_batch_size, seq_length] = {list(expected)}")
        loss_tokens = int((labels != t.ignore_index).sum())
        dp, rank = self.layout.dp_size, self.layout.dp_rank
        rows = t.global_batch_size // dp
        mine = {k: v[rank * rows:(rank + 1) * rows].to(self.device) for k, v in batch.items() if v is not None}
        mbs = t.micro_batch_size
        return [{k: v[i:i + mbs] for k, v in mine.items()} for i in range(0, rows, mbs)], loss_tokens

    def _loss(self, logits: torch.Tensor, mb: dict) -> torch.Tensor:
        """Last stage: this micro-batch's share of the global mean loss, scaled for the DP average."""
        return self._ce_sum(logits, mb) * self._loss_scale

    def _ce_sum(self, logits: torch.Tensor, mb: dict) -> torch.Tensor:
        """Summed token cross entropy. Under TP the logits stay vocab-sharded ``[b, s, v/tp]``: the
        vocab-parallel kernel exchanges per-row statistics, never the logits."""
        labels = mb["labels"]
        if self.layout.tp_size == 1:
            return kernels.cross_entropy(logits, labels, ignore_index=self.train.ignore_index, reduction="sum",
                                         backend=self.cross_entropy_backend)
        loss = kernels.cross_entropy(logits, labels, ignore_index=self.train.ignore_index, group=self.layout.tp_group,
                                     reduction="sum", backend=self.cross_entropy_backend)
        record_vocab_parallel_loss(self.layout, labels.numel())
        return loss

    def _reduce_loss(self, local_sum: float) -> float:
        """Sum a last-stage quantity over DP and PP (non-last stages contribute 0); "metrics" traffic."""
        t = torch.tensor([local_sum], dtype=torch.float64, device=self.device)
        comm.all_reduce(t, self.layout.dp_group, self.layout.ledger, "metrics")
        comm.all_reduce(t, self.layout.pp_group, self.layout.ledger, "metrics")
        return t.item()

    # ---- steps ---------------------------------------------------------------------------------
    def train_step(self, batch: dict, on_grads: Optional[Callable[["Trainer"], None]] = None) -> StepMetrics:
        """One optimizer step on a global batch ``{"input_ids", "labels"}`` (``[G, s]`` each; labels
        already shifted, ``ignore_index`` where no loss). ``on_grads(trainer)`` runs after the gradient
        sync, before clipping and the update (inspection, logging)."""
        t0 = time.perf_counter()
        reset_peak_memory(self.device)
        before = ledger_totals(self.layout.ledger)
        mbs, loss_tokens = self.microbatches(batch)
        if loss_tokens == 0:
            raise ValueError("the global batch has no token that takes loss (every label is ignore_index)")
        self._loss_scale = self.layout.dp_size / loss_tokens
        self.optimizer.zero_grad()
        result = run_schedule(self.chunks, self.layout, mbs, self.shape, loss_fn=self._loss, dtype=self.dtype)
        self.optimizer.finish_grad_sync()
        if on_grads is not None:
            on_grads(self)
        lr = float(self.lr(self.steps_done))
        grad_norm, skipped = self.optimizer.step(lr=lr)
        seconds = time.perf_counter() - t0
        comm_bytes = ledger_delta(before, ledger_totals(self.layout.ledger))

        # metrics (reductions of a few scalars, recorded under "metrics", outside the step's traffic)
        local = sum(float(l) for l in result.losses) / self.layout.dp_size
        loss = self._reduce_loss(local)
        bubble = measure_bubble(result, self.layout, len(mbs), self.device)
        tokens = self.train.global_batch_size * self.train.seq_length
        metrics = StepMetrics(
            step=self.steps_done, loss=loss, grad_norm=float(grad_norm), lr=lr, tokens=tokens,
            loss_tokens=loss_tokens, seconds=seconds, tokens_per_s=tokens / seconds, skipped=bool(skipped),
            schedule=result.schedule, num_microbatches=len(mbs), comm_bytes=comm_bytes,
            bubble_fraction=bubble.wall, bubble_fraction_cpu=bubble.cpu,
            bubble_fraction_analytic=analytic_bubble(self.layout.pp_size, len(mbs), self.layout.vpp_size),
            busy_s=bubble.busy_s, idle_s=bubble.idle_s, peak_memory_bytes=peak_memory(self.device))
        self.steps_done += 1
        self.last_schedule = result
        return metrics

    @torch.no_grad()
    def evaluate(self, batch: dict) -> float:
        """Mean token cross entropy of a global batch with the forward-only schedule (no update)."""
        mbs, loss_tokens = self.microbatches(batch)
        if loss_tokens == 0:
            raise ValueError("the global batch has no token that takes loss (every label is ignore_index)")
        result = run_schedule(self.chunks, self.layout, mbs, self.shape, forward_only=True,
                              output_fn=lambda logits, mb: self._ce_sum(logits, mb), dtype=self.dtype)
        return self._reduce_loss(sum(float(o) for o in result.outputs)) / loss_tokens


__all__ = ["OptimizerConfig", "TrainConfig", "Trainer", "build_optimizer"]
