"""Rotary position embedding on the first ``rotary_dim`` channels of each head.

For pair i of the rotated channels (interleaved: channels 2i, 2i+1; non-interleaved: i, i + r/2),
with theta_i = base^(-2i / rotary_dim) and angle a = position * theta_i:
    out_0 = x_0 cos a - x_1 sin a
    out_1 = x_1 cos a + x_0 sin a
Channels past ``rotary_dim`` pass through. GLM uses rotary_dim = head_dim / 2, interleaved pairs.
"""
from __future__ import annotations

import torch

from ._backend import TORCH, check_floating, resolve_backend


def rotary_angles(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + (rotary_dim // 2,)`` in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary_reference(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                           interleaved: bool = True) -> torch.Tensor:
    """x [b, s, h, d]; positions [b, s] or [s]."""
    b, s = x.shape[0], x.shape[1]
    positions = positions.expand(b, s) if positions.dim() == 1 else positions
    cos, sin = rotary_angles(positions, rotary_dim, base)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [b, s, 1, r/2]
    rot = x[..., :rotary_dim].float()
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    else:
        x0, x1 = rot.chunk(2, dim=-1)
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _check(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int) -> None:
    check_floating("apply_rotary", "x", x)
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    if rotary_dim <= 0 or rotary_dim % 2 != 0 or rotary_dim > x.shape[-1]:
        raise ValueError(f"apply_rotary: rotary_dim must be even, positive and <= head_dim {x.shape[-1]}, got {rotary_dim}")
    if positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"apply_rotary: positions must be an integer tensor, got dtype {positions.dtype}")
    ok = (positions.dim() == 1 and positions.shape[0] == x.shape[1]) or \
         (positions.dim() == 2 and tuple(positions.shape) == tuple(x.shape[:2]))
    if not ok:
        raise ValueError(f"apply_rotary: positions shape {tuple(positions.shape)} must be [seq] or [batch, seq] "
                         f"matching x {tuple(x.shape)}")


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 interleaved: bool = True, backend: str = "auto") -> torch.Tensor:
    _check(x, positions, rotary_dim)
    backend = resolve_backend("apply_rotary", backend, x)
    if backend == TORCH:
        return apply_rotary_reference(x, positions, rotary_dim, base, interleaved)
    raise NotImplementedError(f"apply_rotary: backend {backend!r} is not implemented yet")
