"""One training step over any TP x PP x DP layout: schedule, loss scaling, grad sync, clip, AdamW step.

Loss: the objective's mean over the GLOBAL batch, L = sum_units loss / N (``objectives``: token cross
entropy with N = non-ignored tokens, or the reward model's pair loss with N = pairs); every rank
holds the global batch, so N needs no communication. Each micro-batch backpropagates
``loss_sum(mb) * dp / N``: the DistributedOptimizer averages gradients over DP (divides by dp, then
sums), so the synced gradient is exactly dL/dw of the single-process full-batch loss, whatever the
split into micro-batches and DP ranks (and however unevenly the ignored tokens fall). Under context
parallelism each cp rank sums the loss of its chunks of the rows, and "DP" is the dp x cp gradient
group (``ParallelLayout.gradient_layout``): the same argument with dp x cp partial sums.

    split the dp rank's rows into m micro-batches -> pipeline schedule (``schedules.run_schedule``;
    pp = 1 is the plain gradient-accumulation loop; the last stage runs the objective on the model
    head's output) -> optimizer.finish_grad_sync() -> clip + AdamW step with lr(step) -> metrics (loss
    and objective statistics reduced over DP and PP, comm bytes from the ledger delta, bubble).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from engine.config import GLMConfig
from engine.model.glm import default_positions
from engine.parallel import comm
from engine.parallel.accounting import analytic_bubble
from engine.parallel.context_parallel import split_sequence
from engine.parallel.pipeline import activation_shape, chunk_named_parameters
from engine.parallel.schedules import check_interleaved, measure_bubble, run_schedule
from engine.train.metrics import (StepMetrics, ledger_delta, ledger_totals, peak_memory, reset_peak_memory)
from engine.train.objectives import IGNORE_INDEX, LanguageModelObjective

RECOMPUTE = ("none", "full", "selective")


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
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: only after the last step, when there is one)."""
    eval_batches: int = 1
    """Global batches of the held-out split per evaluation."""
    variable_rows: bool = False
    """Accept global batches of any multiple of ``row_multiple`` rows, not only ``global_batch_size``:
    batches of packed sequences (``batches.pack_padded_rows``), whose row count depends on their
    lengths."""

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def row_multiple(self, dims) -> int:
        """With ``variable_rows`` the row count of a global batch is a multiple of this. Without a pipeline,
        dp: each DP rank takes an equal share, and its last micro-batch may hold fewer than micro_batch_size
        rows. With one, micro-batch x dp, times pp under the interleaved schedule: stages exchange
        activations of one fixed shape, and the interleaved order needs a multiple of pp micro-batches."""
        if dims.pp == 1:
            return dims.dp_size
        return self.micro_batch_size * dims.dp_size * (dims.pp if dims.vpp > 1 else 1)

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
        else:
            if dims.cp > 1 and self.seq_length % (2 * dims.cp) != 0:
                problems.append(f"context parallelism needs seq_length={self.seq_length} divisible by 2 x cp = "
                                f"{2 * dims.cp} (each rank holds 2 of 2 cp equal chunks)")
            if self.sequence_parallel and dims.tp == 1:
                # Megatron turns it off with a warning; a run that asked for it should know it has no TP to split over
                problems.append("sequence_parallel=True needs tp > 1 (it splits the residual stream over the TP "
                                "ranks): set tp or drop sequence_parallel")
            elif self.sequence_parallel and (self.seq_length // dims.cp) % dims.tp != 0:
                problems.append(f"sequence_parallel needs seq_length={self.seq_length}"
                                f"{f' / cp={dims.cp}' if dims.cp > 1 else ''} divisible by tp={dims.tp}")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            problems.append(f"train_steps={self.train_steps!r} must be a non-negative integer")
        if not isinstance(self.eval_interval, int) or self.eval_interval < 0:
            problems.append(f"eval_interval={self.eval_interval!r} must be a non-negative integer")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            problems.append(f"eval_batches={self.eval_batches!r} must be a positive integer")
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
    overlap_grad_reduce: bool = True
    """Start each gradient bucket's DP reduction during the last micro-batch's backward, as soon as the
    bucket's gradients are complete (False: all buckets after the backward)."""


def build_optimizer(chunks: Sequence[torch.nn.Module], layout, optim: OptimizerConfig, lr: float):
    """A ``DistributedOptimizer`` over every chunk's trainable parameters (clipping done in its ``step``),
    averaging gradients and sharding state over ``layout.gradient_layout`` (dp x cp ranks). Frozen
    parameters (a LoRA model's base weights) are stored in the optimizer's parameter dtype (bf16 under
    mixed precision), as the trainable ones are: they have no fp32 master copy to keep."""
    from engine.optim import DistributedOptimizer
    optimizer = DistributedOptimizer(chunk_named_parameters(chunks), layout, lr=lr, betas=tuple(optim.betas),
                                eps=optim.eps, weight_decay=optim.weight_decay,
                                use_distributed_optimizer=optim.use_distributed_optimizer,
                                bucket_size_bytes=optim.bucket_size_bytes, mixed_precision=optim.mixed_precision,
                                backend=optim.backend, max_grad_norm=optim.clip_grad or None,
                                overlap_grad_reduce=optim.overlap_grad_reduce)
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(optimizer.param_dtype)
    return optimizer


class Trainer:
    """Runs training steps of this rank's model chunks.

    ``chunks``: this rank's pipeline chunks (``pipeline.build_model_chunks``; one model when pp = 1),
    of the model class the objective reads (``GLMForCausalLM`` for the language-model objective,
    ``GLMForScalarHead`` for the reward objective). ``optimizer``: a ``DistributedOptimizer`` over them
    (``build_optimizer``). ``lr``: step -> learning rate (``LRSchedule``). ``objective``: an
    ``objectives.Objective`` (default: token cross entropy). Every rank passes the same global batch
    to ``train_step``.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer, layout, config: GLMConfig,
                 train: TrainConfig, lr: Callable[[int], float], objective=None):
        self.dims = train.validate(layout.dims, config, layout.world_size)
        self.chunks, self.optimizer, self.layout, self.config = list(chunks), optimizer, layout, config
        self.train, self.lr = train, lr
        self.objective = objective if objective is not None else LanguageModelObjective(train.ignore_index)
        self.cross_entropy_backend = self.chunks[-1].spec.kernels.cross_entropy  # the chunks' kernel plan
        self.last_schedule = None  # the last step's ScheduleResult (timeline, per-micro-batch losses)
        for chunk in self.chunks:
            chunk.set_recompute(train.recompute)
        self.steps_done = 0
        param = next(self.chunks[0].parameters())
        self.device, self.dtype = param.device, param.dtype
        self.shape = self._shape(self.objective)

    def _shape(self, objective) -> tuple[int, int, int]:
        t = self.train
        return activation_shape(t.micro_batch_size * objective.rows_per_sample, t.seq_length // self.layout.cp_size,
                                self.config.hidden_size, self.layout.tp_size, t.sequence_parallel)

    # ---- batches -------------------------------------------------------------------------------
    def microbatches(self, batch: dict, objective=None) -> tuple[list[dict], int]:
        """This DP rank's micro-batches of a global batch (as model inputs), and the objective's N
        (``objective``: default the trainer's)."""
        t, obj = self.train, objective or self.objective
        for k in obj.batch_keys:
            if k not in batch or batch[k] is None:
                raise ValueError(f"the global batch lacks {k!r} (has {sorted(batch)}); the {obj.name} objective "
                                 f"needs {list(obj.batch_keys)}")
        keys = list(obj.batch_keys) + [k for k in obj.optional_keys if batch.get(k) is not None]
        if batch.get("segment_ids") is not None and "segment_ids" not in keys:
            # dropping them would let packed sequences attend to each other: a silently different model
            raise ValueError(f"the global batch holds packed sequences (segment_ids), which the {obj.name} objective "
                             f"does not take (its optional keys: {list(obj.optional_keys)})")
        rows_total = self._global_rows(batch[obj.batch_keys[0]])
        expected = (rows_total, t.seq_length)
        for k in keys:
            if tuple(batch[k].shape) != expected:
                raise ValueError(f"global batch {k} {tuple(batch[k].shape)} must be [global_batch_size, seq_length] "
                                 f"= {list(expected)}")
        n = obj.normalizer(batch)
        dp, rank = self.layout.dp_size, self.layout.dp_rank
        rows = rows_total // dp
        mine = {k: torch.as_tensor(batch[k])[rank * rows:(rank + 1) * rows].to(self.device) for k in keys}
        if self.layout.cp_size > 1:
            mine = self._split_for_context_parallel(mine, obj)
        mbs = t.micro_batch_size
        out = [obj.model_inputs({k: v[i:i + mbs] for k, v in mine.items()}) for i in range(0, rows, mbs)]
        if self.layout.pp_size > 1:
            want = mbs * obj.rows_per_sample
            for mb in out:
                if mb["input_ids"].shape[0] != want:
                    raise ValueError(f"the {obj.name} objective made a micro-batch of {mb['input_ids'].shape[0]} rows; "
                                     f"pipeline stages exchange fixed activations of micro_batch_size x "
                                     f"{obj.rows_per_sample} = {want} rows (packing pairs, reward.pack, needs pp=1)")
        return out, n

    def _global_rows(self, first: torch.Tensor) -> int:
        """Rows of a global batch: ``global_batch_size``, or with ``variable_rows`` any positive multiple of
        ``row_multiple`` (checked here, naming the numbers)."""
        t = self.train
        if not t.variable_rows:
            return t.global_batch_size
        rows, multiple = int(first.shape[0]), t.row_multiple(self.layout.dims)
        if rows < 1 or rows % multiple != 0:
            how = (f"evenly over dp={self.layout.dp_size}" if self.layout.pp_size == 1 else
                   f"into micro-batches of {t.micro_batch_size} over dp={self.layout.dp_size}"
                   f"{f' x pp={self.layout.pp_size} (interleaved)' if self.layout.vpp_size > 1 else ''}")
            raise ValueError(f"a global batch of {rows} rows does not split {how}: variable_rows needs a positive "
                             f"multiple of {multiple} rows")
        return rows

    def _split_for_context_parallel(self, rows: dict, objective) -> dict:
        """This cp rank's 2 chunks of every row (``context_parallel.split_sequence``); the positions are
        counted over whole rows first, since a rank cannot count them from its chunks."""
        if not getattr(objective, "context_parallel", False):
            raise ValueError(f"the {objective.name} objective does not support context parallelism (cp="
                             f"{self.layout.cp_size}); it reads whole rows (e.g. the reward model's last token): "
                             "use cp=1")
        if "position_ids" not in rows:
            rows["position_ids"] = default_positions(rows["input_ids"], rows.get("attention_mask"))
        cp, r = self.layout.cp_size, self.layout.cp_rank
        return {k: split_sequence(v, cp, r) for k, v in rows.items()}

    def _loss_and_stats(self, objective):
        def fn(output: torch.Tensor, mb: dict):
            return objective.loss_and_stats(output, mb, self.layout, self.cross_entropy_backend)
        return fn

    def _training_loss(self, objective, scale: float, sums: list):
        """Last stage: each micro-batch's loss sum times ``scale`` (dp / N, times a mixing coefficient),
        the unscaled loss and stats summed into ``sums`` for the metrics."""
        def fn(output: torch.Tensor, mb: dict) -> torch.Tensor:
            loss, stats = objective.loss_and_stats(output, mb, self.layout, self.cross_entropy_backend)
            _add_into(sums, [float(loss.detach())] + [float(v) for v in stats])
            return loss * scale
        return fn

    def _reduce(self, local: list[float], width: int) -> list[float]:
        """Sum last-stage quantities over DP, CP and PP (other stages contribute 0); "metrics" traffic."""
        t = torch.tensor(local or [0.0] * width, dtype=torch.float64, device=self.device)
        comm.all_reduce(t, self.layout.dp_group, self.layout.ledger, "metrics")
        comm.all_reduce(t, self.layout.cp_group, self.layout.ledger, "metrics")
        comm.all_reduce(t, self.layout.pp_group, self.layout.ledger, "metrics")
        return t.tolist()

    def _means(self, sums: list[float], n: int, objective=None) -> tuple[float, dict]:
        names = (objective or self.objective).stat_names
        total = self._reduce(sums, 1 + len(names))
        return total[0] / n, {k: v / n for k, v in zip(names, total[1:])}

    # ---- steps ---------------------------------------------------------------------------------
    def train_step(self, batch: dict, on_grads: Optional[Callable[["Trainer"], None]] = None,
                   extra: Sequence[tuple] = ()) -> StepMetrics:
        """One optimizer step on a global batch (the objective's ``batch_keys``, ``[G, s]`` each; for the
        language model ``{"input_ids", "labels"}`` with labels already shifted and ``ignore_index``
        where no loss). ``extra``: ``(objective, batch, coef)`` terms added to the loss in the same
        step, each its own global mean times ``coef`` (PPO-ptx: the language-model loss on SFT data
        next to the policy loss); their means are reported in ``stats`` as ``<name>_loss``.
        ``on_grads(trainer)`` runs after the gradient sync, before clipping and the update."""
        t0 = time.perf_counter()
        reset_peak_memory(self.device)
        before = ledger_totals(self.layout.ledger)
        dp = self.layout.gradient_layout.dp_size  # gradients are averaged over dp x cp ranks
        mbs, n = self.microbatches(batch)
        terms = [(self.objective, mbs, n, 1.0, [])]
        for objective, extra_batch, coef in extra:
            extra_mbs, extra_n = self.microbatches(extra_batch, objective)
            terms.append((objective, extra_mbs, extra_n, float(coef), []))
        self.optimizer.zero_grad()
        self.optimizer.prepare_backward(sum(len(t[1]) for t in terms))  # one backward per micro-batch
        results = [run_schedule(self.chunks, self.layout, t_mbs, self._shape(objective), dtype=self.dtype,
                                loss_fn=self._training_loss(objective, coef * dp / t_n, sums))
                   for objective, t_mbs, t_n, coef, sums in terms]
        self.optimizer.finish_grad_sync()
        if on_grads is not None:
            on_grads(self)
        lr = float(self.lr(self.steps_done))
        grad_norm, skipped = self.optimizer.step(lr=lr)
        seconds = time.perf_counter() - t0
        comm_bytes = ledger_delta(before, ledger_totals(self.layout.ledger))

        # metrics (reductions of a few scalars, recorded under "metrics", outside the step's traffic)
        loss, stats = self._means(terms[0][4], n)
        for objective, _, t_n, _, sums in terms[1:]:
            stats[f"{objective.name}_loss"] = self._means(sums, t_n, objective)[0]
        result = results[0]
        bubble = measure_bubble(result, self.layout, len(mbs), self.device)
        # rows (x seq_length) the model ran over all DP ranks: an objective that packs its micro-batches
        # (reward.pack) gives each rank its own count
        rows = torch.tensor([float(sum(mb["input_ids"].shape[0] for mb in mbs))], dtype=torch.float64,
                            device=self.device)
        comm.all_reduce(rows, self.layout.dp_group, self.layout.ledger, "metrics")
        tokens = int(rows.item()) * self.train.seq_length
        metrics = StepMetrics(
            step=self.steps_done, loss=loss, grad_norm=float(grad_norm), lr=lr, tokens=tokens,
            loss_tokens=n, seconds=seconds, tokens_per_s=tokens / seconds, skipped=bool(skipped),
            schedule=result.schedule, num_microbatches=len(mbs), comm_bytes=comm_bytes,
            bubble_fraction=bubble.wall, bubble_fraction_cpu=bubble.cpu,
            bubble_fraction_analytic=analytic_bubble(self.layout.pp_size, len(mbs), self.layout.vpp_size),
            busy_s=bubble.busy_s, idle_s=bubble.idle_s, peak_memory_bytes=peak_memory(self.device), stats=stats)
        self.steps_done += 1
        self.last_schedule = result
        return metrics

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Held-out metrics over one global batch or a list of them, with the forward-only schedule (no
        update): ``{"loss": mean, **objective stats}``, each a mean over all the batches' units
        (tokens or pairs)."""
        batches = [batches] if isinstance(batches, dict) else list(batches)
        if not batches:
            raise ValueError("evaluate needs at least one global batch")
        for chunk in self.chunks:
            chunk.eval()
        try:
            sums, total_n = [], 0
            for batch in batches:
                mbs, n = self.microbatches(batch)
                total_n += n
                result = run_schedule(self.chunks, self.layout, mbs, self.shape, forward_only=True,
                                      output_fn=self._loss_and_stats(self.objective), dtype=self.dtype)
                for loss, stats in result.outputs:
                    _add_into(sums, [float(loss)] + [float(v) for v in stats])
        finally:
            for chunk in self.chunks:
                chunk.train()
        loss, stats = self._means(sums, total_n)
        return {"loss": loss, **stats}


    @torch.no_grad()
    def forward_outputs(self, chunks, batch: dict, output_fn: Callable, row_shape: tuple[int, ...]) -> torch.Tensor:
        """``output_fn(head output, micro-batch) -> fp32 [micro-batch rows, *row_shape]`` of another model's
        ``chunks`` built for this trainer's layout (e.g. a frozen reference), over the global ``batch`` prepared
        as the trainer's objective prepares it: this DP rank's micro-batches, forward-only (the pipeline
        schedule under pp > 1), the outputs broadcast from the last stage ("pp" traffic) and all-gathered over
        DP ("dp"): ``[global rows, *row_shape]``, the same on every rank. Collective over the layout."""
        layout = self.layout
        mbs, _ = self.microbatches(batch)
        for chunk in chunks:
            chunk.eval()
        result = run_schedule(list(chunks), layout, mbs, self.shape, forward_only=True, output_fn=output_fn,
                              dtype=self.dtype, timed=False)
        rows = sum(int(mb[self.objective.batch_keys[0]].shape[0]) for mb in mbs)
        if layout.is_last_stage:
            local = torch.cat(result.outputs).float()
        else:
            local = torch.empty((rows, *row_shape), dtype=torch.float32, device=self.device)
        local = comm.broadcast(local.contiguous(), layout.pp_ranks[-1], layout.pp_group, layout.ledger, "pp")
        return comm.all_gather(local, 0, layout.dp_group, layout.ledger, "dp")


def _add_into(sums: list, values: list) -> None:
    """Element-wise ``sums += values`` (an empty ``sums`` becomes ``values``)."""
    if not sums:
        sums.extend(values)
    else:
        sums[:] = [a + b for a, b in zip(sums, values)]


__all__ = ["OptimizerConfig", "TrainConfig", "Trainer", "build_optimizer"]
