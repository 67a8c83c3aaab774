"""How a GLM model is built: which linear/embedding modules and which kernel backends.

The model code (engine/model/glm.py) is written once. A `ModelSpec` decides, from outside, whether a
projection is a plain ``nn.Linear`` (single process) or a column/row-parallel linear (tensor
parallel, built by ``engine.parallel``), and which kernel backend each op uses. Factories receive a
``role`` ("qkv", "dense", "gate_up", "down", "output") so a parallel plan can shard the fused QKV
per KV group and the fused gate/up per half.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class KernelPlan:
    """Kernel backend per op: "auto" (Triton on CUDA, torch on CPU), "torch", "triton", or third party."""

    rms_norm: str = "auto"
    """RMSNorm (and fused residual add)."""
    rotary: str = "auto"
    """Rotary embedding on q and k."""
    swiglu: str = "auto"
    """silu(gate) * up."""
    attention: str = "auto"
    """Core attention (flash attention on GPU)."""
    cross_entropy: str = "auto"
    """Loss / log-prob over the vocabulary."""

    @classmethod
    def all(cls, backend: str) -> "KernelPlan":
        return cls(backend, backend, backend, backend, backend)


def at_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [..., h]`` at the flat positions ``index`` ``[n]`` of its leading dims (``glm.head_positions``):
    ``[n, h]``, what a head computes its outputs from."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


class Linear(nn.Linear):
    """The single-process projection: ``nn.Linear`` that can hold a LoRA adapter (``engine.model.lora``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.lora(x) if self.lora is not None and self.lora.enabled else y


class OutputLinear(nn.Linear):
    """The single-process output layer: ``forward(x [..., in], index=None)``; with ``index`` only those
    rows (``at_positions``): ``[n, out]``, as ``ColumnParallelLinear`` does under tensor parallelism."""

    def forward(self, x, index=None):
        return super().forward(x if index is None else at_positions(x, index))


def plain_linear(in_features: int, out_features: int, bias: bool, role: str) -> nn.Module:
    return (OutputLinear if role == "output" else Linear)(in_features, out_features, bias=bias)


def plain_embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    return nn.Embedding(num_embeddings, embedding_dim)


@dataclass(frozen=True)
class ModelSpec:
    """Module factories and kernel backends for one model instance."""

    column_linear: Callable[[int, int, bool, str], nn.Module] = plain_linear
    """Projections whose outputs may be split over tensor-parallel ranks (qkv, gate_up, output)."""
    row_linear: Callable[[int, int, bool, str], nn.Module] = plain_linear
    """Projections whose inputs may be split over tensor-parallel ranks (dense, down)."""
    embedding: Callable[[int, int], nn.Module] = plain_embedding
    """Word embedding (vocab-parallel under tensor parallelism)."""
    tp_size: int = 1
    """Tensor-parallel degree: each rank holds heads / tp query heads and max(1, groups / tp) KV heads."""
    kernels: KernelPlan = field(default_factory=KernelPlan)
    """Kernel backend per op."""
    vocab_group: object = None
    """Process group over which the output logits are vocab-sharded (None: full vocabulary)."""
    gather_sequence: Optional[Callable] = None
    """Under sequence parallel: ``[b, s/tp, h] -> [b, s, h]`` for heads computed identically on every TP
    rank (the value head, last-token logits); None when the residual stream holds the full sequence."""
    gather_vocab: Optional[Callable] = None
    """Under tensor parallel: vocab-sharded logits ``[..., v/tp] -> [..., v]`` (what sampling needs: every
    TP rank then draws the same token); None when the output layer holds the full vocabulary."""
    context_parallel: Optional[object] = None
    """``engine.parallel.context_parallel.ContextParallel`` when each sequence is split over cp ranks:
    the model's inputs are this rank's 2 chunks of every sequence (``ContextParallel.split``) and
    attention gathers the keys and values; None: the model sees whole sequences."""
