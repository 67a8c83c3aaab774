"""SwiGLU activation on a fused [gate | up] projection: y = silu(gate) * up.

x is ``[..., 2 * ffn]`` laid out as ``[gate | up]`` (ChatGLM's dense_h_to_4h and Hugging Face's
gate_up_proj), y is ``[..., ffn]``.

Triton backend, elementwise with ``g`` = gate, ``u`` = up, ``s = sigmoid(g)``, all in fp32 and rounded
once to the output dtype::

    forward:   y  = g * s * u
    backward:  dg = dy * u * s * (1 + g * (1 - s))      (d silu(g) / dg = s + g s (1 - s))
               du = dy * g * s

Only x is saved for backward (y is recomputed from it), and dx comes out as one ``[..., 2 * ffn]``
tensor, so the matmul that produced x gets its gradient without a concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import TORCH, check_floating, resolve_backend

from ._triton_utils import jit as _jit
from ._triton_utils import round_to as _round_to
from ._triton_utils import tl, triton


# Tiles are [BLOCK_M rows, BLOCK_N ffn columns]: up to 1024 columns, rows added until ~2048 elements
# (8 per thread at 8 warps). A heuristic for a memory-bound elementwise op, not yet swept on a GPU.
_MAX_BLOCK_N = 1024
_TILE_ELEMS = 2048


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------
# Triton kernels; grid = (row tiles, column tiles) over x viewed as [rows, 2 * ffn].
# ------------------------------------------------------------------------------------------------

@_jit
def _swiglu_fwd_kernel(x_ptr, y_ptr, n_rows, ffn, stride_x,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < ffn)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate_ptrs = x_ptr + rows64 * stride_x + cols[None, :]
    g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptrs + ffn, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows64 * ffn + cols[None, :], _round_to(y, y_ptr.dtype.element_ty, EMULATE), mask=mask)


@_jit
def _swiglu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n_rows, ffn, stride_x, stride_dy,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < ffn)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate_ptrs = x_ptr + rows64 * stride_x + cols[None, :]
    g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptrs + ffn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    dgate_ptrs = dx_ptr + rows64 * (2 * ffn) + cols[None, :]
    out_dtype = dx_ptr.dtype.element_ty
    tl.store(dgate_ptrs, _round_to(dg, out_dtype, EMULATE), mask=mask)
    tl.store(dgate_ptrs + ffn, _round_to(du, out_dtype, EMULATE), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers: flatten to 2-D, pick tile and warps.
# ------------------------------------------------------------------------------------------------

def _num_warps(block_m: int, block_n: int) -> int:
    return max(1, min(8, block_m * block_n // 256))


def _launch_config(n_rows: int, ffn: int) -> tuple[tuple[int, int], int, int, int]:
    block_n = min(triton.next_power_of_2(ffn), _MAX_BLOCK_N)
    block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), _TILE_ELEMS // block_n))
    num_warps = _num_warps(block_m, block_n)
    # row tiles on grid axis 0 (up to 2^31 - 1), column tiles on axis 1 (up to 65535)
    return (triton.cdiv(n_rows, block_m), triton.cdiv(ffn, block_n)), block_m, block_n, num_warps


def _rows_2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if (t2.stride(-1) == 1 or n_cols == 1) else t2.contiguous()


def swiglu_fwd(x2: torch.Tensor) -> torch.Tensor:
    """x2 [rows, 2 * ffn] (unit column stride) -> y [rows, ffn]."""
    rows, ffn = x2.shape[0], x2.shape[1] // 2
    y = torch.empty((rows, ffn), device=x2.device, dtype=x2.dtype)
    if y.numel():
        grid, block_m, block_n, num_warps = _launch_config(rows, ffn)
        _swiglu_fwd_kernel[grid](x2, y, rows, ffn, x2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                 EMULATE=not x2.is_cuda, num_warps=num_warps)
    return y


def swiglu_bwd(x2: torch.Tensor, dy2: torch.Tensor) -> torch.Tensor:
    """x2 [rows, 2 * ffn], dy2 [rows, ffn] (unit column strides) -> dx [rows, 2 * ffn]."""
    rows, ffn = dy2.shape
    dx = torch.empty((rows, 2 * ffn), device=x2.device, dtype=x2.dtype)
    if dx.numel():
        grid, block_m, block_n, num_warps = _launch_config(rows, ffn)
        _swiglu_bwd_kernel[grid](x2, dy2, dx, rows, ffn, x2.stride(0), dy2.stride(0), BLOCK_M=block_m,
                                 BLOCK_N=block_n, EMULATE=not x2.is_cuda, num_warps=num_warps)
    return dx


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = _rows_2d(x, x.shape[-1])
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return swiglu_fwd(x2).view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        return swiglu_bwd(x2, _rows_2d(dy, dy.shape[-1])).view(ctx.shape)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    check_floating("swiglu", "x", x)
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu: x's last dim must be even ([gate | up]), got shape {tuple(x.shape)}")
    backend = resolve_backend("swiglu", backend, x)
    if backend == TORCH:
        return swiglu_reference(x)
    return SwiGLUFunction.apply(x)


def compile_specs():
    """Representative launches for the GPU compile test (see tests/kernels/test_gpu_compile.py)."""
    specs = []
    for dt in ("bf16", "fp16", "fp32"):
        fwd = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n_rows": "i32", "ffn": "i32", "stride_x": "i64"}
        bwd = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "n_rows": "i32", "ffn": "i32",
               "stride_x": "i64", "stride_dy": "i64"}
        # ChatGLM's ffn 13696 (1024-column tiles); a narrow ffn (several rows per tile), bf16 only
        for block_m, block_n in ((2, 1024), (32, 64))[: 2 if dt == "bf16" else 1]:
            meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "EMULATE": False}
            options = {"num_warps": _num_warps(block_m, block_n)}
            specs.append((_swiglu_fwd_kernel, fwd, meta, f"swiglu_fwd_{dt}_{block_m}x{block_n}", options))
            specs.append((_swiglu_bwd_kernel, bwd, meta, f"swiglu_bwd_{dt}_{block_m}x{block_n}", options))
    return specs
