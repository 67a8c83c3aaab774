"""Analytic communication per training step and the analytic pipeline bubble.

Bytes THIS rank sends per step, per group, with ``engine.parallel.comm``'s ring convention
(all-reduce 2(n-1)/n B, all-gather / reduce-scatter (n-1)/n B_full, send B). Notation: t = tp,
f = (t-1)/t, a = bytes per activation/param element (4 fp32, 2 bf16), mb micro-batch size, s
sequence, h hidden, V vocab, m micro-batches per DP rank, L = layers on this rank (all its chunks),
c = cp (context parallel), B = mb (s/c) h a (one micro-batch's residual stream on this rank: the
whole sequence, or its 1/c under context parallelism).

tp   per layer and micro-batch, Megatron (Korthikanti et al. 2022, sec. 4.2.2): 2 all-reduces of B
     forward (after attention and MLP) + 2 backward (column-parallel inputs) = 8 f B; with sequence
     parallel 4 all-gathers + 4 reduce-scatters of B = the same 8 f B. Full recompute repeats the
     block's forward in backward, except its last reduction: torch's non-reentrant checkpoint stops
     recomputing once the last tensor saved for backward (the down projection's input) is rebuilt
     ("early stop", on by default), so it adds + 2 f B (one all-reduce) without SP and + 3 f B
     (all-gather, reduce-scatter, all-gather) with SP, not Megatron's full 4 f B. Selective
     recompute (attention core only) adds nothing.
     Vocab-parallel embedding (first stage): 2 f B (all-reduce forward; or reduce-scatter forward +
     all-gather backward under SP). Output layer input (last stage): 2 f B (all-reduce backward; or
     all-gather + reduce-scatter under SP). Loss (vocab-parallel cross entropy, logits never
     gathered): all-reduces of the [n] fp32 row maxima and of the packed [2, n] (sum of
     exponentials, label logit): 2 f 12 n, n the rows the head computes logits for: the positions
     whose label takes loss (``loss_rows``, at least 1 per micro-batch), m mb s when every one does.
     KV heads replicated over r = t / g ranks: their
     weight and bias grads are all-reduced over the r ranks per backward, 2 (r-1)/r (2 d h + 2 d) a
     per layer. Under SP the norm weights' grads (2 h per layer, + h final norm) are all-reduced
     once per step in fp32.
pp   per micro-batch, every virtual stage that is not the last sends its output [mb, s(/t), h] and
     every one that is not the first sends the input gradient: m mb s' h a per boundary and direction.
dp   per gradient bucket of P elements (padded to a multiple of dp; fp32 grads): all-reduce
     2 (d-1)/d 4 P, or with the distributed optimizer reduce-scatter (d-1)/d 4 P + all-gather of the
     updated params (d-1)/d a P, + the fp64 grad-norm all-reduce 2 (d-1)/d 8.
     Under context parallelism d is dp x cp: the cp ranks hold the same weights and average grads too.
mp   the fp64 grad-norm all-reduce over the t x pp model-parallel ranks: 2 (n-1)/n 8.
cp   per layer and micro-batch, the all-gather of K and V forward and the reduce-scatter of their
     gradients backward, each (c-1)/c of the gathered [mb, s, 2 hkv, d] (hkv = KV heads on this TP
     rank); full recompute repeats the all-gather (the gather sits before the attention core, so
     selective recompute does not). Batches with a key padding mask or packed-sequence segment ids
     add their all-gathers once per chunk and micro-batch (not modelled: the formulas cover
     mask-free batches).

Bubble: (p-1)/(m+p-1) for 1F1B, (p-1)/(v m+p-1) interleaved (Narayanan et al. 2021, sec. 2.2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from engine.config import GLMConfig
from engine.parallel.pipeline import stage_layer_indices, virtual_stage
from engine.parallel.sharding import kv_replication, tp_slice

_LAYER_PARAMS = ("attn_norm.weight", "attention.qkv.weight", "attention.qkv.bias", "attention.dense.weight",
                 "mlp_norm.weight", "mlp.gate_up.weight", "mlp.down.weight")
GRAD_BYTES = 4        # main grads are fp32 (DistributedOptimizer)
NORM_BYTES = 8        # the grad norm is reduced in fp64
STAT_BYTES = 4        # the vocab-parallel loss reduces fp32 per-row statistics


def analytic_bubble(pp: int, num_microbatches: int, vpp: int = 1) -> float:
    """Idle fraction of a stage with equal stage costs: (p-1)/(v m + p-1) (v = 1: plain 1F1B)."""
    if pp < 1 or num_microbatches < 1 or vpp < 1:
        raise ValueError(f"analytic_bubble: pp={pp}, num_microbatches={num_microbatches}, vpp={vpp} must be >= 1")
    return (pp - 1) / (vpp * num_microbatches + pp - 1)


def full_param_shapes_in_order(config: GLMConfig, layer_indices: Sequence[int], pre_process: bool,
                               post_process: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of one chunk's parameters in ``GLMForCausalLM.named_parameters()`` order."""
    from engine.model.hf_adapter import expected_shapes
    shapes = expected_shapes(config)
    names = ["embedding.weight"] if pre_process else []
    for i in layer_indices:
        names += [f"layers.{i}.{p}" for p in _LAYER_PARAMS if f"layers.{i}.{p}" in shapes]
    if post_process:
        names += ["final_norm.weight", "output_layer.weight"]
    return [(n, shapes[n]) for n in names]


def local_param_numels(config: GLMConfig, tp: int, tp_rank: int, layer_indices: Sequence[int], pre_process: bool,
                       post_process: bool) -> list[int]:
    """Elements of each parameter of one chunk on one TP rank (model order), by the sharding rules."""
    out = []
    for name, shape in full_param_shapes_in_order(config, layer_indices, pre_process, post_process):
        out.append(tp_slice(name, torch.empty(shape, device="meta"), config, tp, tp_rank).numel())
    return out


def bucket_numels(param_numels: Sequence[int], dp: int, bucket_size_bytes: int) -> list[int]:
    """Padded sizes of the optimizer's gradient buckets (filled in reverse parameter order, fp32,
    closed at ``bucket_size_bytes``, padded to a multiple of dp): DistributedOptimizer's rule."""
    buckets, n, size = [], 0, 0
    for numel in reversed(list(param_numels)):
        n += numel
        size += numel * GRAD_BYTES
        if size >= bucket_size_bytes:
            buckets.append(n)
            n, size = 0, 0
    if n:
        buckets.append(n)
    return [-(-b // dp) * dp for b in buckets]


@dataclass
class StepTraffic:
    """Analytic bytes one rank sends in one training step, by (group, term)."""

    terms: dict = field(default_factory=dict)

    def add(self, group: str, term: str, nbytes: float) -> None:
        if nbytes:
            self.terms[(group, term)] = self.terms.get((group, term), 0.0) + float(nbytes)

    def bytes(self, group: str) -> float:
        return sum(v for (g, _), v in self.terms.items() if g == group)

    def by_group(self) -> dict[str, float]:
        return {g: self.bytes(g) for g in sorted({g for g, _ in self.terms})}


def analytic_step_traffic(config: GLMConfig, dims, pp_rank: int, tp_rank: int = 0, *, global_batch_size: int,
                          micro_batch_size: int, seq_length: int, sequence_parallel: bool = False,
                          recompute: str = "none", use_distributed_optimizer: bool = False,
                          param_bytes: int = 4, bucket_size_bytes: int = 40 * 2**20,
                          layers_per_stage: Optional[Sequence[int]] = None,
                          loss_rows: Optional[int] = None) -> StepTraffic:
    """Bytes the rank at (``tp_rank``, ``pp_rank``) of layout ``dims`` (a validated ``ParallelDims``)
    sends per group in one training step (see the module docstring for every term). ``loss_rows``: the
    label positions that take loss in this rank's micro-batches (the sequence chunks it holds under
    context parallelism), at least 1 per micro-batch; None: every position."""
    if recompute not in ("none", "full", "selective"):
        raise ValueError(f"recompute must be 'none', 'full' or 'selective', got {recompute!r}")
    tp, pp, dp, vpp, cp = dims.tp, dims.pp, dims.dp_size, dims.vpp, dims.cp
    if global_batch_size % (micro_batch_size * dp) != 0:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by micro_batch_size="
                         f"{micro_batch_size} x dp={dp}")
    m = global_batch_size // (micro_batch_size * dp)
    h, a, s, mb = config.hidden_size, param_bytes, seq_length // cp, micro_batch_size
    sp = sequence_parallel and tp > 1
    chunk_layers = stage_layer_indices(config.num_layers, pp, vpp, layers_per_stage)[pp_rank]
    num_virtual = pp * vpp
    virtuals = [virtual_stage(pp_rank, c, pp) for c in range(vpp)]
    pre = [k == 0 for k in virtuals]
    post = [k == num_virtual - 1 for k in virtuals]
    n_layers = sum(len(ls) for ls in chunk_layers)
    traffic = StepTraffic()

    full_b = mb * s * h * a
    if tp > 1:
        f = (tp - 1) / tp
        recomputed = (3 if sp else 2) * f * full_b if recompute == "full" else 0.0  # see the module doc
        per_layer = 8 * f * full_b + recomputed
        traffic.add("tp", "layers", m * n_layers * per_layer)
        traffic.add("tp", "embedding", m * 2 * f * full_b * sum(pre))
        traffic.add("tp", "output_layer", m * 2 * f * full_b * sum(post))
        rows = m * mb * s if loss_rows is None else loss_rows
        traffic.add("tp", "vocab_parallel_loss", 2 * f * 3 * rows * STAT_BYTES * sum(post))
        r = kv_replication(config, tp)
        if r > 1:
            d = config.kv_channels
            rows = 2 * d
            for numel in (rows * h, rows if config.qkv_bias else 0):
                traffic.add("tp", "kv_replica_grads", m * n_layers * 2 * (r - 1) / r * numel * a)
        if sp:
            norm_elems = 2 * h * n_layers + h * sum(post)
            traffic.add("tp", "sp_norm_grads", 2 * f * norm_elems * GRAD_BYTES)

    if pp > 1:
        s_local = s // tp if sp else s
        boundary = m * mb * s_local * h * a
        traffic.add("pp", "activations", boundary * sum(k < num_virtual - 1 for k in virtuals))
        traffic.add("pp", "activation_grads", boundary * sum(k > 0 for k in virtuals))

    if cp > 1:
        kv_bytes = mb * seq_length * 2 * max(1, config.num_kv_groups // tp) * config.kv_channels * a
        gathers = 2 if recompute == "full" else 1
        traffic.add("cp", "kv_all_gather", m * n_layers * gathers * (cp - 1) / cp * kv_bytes)
        traffic.add("cp", "kv_grad_reduce_scatter", m * n_layers * (cp - 1) / cp * kv_bytes)

    dp = dp * cp  # gradients are averaged over the dp x cp ranks
    if dp > 1:
        numels = []
        for c in range(vpp):
            numels += local_param_numels(config, tp, tp_rank, chunk_layers[c], pre[c], post[c])
        g = (dp - 1) / dp
        for p in bucket_numels(numels, dp, bucket_size_bytes):
            if use_distributed_optimizer:
                traffic.add("dp", "grad_reduce_scatter", g * p * GRAD_BYTES)
                traffic.add("dp", "param_all_gather", g * p * a)
            else:
                traffic.add("dp", "grad_all_reduce", 2 * g * p * GRAD_BYTES)
        if use_distributed_optimizer:
            traffic.add("dp", "grad_norm", 2 * g * NORM_BYTES)

    mp = tp * pp
    if mp > 1:
        traffic.add("mp", "grad_norm", 2 * (mp - 1) / mp * NORM_BYTES)
    return traffic


def analytic_step_bytes(config: GLMConfig, dims, pp_rank: int, tp_rank: int = 0, **kwargs) -> dict[str, float]:
    """``{group: bytes}`` this rank sends per step (``analytic_step_traffic(...).by_group()``)."""
    return analytic_step_traffic(config, dims, pp_rank, tp_rank, **kwargs).by_group()
