"""Python side of the CUDA extension ``kernels._cuda_ops`` (csrc/), and the apex and
transformer-engine RMSNorm glue.

Importing ``kernels._cuda_ops`` registers the ops ``torch.ops.glm_engine.{rms_norm_fwd, rms_norm_bwd,
adamw_step}`` (csrc/cuda_ops.cpp). setup.py builds the extension only when the installed torch has
CUDA, so on CPU machines it is absent: ``cuda_ops_available()`` says so, and asking for
``backend="cuda"`` raises a RuntimeError that explains how to build it. This module adds what
torch.library needs from Python: fake (meta) implementations, so the ops trace under
``torch.compile``, and the autograd.Function that pairs the RMSNorm forward and backward ops.

RMSNorm math (same as kernels/rms_norm.py's reference; x [..., n], weight [n])::

    h = x + residual                                       (when residual is given; plain torch add)
    rstd = 1 / sqrt(mean(h^2) + eps)                       (fp32, per row)
    y = weight * round_to_dtype_of_h(h * rstd)             (y has weight's dtype)
    dh = rstd * (g - nh * mean(g * nh)),  g = dy * weight, nh = h * rstd
    dweight = sum over rows of dy * round(nh)              (fp32 partials per block, summed)

The CUDA kernels take equal x/weight dtypes, or an fp32 weight with fp16/bf16 x.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_cuda_ops = None
_IMPORT_ERROR: Optional[BaseException] = None


def load_cuda_ops() -> bool:
    """Import ``kernels._cuda_ops`` (registering its ops and their fake implementations) if it is not
    loaded yet; True when it is. Runs at import; call it again after building the extension in a
    running process (``launch.bench gpu`` does), since a failed import is not retried by itself."""
    global _cuda_ops, _IMPORT_ERROR
    if _cuda_ops is not None:
        return True
    import importlib
    importlib.invalidate_caches()  # a library built since the last attempt must be found by the finders
    try:
        from . import _cuda_ops as ops  # registers torch.ops.glm_engine.*
    except Exception as exc:  # not built (CPU-only torch, or build skipped) or built against another torch
        _IMPORT_ERROR = exc
        return False
    _register_fakes()
    _cuda_ops, _IMPORT_ERROR = ops, None
    return True


def cuda_ops_available() -> bool:
    """True when the compiled extension ``kernels._cuda_ops`` imported (its ops are registered)."""
    return _cuda_ops is not None


def require_cuda_ops(op: str) -> None:
    """Raise a RuntimeError that says why backend='cuda' cannot run and how to build the extension."""
    if _cuda_ops is not None:
        return
    torch_cuda = torch.version.cuda or "none: this is a CPU-only torch build"
    raise RuntimeError(
        f"{op}: backend='cuda' needs the compiled extension kernels._cuda_ops, which is not available "
        f"(import failed with: {_IMPORT_ERROR!r}). setup.py builds it only when the installed torch has "
        f"CUDA (torch {torch.__version__}, CUDA {torch_cuda}); otherwise the build is skipped. Build it on a "
        "machine with a CUDA-enabled torch and nvcc: `pip install -e .` in the repository root "
        "(TORCH_CUDA_ARCH_LIST picks the GPU architectures, default '8.0;9.0'). Or choose "
        "backend='triton' or backend='torch'.")


def _require_cuda_tensor(op: str, name: str, t: torch.Tensor, backend: str = "cuda") -> None:
    if not t.is_cuda:
        raise RuntimeError(f"{op}: backend='{backend}' needs CUDA tensors, got {name} on {t.device} "
                           f"(shape {tuple(t.shape)}); for CPU tensors use backend='torch'")


# ------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
# ------------------------------------------------------------------------------------------------

def _register_fakes() -> None:
    @torch.library.register_fake("glm_engine::rms_norm_fwd")
    def _rms_norm_fwd_fake(x, weight, eps):
        return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("glm_engine::rms_norm_bwd")
    def _rms_norm_bwd_fake(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("glm_engine::adamw_step")
    def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, master_params, lr, beta1, beta2, eps,
                         weight_decay, step, inv_grad_scale, grad_scale):
        return None


load_cuda_ops()


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------

class RMSNormCudaFunction(torch.autograd.Function):
    """y = rms_norm(x) * weight through glm_engine::rms_norm_fwd / rms_norm_bwd; x [..., n]."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()  # [rows, n]
        weight_c = weight.contiguous()
        y, rstd = torch.ops.glm_engine.rms_norm_fwd(x2, weight_c, eps)
        ctx.save_for_backward(x2, weight_c, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).to(weight.dtype).contiguous()
        dx, dweight = torch.ops.glm_engine.rms_norm_bwd(dy2, x2, weight, rstd)
        return dx.view(ctx.x_shape), dweight, None


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm with the csrc kernels. Returns ``y``, or ``(y, x + residual)`` when ``residual`` is
    given (the add is a separate torch op here; the Triton backend fuses it)."""
    require_cuda_ops("rms_norm")
    _require_cuda_tensor("rms_norm", "x", x)
    h = x if residual is None else x + residual
    y = RMSNormCudaFunction.apply(h, weight, float(eps))
    return y if residual is None else (y, h)


def _apex_rms_norm():
    """apex's (fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine), or None."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine
        return fused_rms_norm_affine, mixed_dtype_fused_rms_norm_affine
    except Exception:  # apex missing, built without --cuda_ext, or broken against this torch
        return None


def apex_rms_norm_available() -> bool:
    return _apex_rms_norm() is not None


def rms_norm_apex(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm with NVIDIA apex's fused kernel (same return convention as ``rms_norm_cuda``). apex
    rounds once, after the weight multiply, where the reference rounds the normalised row first;
    the output is cast to the reference's dtype (promote(x, weight))."""
    fns = _apex_rms_norm()
    if fns is None:
        raise RuntimeError("rms_norm: backend='apex' needs NVIDIA apex built with its CUDA extensions "
                           "(apex.normalization.fused_layer_norm); it is not importable here. apex is not on "
                           "PyPI: build it from github.com/NVIDIA/apex with --cuda_ext, or use "
                           "backend='triton' / 'cuda' / 'torch'")
    _require_cuda_tensor("rms_norm", "x", x, backend="apex")
    fused, mixed = fns
    h = x if residual is None else x + residual
    fn = fused if h.dtype == weight.dtype else mixed
    y = fn(h, weight, (h.shape[-1],), float(eps))
    out_dtype = torch.promote_types(h.dtype, weight.dtype)
    y = y if y.dtype == out_dtype else y.to(out_dtype)
    return y if residual is None else (y, h)


# One transformer_engine.pytorch.RMSNorm per (hidden, eps, weight dtype, device). Its own weight is
# never used: every call swaps in the caller's weight with functional_call, so gradients reach the
# caller's tensor and one module serves every layer of that shape.
_TE_NORMS: dict = {}


def _te_pytorch():
    """(transformer_engine.pytorch, None), or (None, the import error)."""
    try:
        import transformer_engine.pytorch as te_torch
        return te_torch, None
    except Exception as exc:  # missing, or its compiled library does not match this torch / CUDA
        return None, exc


def te_rms_norm_available() -> bool:
    return _te_pytorch()[0] is not None


def _te_norm(te_torch, hidden: int, eps: float, dtype: torch.dtype, device: torch.device):
    key = (hidden, eps, dtype, device)
    norm = _TE_NORMS.get(key)
    if norm is None:
        # zero_centered_gamma stated explicitly: GLM's weight multiplies the normalised row as is
        norm = te_torch.RMSNorm(hidden, eps=eps, params_dtype=dtype, zero_centered_gamma=False, device=device)
        norm.requires_grad_(False)  # the placeholder weight: never trained, never receives a gradient
        _TE_NORMS[key] = norm
    return norm


def rms_norm_te(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm with NVIDIA Transformer Engine's kernel (same return convention as ``rms_norm_cuda``).
    TE rounds once, after the weight multiply (TE 2.x also casts x to the weight's dtype first); the
    output is cast to the reference's dtype (promote(x, weight)), whatever dtype TE returned."""
    te_torch, err = _te_pytorch()
    if te_torch is None:
        raise RuntimeError("rms_norm: backend='transformer_engine' needs NVIDIA Transformer Engine "
                           f"(transformer_engine.pytorch), which is not importable here ({err!r}). It is "
                           "installed with `pip install transformer-engine[pytorch]` and must be built for this "
                           "torch and CUDA; or use backend='triton' / 'cuda' / 'apex' / 'torch'")
    _require_cuda_tensor("rms_norm", "x", x, backend="transformer_engine")
    h = x if residual is None else x + residual
    norm = _te_norm(te_torch, h.shape[-1], float(eps), weight.dtype, weight.device)
    y = torch.func.functional_call(norm, {"weight": weight}, (h,))
    out_dtype = torch.promote_types(h.dtype, weight.dtype)
    y = y if y.dtype == out_dtype else y.to(out_dtype)
    return y if residual is None else (y, h)


# ------------------------------------------------------------------------------------------------
# AdamW
# ------------------------------------------------------------------------------------------------

def adamw_step_cuda(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], master_params: Optional[Sequence[torch.Tensor]], *,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                    inv_grad_scale: float = 1.0, grad_scale: Optional[torch.Tensor] = None) -> None:
    """glm_engine::adamw_step on one (param dtype, grad dtype) group; kernels.adamw validates first.
    Grads are multiplied by ``inv_grad_scale`` and divided by the device scalar ``grad_scale``."""
    require_cuda_ops("fused_adamw_step")
    if params:
        _require_cuda_tensor("fused_adamw_step", "params[0]", params[0])
    torch.ops.glm_engine.adamw_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                    list(master_params) if master_params is not None else [], float(lr),
                                    float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
                                    float(inv_grad_scale), grad_scale)
