"""SwiGLU activation on a fused [gate | up] projection: y = silu(gate) * up.

x is ``[..., 2 * ffn]`` laid out as ``[gate | up]`` (ChatGLM's dense_h_to_4h and Hugging Face's
gate_up_proj), y is ``[..., ffn]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import TORCH, check_floating, resolve_backend


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    check_floating("swiglu", "x", x)
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu: x's last dim must be even ([gate | up]), got shape {tuple(x.shape)}")
    backend = resolve_backend("swiglu", backend, x)
    if backend == TORCH:
        return swiglu_reference(x)
    raise NotImplementedError(f"swiglu: backend {backend!r} is not implemented yet")
