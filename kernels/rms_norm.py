"""RMSNorm with an optional fused residual add.

    h = x + residual            (when residual is given)
    y = h / sqrt(mean(h^2) + eps) * w

The normalisation runs in fp32 and is cast back to the input dtype before the weight multiply,
which is what Hugging Face's GlmRMSNorm does (bitwise parity in fp32, same rounding in bf16).

Triton backend, per row of ``h`` (n columns), with ``r = rstd = 1 / sqrt(mean(h^2) + eps)`` and
``nh = h * r`` (the normalised row, fp32)::

    forward:   y = w * round(nh)                               (rstd saved, fp32, one per row)
    backward:  g = dy * w
               dh = r * (g - nh * mean(g * nh))                 (+ the gradient of the h output)
               dw = sum_rows dy * nh                            (fp32 partial sums per program)

``h = x + residual`` is rounded to its dtype before it is normalised, exactly as the reference
computes it, and is returned, so its gradient flows into both ``dx`` and ``dresidual``.
"""
from __future__ import annotations

import torch

from ._backend import TORCH, check_floating, resolve_backend

from ._triton_utils import jit as _jit
from ._triton_utils import round_to as _round_to
from ._triton_utils import tl, triton


# Tile sizes: a tile holds whole rows. The element counts aim at ~8-16 fp32 values per thread with
# the warp counts from _num_warps; a heuristic, not yet swept on a GPU (see docs/benchmarks.md).
_FWD_TILE_ELEMS = 4096
_BWD_TILE_ELEMS = 2048
_MAX_COLS = 32768  # a row must fit one tile (registers); wider rows: use backend="torch"
_BWD_PROGRAMS_PER_SM = 2  # backward programs loop over row tiles; dweight has one partial per program
_BWD_PROGRAMS_CPU = 4  # under the interpreter: few programs, so tests exercise the row loop


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-PyTorch reference; x [..., h], weight [h]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels. Tiles are [BLOCK_M rows, BLOCK_N columns]; BLOCK_N covers a whole row.
# ------------------------------------------------------------------------------------------------

@_jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
                         n_rows, n_cols, stride_x, stride_res, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         EMULATE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_out = _round_to(h + res, h_ptr.dtype.element_ty, EMULATE)
        tl.store(h_ptr + rows64 * n_cols + cols[None, :], h_out, mask=mask)
        h = h_out.to(tl.float32)  # normalise the rounded sum, as the reference does
    # correctly rounded sqrt and divisions (plain "/" is div.full.f32, ~2 ulp, on NVIDIA)
    mean_sq = tl.div_rn(tl.sum(h * h, axis=1), n_cols + 0.0)  # + 0.0: fp32 even if n_cols is specialised
    rstd = tl.div_rn(tl.full(mean_sq.shape, 1.0, tl.float32), tl.sqrt_rn(mean_sq + eps))
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    # round(nh) to h's dtype, then the weight multiply rounded once to y's dtype
    nh = _round_to(h * rstd[:, None], h_ptr.dtype.element_ty, EMULATE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = _round_to(nh * w[None, :], y_ptr.dtype.element_ty, EMULATE)
    tl.store(y_ptr + rows64 * n_cols + cols[None, :], y, mask=mask)


@_jit
def _rms_norm_bwd_kernel(dy_ptr, dh_out_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dres_ptr, dw_part_ptr,
                         n_rows, n_cols, stride_dy, stride_dh_out, stride_h,
                         HAS_DH_OUT: tl.constexpr, HAS_DRES: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        h = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        nh = h * rstd[:, None]
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * nh, axis=0)
        g = dy * w[None, :]
        dh = rstd[:, None] * (g - nh * tl.div_rn(tl.sum(g * nh, axis=1), n_cols + 0.0)[:, None])
        if HAS_DH_OUT:
            dh += tl.load(dh_out_ptr + rows64 * stride_dh_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows64 * n_cols + cols[None, :], _round_to(dh, dx_ptr.dtype.element_ty, EMULATE), mask=mask)
        if HAS_DRES:
            tl.store(dres_ptr + rows64 * n_cols + cols[None, :], _round_to(dh, dres_ptr.dtype.element_ty, EMULATE),
                     mask=mask)
    if COMPUTE_DW:
        tl.store(dw_part_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Launchers: flatten to 2-D [rows, n], pick tile and warps.
# ------------------------------------------------------------------------------------------------

def _num_warps(tile_elems: int) -> int:
    return max(1, min(16, tile_elems // 512))


def _tile(n_rows: int, n_cols: int, tile_elems: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile_elems // block_n))
    return block_m, block_n


def _rows_2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if (t2.stride(-1) == 1 or n_cols == 1) else t2.contiguous()


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """Returns y [rows, n], h [rows, n] (x as [rows, n] without residual), rstd [rows] fp32."""
    n = x.shape[-1]
    x2 = _rows_2d(x, n)
    res2 = _rows_2d(residual, n) if residual is not None else None
    rows = x2.shape[0]
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((rows, n), device=x.device, dtype=torch.promote_types(h_dtype, weight.dtype))
    h = torch.empty((rows, n), device=x.device, dtype=h_dtype) if residual is not None else None
    rstd = torch.empty((rows,), device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, (h if h is not None else x2), rstd
    block_m, block_n = _tile(rows, n, _FWD_TILE_ELEMS)
    # Without a residual, h is x itself: its pointer only supplies the dtype to round nh to.
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x2, res2 if res2 is not None else x2, weight, y, h if h is not None else x2, rstd,
        rows, n, x2.stride(0), res2.stride(0) if res2 is not None else 0, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, EMULATE=not x.is_cuda,
        num_warps=_num_warps(block_m * block_n))
    return y, (h if h is not None else x2), rstd


def rms_norm_bwd(dy: torch.Tensor, dh_out: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor, dx_dtype: torch.dtype, dres_dtype: torch.dtype | None, compute_dw: bool):
    """All 2-D [rows, n] except rstd [rows]. Returns dx, dresidual (or None), dweight (or None)."""
    rows, n = h.shape
    dy = _rows_2d(dy, n)
    dh_out = _rows_2d(dh_out, n) if dh_out is not None else None
    dx = torch.empty((rows, n), device=h.device, dtype=dx_dtype)
    dres = torch.empty((rows, n), device=h.device, dtype=dres_dtype) if dres_dtype is not None else None
    block_m, block_n = _tile(rows, n, _BWD_TILE_ELEMS)
    n_tiles = triton.cdiv(rows, block_m) if rows else 0
    if h.is_cuda:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        n_programs = min(n_tiles, _BWD_PROGRAMS_PER_SM * sms)
    else:
        n_programs = min(n_tiles, _BWD_PROGRAMS_CPU)
    dw_part = torch.empty((max(n_programs, 1), n), device=h.device, dtype=torch.float32) if compute_dw else None
    if n_programs == 0:
        if dw_part is not None:
            dw_part.zero_()
    else:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy, dh_out if dh_out is not None else dy, h, weight, rstd, dx, dres if dres is not None else dx,
            dw_part if dw_part is not None else rstd,
            rows, n, dy.stride(0), dh_out.stride(0) if dh_out is not None else 0, h.stride(0),
            HAS_DH_OUT=dh_out is not None, HAS_DRES=dres is not None, COMPUTE_DW=compute_dw,
            BLOCK_M=block_m, BLOCK_N=block_n, EMULATE=not h.is_cuda, num_warps=_num_warps(block_m * block_n))
    dw = dw_part.sum(0).to(weight.dtype) if dw_part is not None else None
    return dx, dres, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, h, rstd = rms_norm_fwd(x, weight, eps, residual)
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = x.shape
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        n = ctx.shape[-1]
        if dy is None:  # only h was used downstream: dx = dresidual = dh
            dy = torch.zeros(ctx.shape, device=h.device, dtype=h.dtype)
        x_dtype, res_dtype = ctx.dtypes
        # dx and dresidual are the same values: one tensor serves both unless their dtypes differ
        # (returning one tensor for two inputs is what autograd's own add backward does).
        separate_dres = ctx.needs_input_grad[2] and res_dtype != x_dtype
        dx, dres, dw = rms_norm_bwd(dy.reshape(-1, n), None if dh_out is None else dh_out.reshape(-1, n), h,
                                    weight, rstd, x_dtype, res_dtype if separate_dres else None,
                                    ctx.needs_input_grad[1])
        dx = dx.view(ctx.shape)
        if not ctx.needs_input_grad[2]:
            dres = None
        else:
            dres = dres.view(ctx.shape) if separate_dres else dx
        return dx, dw, dres, None


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_floating("rms_norm", "x", x)
    check_floating("rms_norm", "weight", weight)
    if x.dim() == 0:
        raise ValueError(f"rms_norm: x must have at least one dim, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]} (x {tuple(x.shape)})")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x {tuple(x.shape)} is on {x.device}")
    if residual is not None:
        check_floating("rms_norm", "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} is on {residual.device} but x is on {x.device}")


# Backends beyond torch / triton, each a function of kernels/_cuda.py (imported on first use, so a
# missing extension or package costs nothing until it is asked for).
_CUDA_BACKENDS = {"cuda": "rms_norm_cuda", "apex": "rms_norm_apex", "transformer_engine": "rms_norm_te"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """RMSNorm over the last dim. Returns ``y``, or ``(y, x + residual)`` when ``residual`` is given.

    ``backend``: "auto" (triton on CUDA tensors, else torch), "torch", "triton", "cuda" (csrc kernels,
    ``kernels._cuda_ops``), "apex" (NVIDIA apex FusedRMSNorm) or "transformer_engine" (NVIDIA TE
    RMSNorm). The last three need CUDA tensors and add the residual with a separate torch op."""
    _check(x, weight, residual)
    backend = resolve_backend("rms_norm", backend, x, extra=tuple(_CUDA_BACKENDS))
    if backend in _CUDA_BACKENDS:
        from . import _cuda
        return getattr(_cuda, _CUDA_BACKENDS[backend])(x, weight, eps, residual)
    if backend == TORCH:
        h = x if residual is None else x + residual
        y = rms_norm_reference(h, weight, eps)
        return y if residual is None else (y, h)
    if x.shape[-1] > _MAX_COLS:
        raise ValueError(f"rms_norm: backend='triton' keeps a row in one tile, so the last dim must be <= "
                         f"{_MAX_COLS}; got x shape {tuple(x.shape)} (use backend='torch')")
    return RMSNormFunction.apply(x, weight, residual, float(eps))


def compile_specs():
    """Representative launches for the GPU compile test (see tests/kernels/test_gpu_compile.py), with the
    launchers' warps (_num_warps of the tile; ChatGLM's hidden 4096 is one row per tile)."""
    specs = []
    for dt, residual_flags in (("bf16", (False, True)), ("fp16", (True,)), ("fp32", (False,))):
        for has_res in residual_flags:
            sig = {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}", "h_ptr": f"*{dt}",
                   "rstd_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "stride_x": "i64", "stride_res": "i64",
                   "eps": "fp32"}
            specs.append((_rms_norm_fwd_kernel, sig, {"HAS_RESIDUAL": has_res, "BLOCK_M": 1, "BLOCK_N": 4096,
                                                      "EMULATE": False}, f"rms_norm_fwd_{dt}_res{int(has_res)}_4096",
                          {"num_warps": _num_warps(4096)}))
            sig = {"dy_ptr": f"*{dt}", "dh_out_ptr": f"*{dt}", "h_ptr": f"*{dt}", "w_ptr": f"*{dt}",
                   "rstd_ptr": "*fp32", "dx_ptr": f"*{dt}", "dres_ptr": f"*{dt}", "dw_part_ptr": "*fp32",
                   "n_rows": "i32", "n_cols": "i32", "stride_dy": "i64", "stride_dh_out": "i64", "stride_h": "i64"}
            specs.append((_rms_norm_bwd_kernel, sig, {"HAS_DH_OUT": has_res, "HAS_DRES": has_res, "COMPUTE_DW": True,
                                                      "BLOCK_M": 1, "BLOCK_N": 4096, "EMULATE": False},
                          f"rms_norm_bwd_{dt}_res{int(has_res)}_4096", {"num_warps": _num_warps(4096)}))
    # small hidden size: several rows per tile
    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*fp32", "h_ptr": "*bf16",
           "rstd_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "stride_x": "i64", "stride_res": "i64", "eps": "fp32"}
    specs.append((_rms_norm_fwd_kernel, sig, {"HAS_RESIDUAL": False, "BLOCK_M": 16, "BLOCK_N": 256, "EMULATE": False},
                  "rms_norm_fwd_bf16_fp32weight_16x256", {"num_warps": _num_warps(16 * 256)}))
    return specs
