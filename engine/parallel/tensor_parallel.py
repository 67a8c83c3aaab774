"""Tensor- and sequence-parallel layers and the ModelSpec that puts them into the GLM model.

    ColumnParallelLinear   y_r = x W_r^T (+ b_r)        W split by output rows; x replicated (or
                                                          gathered along s under sequence parallel)
    RowParallelLinear      y = sum_r x_r W_r^T (+ b)    W split by input columns; partial sums
                                                          all-reduced (reduce-scattered along s under SP)
    VocabParallelEmbedding e = sum_r [id in rows_r] E_r[id - start_r]   (reduce-scattered along s under SP)

Parameter attributes (read by the optimizer and grad-norm code; see ``mark_parameters``):

    tensor_parallel      True: this rank holds a shard (norms over TP are summed); False: replicated
                         over TP (counted once).
    sequence_parallel    True: replicated over TP but each rank's gradient covers only its sequence
                         chunk, so the gradients must be all-reduced over TP (``sync_sequence_parallel_grads``).
                         Also the LoRA factor a TP layer holds whole (``mark_lora``): each rank's gradient
                         covers only its shard's share.
    tp_duplicate_rows    (start, stop) rows that another TP rank also holds (a replicated KV head, on
                         every rank of its replica group but the first): excluded from the grad norm.

Replicated KV heads (tp > num_kv_groups): each rank's K/V rows get gradient only from its own query
heads; the full model's gradient is the sum over the tp/g ranks sharing the head. A gradient hook
on the qkv weight/bias all-reduces those rows over that TP subgroup during backward (once per
backward, before accumulation into .grad), so after backward every replica holds the full gradient
and the replicas stay identical under any optimizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import GLMConfig
from engine.model.spec import KernelPlan, ModelSpec, at_positions
from engine.parallel import comm
from engine.parallel.context_parallel import ContextParallel
from engine.parallel.mappings import (copy_to_tp, gather_from_sequence, gather_from_tp, gather_sequence_replicated,
                                      reduce_from_tp,
                                      reduce_scatter_to_sequence)
from engine.parallel.sharding import kv_replication, qkv_local_rows


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp != 0:
        raise ValueError(f"{what}={n} is not divisible by tp={tp}")
    return n // tp


def _mark(p: nn.Parameter, tensor_parallel: bool, sequence_parallel: bool = False) -> nn.Parameter:
    p.tensor_parallel = tensor_parallel
    p.sequence_parallel = sequence_parallel and not tensor_parallel
    return p


class ColumnParallelLinear(nn.Module):
    """``[b, s(/tp), in] -> [b, s, out/tp]`` (or ``[b, s, out]`` with ``gather_output``); with ``index``
    (flat positions of ``[b, s]``, ``glm.head_positions``) only those rows: ``[n, out/tp]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layout, sequence_parallel: bool = False,
                 gather_output: bool = False, local_out_features: int | None = None):
        super().__init__()
        self.layout, self.sequence_parallel, self.gather_output = layout, sequence_parallel, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.local_out_features = (_divide(out_features, layout.tp_size, "out_features")
                                   if local_out_features is None else local_out_features)
        self.weight = _mark(nn.Parameter(torch.empty(self.local_out_features, in_features)), True)
        self.bias = _mark(nn.Parameter(torch.zeros(self.local_out_features)), True) if bias else None
        self.lora = None  # engine.model.lora.add_lora: A [r, in] whole, B [out/tp, r]
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        x = gather_from_sequence(x, self.layout) if self.sequence_parallel else copy_to_tp(x, self.layout)
        if index is not None:  # after the sequence gather: index counts positions of the whole sequence
            x = at_positions(x, index)
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora(x)
        return gather_from_tp(y, self.layout) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.local_out_features}), "
                f"tp={self.layout.tp_size}, sequence_parallel={self.sequence_parallel}")


class QKVParallelLinear(ColumnParallelLinear):
    """The fused [q | k | v] projection sharded per KV group (rows from ``qkv_local_rows``); local
    layout stays [q_local | k_local | v_local]. Replicated KV rows get their gradient summed over the
    ranks sharing them (see the module docstring)."""

    def __init__(self, config: GLMConfig, layout, sequence_parallel: bool = False):
        tp = layout.tp_size
        local_rows = qkv_local_rows(config, tp, layout.tp_rank).numel()
        super().__init__(config.hidden_size, config.qkv_size, config.qkv_bias, layout, sequence_parallel,
                         local_out_features=local_rows)
        self.q_rows = config.num_attention_heads // tp * config.kv_channels
        self.replicas = replicas = kv_replication(config, tp)
        if replicas > 1:
            group, ranks = layout.tp_subgroup(replicas)
            hook = _replicated_kv_grad_hook(self.q_rows, group, layout.ledger)
            for p in (self.weight, self.bias):
                if p is not None:
                    p.register_hook(hook)
                    if layout.rank != ranks[0]:
                        p.tp_duplicate_rows = (self.q_rows, self.local_out_features)


def mark_lora(module: ColumnParallelLinear | RowParallelLinear, adapter: nn.Module, column: bool) -> None:
    """Mark a LoRA adapter of a TP layer: the factor sharded with the weight is ``tensor_parallel``; the
    factor held whole gets partial gradients on each rank, summed over TP by the optimizer (marked
    ``sequence_parallel``). A replicated KV head's rows of a qkv adapter's B are summed over the ranks
    sharing it, as the weight's are."""
    sharded, whole = (adapter.B, adapter.A) if column else (adapter.A, adapter.B)
    _mark(sharded, True)
    _mark(whole, False, True)
    if isinstance(module, QKVParallelLinear) and module.replicas > 1:
        group, ranks = module.layout.tp_subgroup(module.replicas)
        adapter.B.register_hook(_replicated_kv_grad_hook(module.q_rows, group, module.layout.ledger))
        if module.layout.rank != ranks[0]:
            adapter.B.tp_duplicate_rows = (module.q_rows, module.local_out_features)


def _replicated_kv_grad_hook(q_rows: int, group, ledger):
    """Gradient hook summing the KV rows (from ``q_rows`` on) over the ranks sharing those KV heads.
    A closure over plain values rather than a bound method: a hook that holds its module makes a
    parameter -> hook -> module -> parameter cycle, which only the cyclic GC frees (the RLHF
    generation copy of the actor would outlive its ``del``)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        comm.all_reduce(grad[q_rows:], group, ledger, "tp")  # rows: a contiguous view
        return grad
    return hook


class RowParallelLinear(nn.Module):
    """``[b, s, in/tp] -> [b, s(/tp), out]``: partial products summed over TP."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layout, sequence_parallel: bool = False):
        super().__init__()
        self.layout, self.sequence_parallel = layout, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.local_in_features = _divide(in_features, layout.tp_size, "in_features")
        self.weight = _mark(nn.Parameter(torch.empty(out_features, self.local_in_features)), True)
        # The bias is added after the reduction: replicated; under SP each rank sees a sequence chunk.
        self.bias = _mark(nn.Parameter(torch.zeros(out_features)), False, sequence_parallel) if bias else None
        self.lora = None  # engine.model.lora.add_lora: A [r, in/tp], B [out, r] whole
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.lora is not None and self.lora.enabled:  # a partial product too: reduced with y
            y = y + self.lora(x)
        y = reduce_scatter_to_sequence(y, self.layout) if self.sequence_parallel else reduce_from_tp(y, self.layout)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.local_in_features}), out={self.out_features}, "
                f"tp={self.layout.tp_size}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """``[b, s] ids -> [b, s(/tp), h]``; rank r holds vocabulary rows [r v/tp, (r+1) v/tp)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, layout, sequence_parallel: bool = False):
        super().__init__()
        self.layout, self.sequence_parallel = layout, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = _divide(num_embeddings, layout.tp_size, "num_embeddings (vocab_size)")
        self.vocab_start, self.vocab_end = layout.tp_rank * per, (layout.tp_rank + 1) * per
        self.weight = _mark(nn.Parameter(torch.empty(per, embedding_dim)), True)
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        e = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(e, self.layout) if self.sequence_parallel else reduce_from_tp(e, self.layout)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


def tensor_parallel_spec(config: GLMConfig, layout, sequence_parallel: bool = False,
                         kernels: KernelPlan = KernelPlan()) -> ModelSpec:
    """ModelSpec building the GLM model with tensor (and optionally sequence) parallel layers.

    Roles: qkv (column, per KV group), gate_up (column, [gate_local | up_local]), output (column,
    logits stay vocab-sharded: use ``kernels.cross_entropy(..., group=spec.vocab_group)``), dense and
    down (row). Under sequence parallel the residual stream is ``[b, s/tp, h]`` (s divisible by tp).
    After building the model call ``mark_parameters(model, layout, sequence_parallel)`` (or use
    ``build_parallel_model``) so the norm weights carry their replicated / sequence-parallel marks.
    """
    layout_dims = layout.dims.validate(layout.world_size, config)
    del layout_dims  # validation only: heads, KV groups, ffn and vocab must divide/suit tp

    def column_linear(in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        if role == "qkv":
            if out_features != config.qkv_size:
                raise ValueError(f"qkv projection has {out_features} outputs, config says {config.qkv_size}")
            return QKVParallelLinear(config, layout, sequence_parallel)
        if role == "gate_up":
            return GateUpParallelLinear(in_features, out_features, bias, layout, sequence_parallel)
        if role == "output":
            return ColumnParallelLinear(in_features, out_features, bias, layout, sequence_parallel)
        raise ValueError(f"no column-parallel rule for role {role!r}")

    def row_linear(in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
        if role not in ("dense", "down"):
            raise ValueError(f"no row-parallel rule for role {role!r}")
        return RowParallelLinear(in_features, out_features, bias, layout, sequence_parallel)

    def embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, embedding_dim, layout, sequence_parallel)

    def gather_sequence(x: torch.Tensor) -> torch.Tensor:
        return gather_sequence_replicated(x, layout)

    def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(logits, layout)

    gather = gather_sequence if (sequence_parallel and layout.tp_size > 1) else None
    return ModelSpec(column_linear=column_linear, row_linear=row_linear, embedding=embedding,
                     tp_size=layout.tp_size, kernels=kernels,
                     vocab_group=layout.tp_group if layout.tp_size > 1 else None, gather_sequence=gather,
                     gather_vocab=gather_vocab if layout.tp_size > 1 else None,
                     context_parallel=ContextParallel.of(layout))


class GateUpParallelLinear(ColumnParallelLinear):
    """The fused [gate | up] projection: rank r holds [gate_r | up_r] so SwiGLU splits it locally."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layout, sequence_parallel: bool = False):
        if out_features % 2 != 0:
            raise ValueError(f"gate_up has an odd number of outputs ({out_features})")
        _divide(out_features // 2, layout.tp_size, "ffn_hidden_size")
        super().__init__(in_features, out_features, bias, layout, sequence_parallel)


def mark_parameters(model: nn.Module, layout, sequence_parallel: bool) -> nn.Module:
    """Mark every parameter the TP layers did not create (norm weights, a value head) as replicated
    over TP, and, under sequence parallel, as needing a TP all-reduce of its gradient."""
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_parallel", False):
            # the value head sees the gathered full sequence (spec.gather_sequence), so its grads are
            # already complete on every rank; norms see sequence shards and need the TP all-reduce
            on_shards = sequence_parallel and layout.tp_size > 1 and not name.startswith("value_head.")
            _mark(p, False, on_shards)
    model.sequence_parallel = sequence_parallel
    return model


def build_parallel_model(model_cls, config: GLMConfig, layout, sequence_parallel: bool = False,
                         kernels: KernelPlan = KernelPlan(), seed: int | None = 0, **model_kwargs) -> nn.Module:
    """``model_cls(config, tensor_parallel_spec(...), **model_kwargs)``, marked, and initialised
    layout-independently from ``seed`` (``sharding.init_parallel_weights_``; None keeps the init)."""
    from engine.parallel.sharding import init_parallel_weights_
    spec = tensor_parallel_spec(config, layout, sequence_parallel, kernels)
    model = model_cls(config, spec, init=False, **model_kwargs)
    mark_parameters(model, layout, sequence_parallel)
    if seed is not None:
        init_parallel_weights_(model, layout, seed, config)
    return model


def sync_sequence_parallel_grads(params, layout, grads=None) -> int:
    """All-reduce over TP (one flat buffer) the gradients of parameters marked ``sequence_parallel``.
    ``grads`` (same order as ``params``) overrides ``p.grad`` (e.g. fp32 main grads). Returns how
    many tensors were reduced."""
    params = list(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    chosen = [g for p, g in zip(params, grads) if getattr(p, "sequence_parallel", False) and g is not None]
    if not chosen or layout.tp_size == 1:
        return 0
    flat = torch.cat([g.reshape(-1).float() for g in chosen])
    comm.all_reduce(flat, layout.tp_group, layout.ledger, "tp")
    offset = 0
    for g in chosen:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return len(chosen)
