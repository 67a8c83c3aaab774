"""Fused AdamW step over flat lists of tensors, with fp32 moments and optional fp32 master weights.

For each element, with ``t = step`` (the number of updates including this one), fp32 arithmetic::

    g  = grad / grad_scale                         (grad_scale: loss scale; 1 when not given)
    w  = master if master_params is given, else param (read as fp32)
    w  = w * (1 - lr * weight_decay)               decoupled weight decay, on the pre-update weights
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    w  = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)      bias correction
    master = w;  param = round_to_param_dtype(w)   (round to nearest even)

This is ``torch.optim.AdamW``'s update (``amsgrad=False``, ``maximize=False``). The bias
corrections are computed in fp64 on the host and passed as fp32 scalars. Without master weights a
bf16/fp16 param is updated through fp32 and rounded back (pure low-precision training loses
small updates; pass fp32 ``master_params`` to keep them).

Backends (``backend=``): ``torch`` (the reference: the math above with torch ops, any device);
``triton`` (one launch per (param dtype, grad dtype) group: every program takes one chunk of one
tensor through a device-side table of tensor addresses, so a whole model is one or a few
launches); ``cuda`` (``csrc/adamw.cu`` through ``torch.ops.glm_engine.adamw_step``, see
``kernels._cuda``); ``apex`` (NVIDIA apex ``amp_C.multi_tensor_adam`` when importable, run on fp32
lists); ``auto`` is triton for CUDA tensors, torch otherwise.

``FusedAdamW`` wraps the step in a ``torch.optim.Optimizer`` that keeps fp32 master copies of
low-precision params in its state.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Iterable, Optional, Sequence, Union

import torch

from ._backend import TORCH, TRITON, resolve_backend

from ._triton_utils import jit as _jit
from ._triton_utils import round_to as _round_to
from ._triton_utils import tl


CUDA = "cuda"
APEX = "apex"
_OP = "fused_adamw_step"

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]

# Triton launch shape: a program updates one chunk = _TILES tiles of _BLOCK elements. On a GPU,
# 1024-element tiles with 4 warps give 8 elements per thread per tile, and 16 tiles per program
# (16K elements) amortise the table lookups; a heuristic, not yet swept (see docs/benchmarks.md).
# Under the interpreter the chunks are small so that the tests cover several chunks and tiles.
_BLOCK_GPU, _TILES_GPU, _WARPS_GPU = 1024, 16, 4
_BLOCK_CPU, _TILES_CPU = 256, 4
_ADDR_SLOTS = 5  # param, grad, exp_avg, exp_avg_sq, master (addresses per tensor in the table)
_TABLE_CACHE_SIZE = 32  # launch tables kept per process (keyed by addresses and sizes)
# When every address is 16-byte aligned and every size a multiple of 8, the kernel is told so
# (ALIGNED) and loads/stores 16-byte vectors; shards cut at arbitrary offsets take scalar accesses.
_ALIGN_BYTES, _ALIGN_ELEMS = 16, 8


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------

@_jit
def _adamw_kernel(addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, grad_scale_ptr,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay_factor, step_size,
                  bias_correction2_sqrt, inv_grad_scale,
                  PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                  TILES: tl.constexpr, EMULATE: tl.constexpr):
    # addr_ptr: [n_tensors, 5] int64 addresses (param, grad, exp_avg, exp_avg_sq, master);
    # numel_ptr: [n_tensors] int64; chunk_tensor_ptr / chunk_start_ptr: [n_chunks] tensor index
    # (int32) and first element (int64) of each program's chunk. 1 - beta comes from the host (fp64
    # rounded once): in fp32, 1 - 0.9f is 4 ulps off 0.1, a bias the moments would carry.
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + chunk).to(tl.int64)
    start = tl.load(chunk_start_ptr + chunk)
    n = tl.load(numel_ptr + t)
    row = addr_ptr + t * 5  # _ADDR_SLOTS
    p_ptr = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))  # == param address without masters
    if ALIGNED:  # host-checked: 16-byte aligned addresses, sizes a multiple of 8 (_ALIGN_*)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
        n = tl.multiple_of(n, 8)
    grad_mul = inv_grad_scale
    if HAS_GRAD_SCALE:
        grad_mul = tl.math.div_rn(grad_mul, tl.load(grad_scale_ptr))
    for tile in range(TILES):
        offs = start + tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_mul
        if HAS_MASTER:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        w = w * decay_factor
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        # correctly rounded sqrt and divisions (Triton's default fp32 '/' is approximate on GPUs)
        denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        w = w - step_size * tl.math.div_rn(m, denom)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        tl.store(p_ptr + offs, _round_to(w, PARAM_DTYPE, EMULATE), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def _launch_table(addresses: list, numels: list, chunk: int, device: torch.device):
    """Device tensors (addr [T, 5] i64, numel [T] i64, chunk_tensor [C] i32, chunk_start [C] i64).

    A table is a pure function of its key (addresses, sizes, chunk, device), so reusing a cached
    one is always correct, even if the memory was freed and reallocated in between; in training
    the same buffers come back every step and the host->device upload happens once."""
    key = (device, chunk, tuple(addresses), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    counts = torch.tensor([(n + chunk - 1) // chunk for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk
    table = (torch.tensor(addresses, dtype=torch.int64).view(-1, _ADDR_SLOTS).to(device),
             torch.tensor(numels, dtype=torch.int64).to(device),
             chunk_tensor.to(torch.int32).to(device),
             chunk_start.to(device))
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, masters, hyper, grad_scale):
    device = params[0].device
    on_gpu = device.type == "cuda"
    block, tiles = (_BLOCK_GPU, _TILES_GPU) if on_gpu else (_BLOCK_CPU, _TILES_CPU)
    inv_scale, scale_t = _split_grad_scale(grad_scale, device)
    for idx in _dtype_groups(params, grads):
        addresses, numels = [], []
        for i in idx:
            if params[i].numel() == 0:
                continue
            w = masters[i] if masters is not None else params[i]
            addresses += [params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                          exp_avg_sqs[i].data_ptr(), w.data_ptr()]
            numels.append(params[i].numel())
        if not numels:
            continue
        addr, numel, chunk_tensor, chunk_start = _launch_table(addresses, numels, block * tiles, device)
        aligned = all(a % _ALIGN_BYTES == 0 for a in addresses) and all(n % _ALIGN_ELEMS == 0 for n in numels)
        _adamw_kernel[(chunk_tensor.numel(),)](
            addr, numel, chunk_tensor, chunk_start, scale_t if scale_t is not None else numel,
            hyper["beta1"], hyper["one_minus_beta1"], hyper["beta2"], hyper["one_minus_beta2"], hyper["eps"],
            hyper["decay_factor"], hyper["step_size"], hyper["bias_correction2_sqrt"], inv_scale,
            PARAM_DTYPE=_tl_dtype(params[idx[0]].dtype), GRAD_DTYPE=_tl_dtype(grads[idx[0]].dtype),
            HAS_MASTER=masters is not None, HAS_GRAD_SCALE=scale_t is not None, ALIGNED=aligned, BLOCK=block,
            TILES=tiles,
            EMULATE=not on_gpu, num_warps=_WARPS_GPU)


# ------------------------------------------------------------------------------------------------
# torch reference, apex glue
# ------------------------------------------------------------------------------------------------

def _adamw_torch(params, grads, exp_avgs, exp_avg_sqs, masters, *, lr, beta1, beta2, eps, weight_decay, step,
                 grad_scale):
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    inv_scale, scale_t = _split_grad_scale(grad_scale, params[0].device if params else None)
    for i, (p, grad, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        grad, m, v = (_shaped_like(t, p, name, i) for t, name in ((grad, "grads"), (m, "exp_avgs"),
                                                                 (v, "exp_avg_sqs")))
        g = grad.float()
        if scale_t is not None:
            g = g * (inv_scale / scale_t)
        elif inv_scale != 1.0:
            g = g * inv_scale
        if masters is not None:
            w = _shaped_like(masters[i], p, "master_params", i)
        else:
            w = p if p.dtype == torch.float32 else p.float()
        if weight_decay:
            w.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        w.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-lr / bias_correction1)
        if w is not p:
            p.copy_(w)


def _shaped_like(t: torch.Tensor, p: torch.Tensor, name: str, i: int) -> torch.Tensor:
    """``t`` viewed with param ``p``'s shape (equal element counts were checked); a view, so that
    in-place updates land in ``t``."""
    if t.shape == p.shape:
        return t
    try:
        return t.view(p.shape)
    except RuntimeError as exc:
        raise ValueError(f"{_OP}: {name}[{i}] of shape {tuple(t.shape)} (strides {t.stride()}) cannot be viewed "
                         f"as params[{i}]'s shape {tuple(p.shape)}; pass it with the param's shape") from exc


def _apex_multi_tensor_adam():
    """(multi_tensor_applier, amp_C.multi_tensor_adam) or None when apex's CUDA extensions are absent."""
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
        if not getattr(multi_tensor_applier, "available", True):
            return None
        return multi_tensor_applier, amp_C.multi_tensor_adam
    except Exception:  # apex missing, or built without --cuda_ext, or broken against this torch
        return None


def apex_available() -> bool:
    return _apex_multi_tensor_adam() is not None


def _adamw_apex(params, grads, exp_avgs, exp_avg_sqs, masters, *, lr, beta1, beta2, eps, weight_decay, step,
                grad_scale):
    """apex's kernel on all-fp32 lists (the combination every apex version supports): low-precision
    grads are copied to fp32, params without a master go through an fp32 copy, then rounded back."""
    found = _apex_multi_tensor_adam()
    if found is None:
        raise RuntimeError(f"{_OP}: backend='apex' needs NVIDIA apex built with its CUDA extensions "
                           "(amp_C); it is not importable here. apex is not on PyPI: build it from "
                           "github.com/NVIDIA/apex with --cuda_ext, or use backend='triton' / 'cuda' / 'torch'")
    applier, multi_tensor_adam = found
    if not params[0].is_cuda:
        raise RuntimeError(f"{_OP}: backend='apex' needs CUDA tensors, got params on {params[0].device}")
    inv_scale, scale_t = _split_grad_scale(grad_scale, params[0].device)
    g32 = []
    for g in grads:
        g = g.float()
        if scale_t is not None:
            g = g * (inv_scale / scale_t)
        elif inv_scale != 1.0:
            g = g * inv_scale
        g32.append(g)
    if masters is not None:
        w32 = list(masters)
    else:
        w32 = [p if p.dtype == torch.float32 else p.float() for p in params]
    noop = torch.zeros(1, dtype=torch.int32, device=params[0].device)
    adam_w_mode, bias_correction = 1, 1
    applier(multi_tensor_adam, noop, [g32, w32, list(exp_avgs), list(exp_avg_sqs)], lr, beta1, beta2, eps, step,
            adam_w_mode, bias_correction, weight_decay)
    for p, w in zip(params, w32):
        if w is not p:
            p.copy_(w)


# ------------------------------------------------------------------------------------------------
# Validation and dispatch
# ------------------------------------------------------------------------------------------------

def _as_list(name: str, x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_OP}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        return list(x)
    raise TypeError(f"{_OP}: {name} must be a tensor or a list of tensors, got {type(x).__name__}")


def _describe(t: torch.Tensor) -> str:
    return f"dtype {t.dtype}, shape {tuple(t.shape)}, device {t.device}"


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs, masters, kernel_backend: bool) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if masters is not None:
        lists["master_params"] = masters
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{_OP}: the tensor lists must have the same length, got {lengths}")
    if not params:
        return
    device = params[0].device
    for i in range(len(params)):
        p = params[i]
        for name, lst in lists.items():
            t = lst[i]
            if not t.is_floating_point():
                raise TypeError(f"{_OP}: {name}[{i}] must be floating point, got {_describe(t)}")
            if name in ("exp_avgs", "exp_avg_sqs", "master_params") and t.dtype != torch.float32:
                raise TypeError(f"{_OP}: {name}[{i}] must be float32 (moments and master weights are kept "
                                f"in fp32), got {_describe(t)}")
            if name in ("params", "grads") and t.dtype not in _PARAM_DTYPES:
                raise TypeError(f"{_OP}: {name}[{i}] must be float32, float16 or bfloat16, got {_describe(t)}")
            if t.numel() != p.numel():
                raise ValueError(f"{_OP}: {name}[{i}] has {t.numel()} elements but params[{i}] has {p.numel()} "
                                 f"({name}[{i}]: {_describe(t)}; params[{i}]: {_describe(p)})")
            if t.device != device:
                raise ValueError(f"{_OP}: {name}[{i}] is on {t.device} but params[0] is on {device}")
            if t.is_sparse:
                raise TypeError(f"{_OP}: {name}[{i}] is sparse; only dense tensors are supported")
            if kernel_backend and not t.is_contiguous():
                raise ValueError(f"{_OP}: {name}[{i}] must be contiguous for the fused kernels, got shape "
                                 f"{tuple(t.shape)} with strides {t.stride()} (use .contiguous() storage, or "
                                 "backend='torch')")
        if masters is not None and _same_memory(masters[i], p):
            raise ValueError(f"{_OP}: master_params[{i}] is the same memory as params[{i}]; pass "
                             "master_params=None to update fp32 params in place")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage and start (storage-level, so it also works on fake tensors while tracing)."""
    return a is b or (a.numel() > 0 and torch._C._is_alias_of(a, b) and a.storage_offset() == b.storage_offset())


def _check_backend_name(backend: str) -> None:
    known = ("auto", TORCH, TRITON, CUDA, APEX)
    if backend not in known:
        raise ValueError(f"{_OP}: unknown backend {backend!r}; choose one of {list(known)}")


def _check_hyper(lr, beta1, beta2, eps, weight_decay, step) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"{_OP}: step must be an int >= 1 (updates so far, including this one), got {step!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{_OP}: {name} must be a finite number >= 0, got {value!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{_OP}: {name} must be in [0, 1), got {value!r}")


def _check_grad_scale(grad_scale, device) -> None:
    if grad_scale is None:
        return
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise ValueError(f"{_OP}: grad_scale must be a number or a one-element floating tensor, got "
                             f"{_describe(grad_scale)}")
        if grad_scale.device != device:
            raise ValueError(f"{_OP}: grad_scale is on {grad_scale.device} but params are on {device}")
    elif not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"{_OP}: grad_scale must be a finite number > 0 or a tensor, got {grad_scale!r}")


def _split_grad_scale(grad_scale, device):
    """(inv_scale: float, scale tensor [1] fp32 or None): a number is folded into inv_scale on the
    host; a tensor stays on the device (no host sync) and the kernels divide by it."""
    if grad_scale is None:
        return 1.0, None
    if isinstance(grad_scale, torch.Tensor):
        return 1.0, grad_scale.detach().reshape(1).to(device=device, dtype=torch.float32)
    return 1.0 / float(grad_scale), None


def _dtype_groups(params, grads) -> list:
    """Indices grouped by (param dtype, grad dtype): one kernel launch per group."""
    groups: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    return list(groups.values())


def _kernel_hyper(lr, beta1, beta2, eps, weight_decay, step) -> dict:
    """Host-side scalars for the fused kernels, computed in fp64 (as the torch reference does)."""
    return {"beta1": beta1, "one_minus_beta1": 1.0 - beta1, "beta2": beta2, "one_minus_beta2": 1.0 - beta2,
            "eps": eps,
            "decay_factor": 1.0 - lr * weight_decay, "step_size": lr / (1.0 - beta1 ** step),
            "bias_correction2_sqrt": math.sqrt(1.0 - beta2 ** step)}


@torch.no_grad()
def fused_adamw_step(params: TensorList, grads: TensorList, exp_avgs: TensorList, exp_avg_sqs: TensorList,
                     master_params: Optional[TensorList] = None, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, step: int, grad_scale=None, backend: str = "auto") -> None:
    """One AdamW update, in place, of every tensor in the lists (see the module docstring for the math).

    params: tensors (or one flat 1-D buffer) of fp32/fp16/bf16; grads: same sizes, fp32/fp16/bf16;
    exp_avgs, exp_avg_sqs: fp32, same sizes; master_params: None, or fp32 copies of params that
    are updated instead, params receiving the rounded result. Tensors are matched by index and
    must have equal element counts (shapes may differ, e.g. a shard given as a 1-D view).
    step: 1 for the first update. grad_scale: None, a number, or a one-element tensor (the loss
    scale; grads are divided by it). backend: "auto" | "torch" | "triton" | "cuda" | "apex".
    """
    params = _as_list("params", params)
    grads = _as_list("grads", grads)
    exp_avgs = _as_list("exp_avgs", exp_avgs)
    exp_avg_sqs = _as_list("exp_avg_sqs", exp_avg_sqs)
    masters = _as_list("master_params", master_params) if master_params is not None else None
    _check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    step = int(step)
    if not params:  # nothing to update; still reject a misspelt backend or mismatched lists
        _check_backend_name(backend)
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs, masters, False)
        return
    backend = resolve_backend(_OP, backend, params[0], extra=(CUDA, APEX))
    _check_tensors(params, grads, exp_avgs, exp_avg_sqs, masters, kernel_backend=backend in (TRITON, CUDA))
    _check_grad_scale(grad_scale, params[0].device)
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)
    if backend == TORCH:
        _adamw_torch(params, grads, exp_avgs, exp_avg_sqs, masters, grad_scale=grad_scale, **hyper)
    elif backend == TRITON:
        _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, masters, _kernel_hyper(**hyper), grad_scale)
    elif backend == CUDA:
        from ._cuda import adamw_step_cuda
        inv_scale, scale_t = _split_grad_scale(grad_scale, params[0].device)
        for idx in _dtype_groups(params, grads):
            adamw_step_cuda([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                            [exp_avg_sqs[i] for i in idx], None if masters is None else [masters[i] for i in idx],
                            inv_grad_scale=inv_scale, grad_scale=scale_t, **hyper)
    else:
        _adamw_apex(params, grads, exp_avgs, exp_avg_sqs, masters, grad_scale=grad_scale, **hyper)


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------

class FusedAdamW(torch.optim.Optimizer):
    """AdamW whose update is ``fused_adamw_step`` (same math as ``torch.optim.AdamW``).

    State per param: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (fp32, param's shape) and, for a
    bf16/fp16 param when ``master_weights`` is true, ``master_param``: the fp32 weights that are
    updated, the param holding their rounded copy. Params with different step counts (some had no
    grad on some steps) are updated in separate calls. ``state_dict``/``load_state_dict`` keep the
    fp32 state in fp32 (torch's default loader would cast it to the param's dtype).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, master_weights: bool = True, backend: str = "auto"):
        _check_hyper(lr, betas[0], betas[1], eps, weight_decay, 1)
        _check_backend_name(backend)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_weights = master_weights
        self.backend = backend

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None):
        """One update of every param with a grad; ``grad_scale`` as in ``fused_adamw_step``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            _check_hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], 1)
            calls: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"FusedAdamW: param of shape {tuple(p.shape)} has a sparse grad; "
                                       "use torch.optim.SparseAdam")
                state = self._state_for(p)
                state["step"] += 1
                master = state.get("master_param")
                lists = calls.setdefault((state["step"], master is not None), ([], [], [], [], []))
                for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], master)):
                    lst.append(t)
            for (step, has_master), (ps, gs, ms, vs, ws) in calls.items():
                fused_adamw_step(ps, gs, ms, vs, ws if has_master else None, lr=group["lr"], beta1=beta1,
                                 beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                                 grad_scale=grad_scale, backend=self.backend)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            state = self.state[p]
            for key, value in saved[pid].items():
                if key == "step":
                    state[key] = int(value)
                elif isinstance(value, torch.Tensor):
                    if value.numel() != p.numel():
                        raise ValueError(f"FusedAdamW.load_state_dict: state[{pid}][{key!r}] has shape "
                                         f"{tuple(value.shape)} but the param has shape {tuple(p.shape)}")
                    # fresh fp32 copies: torch's loader casts to the param dtype (bf16) and aliases
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)


def compile_specs():
    """Representative launches for the GPU compile test (tests/kernels/test_gpu_compile.py)."""
    specs = []
    sig_common = {"addr_ptr": "*i64", "numel_ptr": "*i64", "chunk_tensor_ptr": "*i32", "chunk_start_ptr": "*i64",
                  "grad_scale_ptr": "*fp32", "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
                  "one_minus_beta2": "fp32", "eps": "fp32",
                  "decay_factor": "fp32", "step_size": "fp32", "bias_correction2_sqrt": "fp32",
                  "inv_grad_scale": "fp32"}
    # (param, grad, master, grad_scale tensor, aligned)
    configs = [("bf16", "fp32", True, False, True), ("bf16", "bf16", True, True, False),
               ("fp16", "fp32", True, True, True), ("fp32", "fp32", False, False, True),
               ("bf16", "bf16", False, False, False)]
    names = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32} if tl is not None else {}
    for p_dt, g_dt, has_master, has_scale, aligned in configs:
        constexprs = {"PARAM_DTYPE": names[p_dt], "GRAD_DTYPE": names[g_dt], "HAS_MASTER": has_master,
                      "HAS_GRAD_SCALE": has_scale, "ALIGNED": aligned, "BLOCK": _BLOCK_GPU, "TILES": _TILES_GPU,
                      "EMULATE": False}
        specs.append((_adamw_kernel, dict(sig_common), constexprs,
                      f"adamw_p{p_dt}_g{g_dt}_master{int(has_master)}_scale{int(has_scale)}_aligned{int(aligned)}",
                      {"num_warps": _WARPS_GPU}))
    return specs
