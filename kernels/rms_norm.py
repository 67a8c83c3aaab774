"""RMSNorm with an optional fused residual add.

    h = x + residual            (when residual is given)
    y = h / sqrt(mean(h^2) + eps) * w

The normalisation runs in fp32 and is cast back to the input dtype before the weight multiply,
which is what Hugging Face's GlmRMSNorm does (bitwise parity in fp32, same rounding in bf16).
"""
from __future__ import annotations

import torch

from ._backend import TORCH, check_floating, resolve_backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-PyTorch reference; x [..., h], weight [h]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_floating("rms_norm", "x", x)
    check_floating("rms_norm", "weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]} (x {tuple(x.shape)})")
    if residual is not None:
        check_floating("rms_norm", "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """RMSNorm over the last dim. Returns ``y``, or ``(y, x + residual)`` when ``residual`` is given."""
    _check(x, weight, residual)
    backend = resolve_backend("rms_norm", backend, x)
    if backend == TORCH:
        h = x if residual is None else x + residual
        y = rms_norm_reference(h, weight, eps)
        return y if residual is None else (y, h)
    raise NotImplementedError(f"rms_norm: backend {backend!r} is not implemented yet")
