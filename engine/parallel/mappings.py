"""Conjugate autograd functions for tensor and sequence parallelism.

Each pattern is one small ``torch.autograd.Function`` whose backward is the forward's conjugate,
with a snake_case wrapper taking ``(tensor, layout)``. Activations are batch-first ``[b, s, h]``:
sequence parallelism splits dim 1 (s), tensor parallelism the last dim. All traffic goes through
``engine.parallel.comm`` and is recorded in ``layout.ledger`` under "tp".

    copy_to_tp                  fwd identity              bwd all-reduce
    reduce_from_tp              fwd all-reduce            bwd identity
    scatter_to_sequence         fwd keep own s-chunk      bwd all-gather s
    gather_from_sequence        fwd all-gather s          bwd reduce-scatter s (grads are partial per rank)
    gather_sequence_replicated  fwd all-gather s          bwd keep own s-chunk (consumer replicated over TP)
    reduce_scatter_to_sequence  fwd reduce-scatter s      bwd all-gather s
    gather_from_tp              fwd all-gather last dim   bwd keep own chunk of the last dim
"""
from __future__ import annotations

import torch

from engine.parallel import comm

_SEQ_DIM = 1


def _chunk(x: torch.Tensor, dim: int, layout) -> torch.Tensor:
    n = layout.tp_size
    if x.shape[dim] % n != 0:
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} is not divisible by tp={n}")
    return x.chunk(n, dim=dim)[layout.tp_rank].contiguous()


def _all_reduce(x: torch.Tensor, layout) -> torch.Tensor:
    return comm.all_reduce(x.contiguous().clone(), layout.tp_group, layout.ledger, "tp")


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.layout), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        return _all_reduce(x, layout)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _chunk(x, _SEQ_DIM, layout)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, _SEQ_DIM, ctx.layout.tp_group, ctx.layout.ledger, "tp"), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return comm.all_gather(x, _SEQ_DIM, layout.tp_group, layout.ledger, "tp")

    @staticmethod
    def backward(ctx, g):
        return comm.reduce_scatter(g, _SEQ_DIM, ctx.layout.tp_group, ctx.layout.ledger, "tp"), None


class _GatherSequenceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return comm.all_gather(x, _SEQ_DIM, layout.tp_group, layout.ledger, "tp")

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, _SEQ_DIM, ctx.layout), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return comm.reduce_scatter(x, _SEQ_DIM, layout.tp_group, layout.ledger, "tp")

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, _SEQ_DIM, ctx.layout.tp_group, ctx.layout.ledger, "tp"), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return comm.all_gather(x, -1, layout.tp_group, layout.ledger, "tp")

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, g.dim() - 1, ctx.layout), None


def _parallel(layout) -> bool:
    return layout.tp_size > 1


def copy_to_tp(x: torch.Tensor, layout) -> torch.Tensor:
    """Input of a column-parallel layer: identity forward, all-reduce of the input grad backward."""
    return _CopyToTP.apply(x, layout) if _parallel(layout) else x


def reduce_from_tp(x: torch.Tensor, layout) -> torch.Tensor:
    """Output of a row-parallel layer: sum the partial results over TP."""
    return _ReduceFromTP.apply(x, layout) if _parallel(layout) else x


def scatter_to_sequence(x: torch.Tensor, layout) -> torch.Tensor:
    """``[b, s, h] -> [b, s/tp, h]``: keep this rank's sequence chunk (input replicated over TP)."""
    return _ScatterToSequence.apply(x, layout) if _parallel(layout) else x


def gather_from_sequence(x: torch.Tensor, layout) -> torch.Tensor:
    """``[b, s/tp, h] -> [b, s, h]`` before a column-parallel layer under sequence parallel."""
    return _GatherFromSequence.apply(x, layout) if _parallel(layout) else x


def gather_sequence_replicated(x: torch.Tensor, layout) -> torch.Tensor:
    """``[b, s/tp, h] -> [b, s, h]`` for a consumer that every TP rank computes identically (a value
    head): its gradient is already complete on each rank, so backward keeps the local chunk."""
    return _GatherSequenceReplicated.apply(x, layout) if _parallel(layout) else x


def reduce_scatter_to_sequence(x: torch.Tensor, layout) -> torch.Tensor:
    """``[b, s, h]`` partial sums ``-> [b, s/tp, h]`` after a row-parallel layer under sequence parallel."""
    return _ReduceScatterToSequence.apply(x, layout) if _parallel(layout) else x


def gather_from_tp(x: torch.Tensor, layout) -> torch.Tensor:
    """``[..., n/tp] -> [..., n]``: concatenate the TP shards of the last dim (e.g. full logits)."""
    return _GatherFromTP.apply(x, layout) if _parallel(layout) else x
