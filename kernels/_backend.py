"""Backend selection shared by every op in `kernels/`.

Each op accepts ``backend="auto" | "torch" | "triton" | <third party>``. ``auto`` picks Triton for
CUDA tensors and the torch reference for CPU tensors. Triton on CPU tensors is only possible under
the Triton interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the
CPU test suite exercises the kernels.
"""
from __future__ import annotations

import importlib.util
import os

import torch

TORCH = "torch"
TRITON = "triton"
AUTO = "auto"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, backend: str, tensor: torch.Tensor, extra: tuple[str, ...] = ()) -> str:
    """Turn the user's ``backend`` choice into a concrete one for ``tensor``, or raise a clear error."""
    known = (AUTO, TORCH, TRITON) + tuple(extra)
    if backend not in known:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {list(known)}")
    if backend == AUTO:
        return TRITON if (tensor.is_cuda and triton_available()) else TORCH
    if backend == TRITON:
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but the triton package is not installed")
        if not tensor.is_cuda and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' got CPU tensors; Triton kernels need CUDA tensors, or the Triton "
                "interpreter (set TRITON_INTERPRET=1 before importing kernels) to run on CPU"
            )
    return backend


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype} with shape {tuple(t.shape)}")
