"""Pieces shared by the Triton kernel files: the optional import and dtype rounding.

triton is optional: without it ``triton``/``tl`` are None, ``jit`` leaves functions undecorated and
the kernels are never launched (``_backend.resolve_backend`` refuses backend="triton").
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional; the torch backends work without it
    triton = None
    tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)


@jit
def round_to(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. The interpreter (EMULATE) truncates fp32 -> bf16,
    so there the rounding is done on the bit pattern; NaN stays (quiet) NaN, inf stays inf."""
    if EMULATE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # quiet NaN, not a rounding carry
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
