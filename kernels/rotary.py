"""Rotary position embedding on the first ``rotary_dim`` channels of each head.

For pair i of the rotated channels (interleaved: channels 2i, 2i+1; non-interleaved: i, i + r/2),
with theta_i = base^(-2i / rotary_dim) and angle a = position * theta_i:
    out_0 = x_0 cos a - x_1 sin a
    out_1 = x_1 cos a + x_0 sin a
Channels past ``rotary_dim`` pass through. GLM uses rotary_dim = head_dim / 2, interleaved pairs.

Triton backend: one program per token and block of heads. The angle is ``fp32(position) * theta_i``
with theta_i from the same fp32 table as the reference (so the angles are bitwise the reference's),
cos/sin are computed in the kernel (libdevice, accurate for large angles), and the rotation runs in
fp32, rounded once to x's dtype. Backward is the same kernel rotating ``dy`` by ``-a`` (the
rotation is orthogonal: its transpose is its inverse); pass-through channels copy their gradient.
x may be a strided view (e.g. the q/k part of a fused QKV projection) as long as its last dim is
contiguous; the output is a new contiguous ``[b, s, h, d]`` tensor.
"""
from __future__ import annotations

import functools

import torch

from ._backend import TORCH, check_floating, resolve_backend

from ._triton_utils import jit as _jit
from ._triton_utils import round_to as _round_to
from ._triton_utils import tl, triton


# Heads per program: enough that a program moves ~8192 elements (GLM's 32 q + 2 k heads of 128 in
# one or two programs per token). A heuristic for a memory-bound op, not yet swept on a GPU.
_TILE_ELEMS = 8192


def _num_warps(block_h: int, block_d: int) -> int:
    return max(1, min(8, block_h * block_d // 512))


def rotary_inv_freq(rotary_dim: int, base: float, device) -> torch.Tensor:
    """theta_i = base^(-2i / rotary_dim), i < rotary_dim / 2, fp32 (shared by reference and kernel)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))


def rotary_angles(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + (rotary_dim // 2,)`` in fp32."""
    angles = positions.float()[..., None] * rotary_inv_freq(rotary_dim, base, positions.device)
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


# ------------------------------------------------------------------------------------------------
# Triton kernel; grid = (b * s tokens, head blocks). Tiles are [BLOCK_H heads, BLOCK_P pairs].
# ------------------------------------------------------------------------------------------------

@_jit
def _rotary_kernel(x_ptr, pos_ptr, inv_freq_ptr, out_ptr,
                   seq, n_heads, head_dim, rotary_dim,
                   stride_xb, stride_xs, stride_xh, stride_pb, stride_ps,
                   INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, HAS_PASS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PASS: tl.constexpr,
                   EMULATE: tl.constexpr):
    token = tl.program_id(0)
    bi = token // seq
    si = token % seq
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < n_heads
    half = rotary_dim // 2

    pos = tl.load(pos_ptr + bi.to(tl.int64) * stride_pb + si.to(tl.int64) * stride_ps).to(tl.float32)
    pairs = tl.arange(0, BLOCK_P)
    pair_ok = pairs < half
    angle = pos * tl.load(inv_freq_ptr + pairs, mask=pair_ok, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    if BACKWARD:
        sin = -sin

    if INTERLEAVED:
        c0 = 2 * pairs
        c1 = c0 + 1
    else:
        c0 = pairs
        c1 = pairs + half
    # Two strided loads (interleaved: even and odd channels) touch the same cache lines; the second
    # is served from L1, so the op stays at one read and one write of x.
    x_row = x_ptr + bi.to(tl.int64) * stride_xb + si.to(tl.int64) * stride_xs + heads.to(tl.int64)[:, None] * stride_xh
    out_row = out_ptr + (token.to(tl.int64) * n_heads + heads.to(tl.int64))[:, None] * head_dim
    mask = head_ok[:, None] & pair_ok[None, :]
    x0 = tl.load(x_row + c0[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + c1[None, :], mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_row + c0[None, :], _round_to(x0 * cos - x1 * sin, out_dtype, EMULATE), mask=mask)
    tl.store(out_row + c1[None, :], _round_to(x1 * cos + x0 * sin, out_dtype, EMULATE), mask=mask)

    if HAS_PASS:
        rest = rotary_dim + tl.arange(0, BLOCK_PASS)
        rest_mask = head_ok[:, None] & (rest < head_dim)[None, :]
        tl.store(out_row + rest[None, :], tl.load(x_row + rest[None, :], mask=rest_mask), mask=rest_mask)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _inv_freq_cached(rotary_dim: int, base: float, device: str) -> torch.Tensor:
    return rotary_inv_freq(rotary_dim, base, torch.device(device))


def rotary_launch(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float, interleaved: bool,
                  backward: bool) -> torch.Tensor:
    """x [b, s, h, d] with x.stride(-1) == 1; positions [s] or [b, s]. Returns a contiguous rotated copy."""
    b, s, h, d = x.shape
    out = torch.empty((b, s, h, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    inv_freq = _inv_freq_cached(rotary_dim, float(base), str(x.device))
    stride_pb, stride_ps = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    block_d = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(h), _TILE_ELEMS // block_d))
    has_pass = rotary_dim < d
    num_warps = _num_warps(block_h, block_d)
    _rotary_kernel[(b * s, triton.cdiv(h, block_h))](
        x, positions, inv_freq, out, s, h, d, rotary_dim,
        x.stride(0), x.stride(1), x.stride(2), stride_pb, stride_ps,
        INTERLEAVED=interleaved, BACKWARD=backward, HAS_PASS=has_pass, BLOCK_H=block_h,
        BLOCK_P=triton.next_power_of_2(rotary_dim // 2),
        BLOCK_PASS=triton.next_power_of_2(d - rotary_dim) if has_pass else 1,
        EMULATE=not x.is_cuda, num_warps=num_warps)
    return out


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if (t.stride(-1) == 1 or t.shape[-1] == 1) else t.contiguous()


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, rotary_dim, base, interleaved):
        ctx.save_for_backward(positions)
        ctx.args = (rotary_dim, base, interleaved)
        return rotary_launch(_unit_last_stride(x), positions, rotary_dim, base, interleaved, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        rotary_dim, base, interleaved = ctx.args
        dx = rotary_launch(_unit_last_stride(dy), positions, rotary_dim, base, interleaved, backward=True)
        return dx, None, None, None, None


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int) -> None:
    check_floating("apply_rotary", "x", x)
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 != 0 or rotary_dim > x.shape[-1]:
        raise ValueError(f"apply_rotary: rotary_dim must be even, positive and <= head_dim {x.shape[-1]} "
                         f"(x {tuple(x.shape)}), got {rotary_dim}")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"apply_rotary: positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"apply_rotary: positions must be an integer tensor, got dtype {positions.dtype} "
                        f"with shape {tuple(positions.shape)}")
    ok = (positions.dim() == 1 and positions.shape[0] == x.shape[1]) or \
         (positions.dim() == 2 and tuple(positions.shape) == tuple(x.shape[:2]))
    if not ok:
        raise ValueError(f"apply_rotary: positions shape {tuple(positions.shape)} must be [seq] or [batch, seq] "
                         f"matching x {tuple(x.shape)}")
    if positions.device != x.device:
        raise ValueError(f"apply_rotary: positions {tuple(positions.shape)} is on {positions.device} "
                         f"but x {tuple(x.shape)} is on {x.device}")


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 interleaved: bool = True, backend: str = "auto") -> torch.Tensor:
    _check(x, positions, rotary_dim)
    backend = resolve_backend("apply_rotary", backend, x)
    if backend == TORCH:
        return apply_rotary_reference(x, positions, rotary_dim, base, interleaved)
    return RotaryFunction.apply(x, positions, rotary_dim, float(base), bool(interleaved))


def compile_specs():
    """Representative launches for the GPU compile test (see tests/kernels/test_gpu_compile.py)."""
    specs = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"x_ptr": f"*{dt}", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "out_ptr": f"*{dt}",
               "seq": "i32", "n_heads": "i32", "head_dim": "i32", "rotary_dim": "i32",
               "stride_xb": "i64", "stride_xs": "i64", "stride_xh": "i64", "stride_pb": "i64", "stride_ps": "i64"}
        for interleaved in ((True, False) if dt == "bf16" else (True,)):
            for backward in ((False, True) if dt == "bf16" else (False,)):
                # GLM: 34 q+k heads of 128, rotary on the first 64 channels
                meta = {"INTERLEAVED": interleaved, "BACKWARD": backward, "HAS_PASS": True, "BLOCK_H": 64,
                        "BLOCK_P": 32, "BLOCK_PASS": 64, "EMULATE": False}
                specs.append((_rotary_kernel, sig, meta,
                              f"rotary_{'bwd' if backward else 'fwd'}_{dt}_{'inter' if interleaved else 'half'}",
                              {"num_warps": _num_warps(64, 128)}))
    # full-width rotary (no pass-through), int32 positions
    sig = dict(specs[0][1], pos_ptr="*i32")
    specs.append((_rotary_kernel, sig, {"INTERLEAVED": True, "BACKWARD": False, "HAS_PASS": False, "BLOCK_H": 32,
                                        "BLOCK_P": 64, "BLOCK_PASS": 1, "EMULATE": False}, "rotary_fwd_bf16_full_i32pos",
                  {"num_warps": _num_warps(32, 128)}))
    return specs
