"""Pipeline schedules: forward-only, 1F1B and interleaved 1F1B, run by one executor with a timeline.

A schedule is, per pipeline rank, an ordered list of actions ``(kind, chunk, micro_batch)`` with kind
"F" (forward) or "B" (backward). ``m`` micro-batches, ``p`` stages, ``v`` chunks per stage:

    forward_only      F for every micro-batch and chunk (grouped like the interleaved warm-up)
    1F1B (v = 1)      warm-up: p - r - 1 forwards; steady: (F, B) pairs; cool-down: the remaining Bs.
                      At most p - r micro-batches' activations alive on stage r.
    interleaved       Megatron's virtual-pipeline 1F1B: forwards walk the chunks in groups of p
                      micro-batches, warm-up (p - r - 1) * 2 + (v - 1) * p forwards; needs m % p == 0.
    p = 1             1F1B degenerates to F0 B0 F1 B1 ...: the plain gradient-accumulation loop.

Bubble (idle fraction of a stage), with equal per-stage costs: (p - 1) / (m + p - 1) for 1F1B and
(p - 1) / (v m + p - 1) interleaved (``engine.parallel.accounting.analytic_bubble``).

The executor (``run_schedule``) records, per action, wall-clock start/end, the time spent waiting on
receives before it (idle), and its compute cost (process CPU time on CPU; wall time after a device
synchronise on CUDA). ``bubble`` reports two measurements:

    wall   idle / (busy + idle) of each stage, from wall clocks: what happened on this machine,
           including time a process was descheduled (noisy on a loaded, oversubscribed CPU box);
    cpu    the schedule replayed with the measured per-action compute costs and free communication:
           the bubble the schedule has on dedicated processors, insensitive to other processes.
           This is the number to compare with the analytic formula.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from engine.parallel import comm
from engine.parallel.pipeline import (LossFn, PipelineP2P, chunk_forward, detached_output, stage_of,
                                      virtual_stage)

SCHEDULES = ("no_pipeline", "1f1b", "interleaved", "forward_only")


# ---- action orders (pure) ----------------------------------------------------------------------
def one_f_one_b_order(pp: int, pp_rank: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    m = num_microbatches
    warmup = min(pp - pp_rank - 1, m)
    order = [("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", 0, warmup + i), ("B", 0, i)]
    order += [("B", 0, i) for i in range(m - warmup, m)]
    return order


def _interleaved_chunk_and_mb(i: int, pp: int, vpp: int, forward: bool) -> tuple[int, int]:
    """The i-th forward (or backward) of a rank: chunk and micro-batch. Forwards take p micro-batches
    through chunk 0, then the same p through chunk 1, ...; backwards walk the chunks in reverse."""
    group = pp * vpp
    chunk = (i % group) // pp
    if not forward:
        chunk = vpp - 1 - chunk
    return chunk, (i // group) * pp + i % pp


def interleaved_order(pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    m = num_microbatches
    check_interleaved(pp, vpp, m)
    total = m * vpp
    if m == pp:  # all forwards first (Megatron does the same: no steady phase fits)
        warmup = total
    else:
        warmup = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [("F",) + _interleaved_chunk_and_mb(i, pp, vpp, True) for i in range(warmup)]
    for i in range(total - warmup):
        order.append(("F",) + _interleaved_chunk_and_mb(warmup + i, pp, vpp, True))
        order.append(("B",) + _interleaved_chunk_and_mb(i, pp, vpp, False))
    order += [("B",) + _interleaved_chunk_and_mb(i, pp, vpp, False) for i in range(total - warmup, total)]
    return order


def forward_only_order(pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    m = num_microbatches
    if vpp == 1:
        return [("F", 0, i) for i in range(m)]
    # groups of p micro-batches per chunk, as the interleaved warm-up; a short last group is fine here
    order = []
    for start in range(0, m, pp):
        for c in range(vpp):
            order += [("F", c, i) for i in range(start, min(start + pp, m))]
    return order


def check_interleaved(pp: int, vpp: int, num_microbatches: int) -> None:
    if vpp > 1 and num_microbatches % pp != 0:
        raise ValueError(f"the interleaved pipeline schedule (vpp={vpp}) needs the number of micro-batches per "
                         f"data-parallel rank ({num_microbatches}) to be a multiple of pp={pp}; choose "
                         "global_batch_size = k * pp * micro_batch_size * dp")


def schedule_name(pp: int, vpp: int, forward_only: bool = False) -> str:
    if forward_only:
        return "forward_only"
    if pp == 1:
        return "no_pipeline"
    return "1f1b" if vpp == 1 else "interleaved"


def action_order(schedule: str, pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    if num_microbatches < 1:
        raise ValueError(f"a pipeline schedule needs at least one micro-batch, got {num_microbatches}")
    if schedule == "forward_only":
        return forward_only_order(pp, vpp, pp_rank, num_microbatches)
    if schedule in ("no_pipeline", "1f1b"):
        if vpp != 1:
            raise ValueError(f"schedule {schedule!r} runs one chunk per stage, got vpp={vpp}")
        return one_f_one_b_order(pp, pp_rank, num_microbatches)
    if schedule == "interleaved":
        return interleaved_order(pp, vpp, pp_rank, num_microbatches)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}")


# ---- timeline ----------------------------------------------------------------------------------
@dataclass
class ActionRecord:
    kind: str
    chunk: int
    micro_batch: int
    start: float
    """Wall clock (time.perf_counter, system-wide on one host) when compute began, after receives."""
    end: float
    wait_s: float
    """Seconds blocked on receives before this action (idle)."""
    cost_s: float
    """Compute cost: process CPU seconds on CPU, wall seconds (after a device sync) on CUDA."""


@dataclass
class ScheduleResult:
    schedule: str
    losses: list = field(default_factory=list)
    """Last virtual stage: the detached loss of every micro-batch (training); empty elsewhere."""
    outputs: list = field(default_factory=list)
    """Last virtual stage, forward-only: ``output_fn(output, micro_batch)`` per micro-batch."""
    timeline: list = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def busy_s(self) -> float:
        return sum(a.end - a.start for a in self.timeline)

    @property
    def idle_s(self) -> float:
        return sum(a.wait_s for a in self.timeline)


class _Timer:
    def __init__(self, device: torch.device, synchronize: bool = True):
        self.cuda = device.type == "cuda" and synchronize

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            t = time.perf_counter()
            return t, t
        return time.perf_counter(), time.process_time()


# ---- executor ----------------------------------------------------------------------------------
def run_schedule(chunks: Sequence[torch.nn.Module], layout, microbatches: Sequence[dict],
                 shape: tuple[int, ...], loss_fn: Optional[LossFn] = None, forward_only: bool = False,
                 output_fn: Callable = detached_output, dtype: Optional[torch.dtype] = None,
                 timed: bool = True) -> ScheduleResult:
    """Run this rank's part of the pipeline schedule over ``microbatches`` (dicts with ``input_ids``
    ``[b, s]`` and whatever ``loss_fn`` reads, e.g. ``labels``; optional ``attention_mask`` /
    ``position_ids`` / ``segment_ids``, and ``output_index``: the head's positions, ``chunk_forward``). Every pipeline rank passes the same micro-batch list.

    Training (``forward_only=False``): ``loss_fn(output, mb) -> scalar`` on the last virtual stage; its
    gradients accumulate into the parameters (call once per global batch, then sync and step).
    Forward only: no autograd; the last stage collects ``output_fn(output, mb)``.
    ``shape``: the inter-stage tensor shape (``pipeline.activation_shape``). ``timed=False``: no device
    synchronisation around each action (the timeline then holds launch times only; for scoring passes
    whose bubble nobody measures).
    """
    pp, vpp, rank = layout.pp_size, layout.vpp_size, layout.pp_rank
    if len(chunks) != vpp:
        raise ValueError(f"run_schedule: {len(chunks)} model chunks on this rank, layout has vpp={vpp}")
    if not forward_only and loss_fn is None:
        raise ValueError("run_schedule: training needs a loss_fn (forward_only=True for scoring/generation)")
    m = len(microbatches)
    name = schedule_name(pp, vpp, forward_only)
    orders = {r: action_order(name, pp, vpp, r, m) for r in range(pp)}
    param = next(chunks[0].parameters())
    device, dtype = param.device, dtype or param.dtype
    p2p = PipelineP2P(layout, shape, dtype, device, orders, forward_only) if pp > 1 else None
    last = pp * vpp - 1
    timer = _Timer(device, synchronize=timed)
    result = ScheduleResult(schedule=name)
    inputs: dict = {}    # (chunk, mb) -> received activation (requires grad)
    outputs: dict = {}   # (chunk, mb) -> output activation, or the loss on the last virtual stage
    t_begin, _ = timer.now()
    grad_context = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_context:
        for kind, c, mb in orders[rank]:
            k = virtual_stage(rank, c, pp)
            w0 = time.perf_counter()
            if kind == "F":
                x = None
                if k > 0:
                    x = p2p.recv("act", k, mb)
                    if not forward_only:
                        x.requires_grad_(True)
                t0, cpu0 = timer.now()
                batch = microbatches[mb]
                y = chunk_forward(chunks[c], batch["input_ids"], x, batch.get("attention_mask"),
                                  batch.get("position_ids"), batch.get("segment_ids"), batch.get("output_index"))
                if k == last:
                    if forward_only:
                        result.outputs.append(output_fn(y, batch))
                    else:
                        y = loss_fn(y, batch)
                        result.losses.append(y.detach())
                if not forward_only:
                    inputs[(c, mb)], outputs[(c, mb)] = x, y
                t1, cpu1 = timer.now()
                if k < last:
                    p2p.send("act", k + 1, mb, y)
            else:
                x, y = inputs.pop((c, mb)), outputs.pop((c, mb))
                g = p2p.recv("grad", k, mb) if k < last else None
                t0, cpu0 = timer.now()
                torch.autograd.backward(y, grad_tensors=g)
                t1, cpu1 = timer.now()
                if k > 0:
                    p2p.send("grad", k - 1, mb, x.grad)
            result.timeline.append(ActionRecord(kind, c, mb, t0, t1, t0 - w0, cpu1 - cpu0))
        if p2p is not None:
            p2p.finish()
    result.wall_s = time.perf_counter() - t_begin
    return result


# ---- bubble --------------------------------------------------------------------------------------
def replay_makespan(orders: dict[int, list], costs: dict[int, Sequence[float]], pp: int,
                    forward_only: bool = False) -> tuple[float, dict[int, float]]:
    """Simulate the schedule on dedicated processors with free communication: each action starts when
    its rank is free and its input exists (F(k, m) after F(k-1, m); B(k, m) after B(k+1, m), and the
    last virtual stage's B after its own F). Returns (makespan, busy seconds per rank)."""
    vpp = max(c for actions in orders.values() for _, c, _ in actions) + 1
    last = pp * vpp - 1
    done: dict = {}
    position = {r: 0 for r in orders}
    free = {r: 0.0 for r in orders}
    busy = {r: float(sum(costs[r])) for r in orders}
    remaining = sum(len(a) for a in orders.values())
    while remaining:
        progressed = False
        for r, actions in orders.items():
            while position[r] < len(actions):
                kind, c, mb = actions[position[r]]
                k = virtual_stage(r, c, pp)
                if kind == "F":
                    dep = ("F", k - 1, mb) if k > 0 else None
                else:
                    dep = ("B", k + 1, mb) if k < last else ("F", k, mb)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep is not None else 0.0)
                free[r] = start + costs[r][position[r]]
                done[(kind, k, mb)] = free[r]
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule replay deadlocked: the action orders are inconsistent")
    return max(free.values()), busy


@dataclass
class BubbleStats:
    wall: float
    """Mean over stages of idle / (busy + idle), from wall clocks."""
    cpu: float
    """Mean over stages of 1 - busy / makespan, replaying the schedule with measured compute costs."""
    busy_s: float
    """This rank's compute seconds (wall)."""
    idle_s: float
    """This rank's seconds blocked on receives."""


def measure_bubble(result: ScheduleResult, layout, num_microbatches: int,
                   device: torch.device | str = "cpu") -> BubbleStats:
    """Bubble of a schedule run, averaged over the pipeline stages (collective over the pp group, on
    ``device`` (the model's: NCCL needs CUDA tensors); the few floats exchanged are recorded in the
    ledger under "metrics", not "pp")."""
    pp, vpp = layout.pp_size, layout.vpp_size
    busy, idle = result.busy_s, result.idle_s
    if pp == 1:
        return BubbleStats(wall=0.0, cpu=0.0, busy_s=busy, idle_s=idle)
    costs = torch.tensor([a.cost_s for a in result.timeline], dtype=torch.float64)
    mine = torch.cat([torch.tensor([busy, idle], dtype=torch.float64), costs]).to(device)
    every = comm.all_gather(mine, 0, layout.pp_group, layout.ledger, "metrics").view(pp, -1).cpu()
    forward_only = result.schedule == "forward_only"
    orders = {r: action_order(result.schedule, pp, vpp, r, num_microbatches) for r in range(pp)}
    makespan, busy_cpu = replay_makespan(orders, {r: every[r, 2:].tolist() for r in range(pp)}, pp, forward_only)
    walls = [(every[r, 1] / (every[r, 0] + every[r, 1])).item() if every[r, 0] + every[r, 1] > 0 else 0.0
             for r in range(pp)]
    cpu = sum(1.0 - busy_cpu[r] / makespan for r in range(pp)) / pp if makespan > 0 else 0.0
    return BubbleStats(wall=sum(walls) / pp, cpu=cpu, busy_s=busy, idle_s=idle)


__all__ = ["ActionRecord", "BubbleStats", "ScheduleResult", "action_order", "forward_only_order",
           "interleaved_order", "measure_bubble", "one_f_one_b_order", "replay_makespan", "run_schedule",
           "schedule_name", "stage_of"]
