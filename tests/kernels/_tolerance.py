"""Shared helpers for kernel tests: the "at most 2x PyTorch's error" rule, poisoned allocations, devices.

API
---
``assert_within_torch_error(name, kernel_out, torch_out, truth, factor=2.0, floor_rel=FLOOR_REL)``
    The flash-attention rule. ``truth`` is the reference computed in fp64 from the same (already
    rounded) inputs, ``torch_out`` is the plain-PyTorch result at the kernel's precision, ``kernel_out``
    the kernel's. Requires ``kernel_out`` to have torch_out's shape and dtype, non-finite values exactly
    where ``truth`` has them, and, over the finite elements, both

        max |kernel - truth|  <= factor * max |torch - truth|  + floor
        mean |kernel - truth| <= factor * mean |torch - truth| + floor,   floor = floor_rel * max |truth|

    The mean catches a systematic bias (e.g. truncating instead of rounding) that a max can hide.
    Returns ``{"kernel_max", "torch_max", "kernel_mean", "torch_mean", "floor"}`` for logging.

``poisoned_allocations()``
    Context manager: while active, ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty`` return tensors filled with NaN (floating) or the dtype's max (integers), so an
    output element a kernel never writes shows up as NaN / garbage instead of whatever memory held.
    Yields a counter object; ``counter.calls`` is how many allocations were poisoned (assert it is > 0,
    so the check cannot pass vacuously because the code under test allocated some other way).

``kernel_devices()``
    Devices on which ``backend="triton"`` can run in this process: ``"cpu"`` under the Triton
    interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), ``"cuda"`` when a GPU is present
    and the interpreter is off (``python -m launch.bench gpu`` runs the suite that way).
"""
from __future__ import annotations

import contextlib
import os

import torch

# Why a floor at all: a kernel computes in fp32 with its own (equally valid) summation order and
# libm, and where PyTorch's own error happens to be ~0 (exactly representable results, or an fp32
# result a couple of ulps off), "2x PyTorch's error" would demand bitwise agreement. 8 fp32 ulps of
# the largest |truth| is far below any bf16/fp16 error and any real bug, and covers that noise.
FLOOR_REL = 8 * 2.0 ** -24


def assert_within_torch_error(name: str, kernel_out: torch.Tensor, torch_out: torch.Tensor, truth: torch.Tensor,
                              factor: float = 2.0, floor_rel: float = FLOOR_REL) -> dict:
    if kernel_out.shape != torch_out.shape or kernel_out.shape != truth.shape:
        raise AssertionError(f"{name}: shapes differ: kernel {tuple(kernel_out.shape)}, torch {tuple(torch_out.shape)}, "
                             f"reference {tuple(truth.shape)}")
    if kernel_out.dtype != torch_out.dtype:
        raise AssertionError(f"{name}: dtype {kernel_out.dtype} != torch backend's {torch_out.dtype}")
    k = kernel_out.detach().double().cpu()
    t = torch_out.detach().double().cpu()
    ref = truth.detach().double().cpu()
    finite = torch.isfinite(ref)
    bad = torch.isfinite(k) != finite
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} elements differ in finiteness from the reference, "
                             f"first at {idx}: kernel {k[idx].item()}, reference {ref[idx].item()}")
    if not finite.any():
        return {"kernel_max": 0.0, "torch_max": 0.0, "kernel_mean": 0.0, "torch_mean": 0.0, "floor": 0.0}
    err_k = (k - ref)[finite].abs()
    err_t = (t - ref)[finite].abs()
    err_t = torch.where(torch.isnan(err_t), torch.full_like(err_t, float("inf")), err_t)  # torch NaN: no bound
    floor = floor_rel * ref[finite].abs().max().item()
    stats = {"kernel_max": err_k.max().item(), "torch_max": err_t.max().item(),
             "kernel_mean": err_k.mean().item(), "torch_mean": err_t.mean().item(), "floor": floor}
    if stats["kernel_max"] > factor * stats["torch_max"] + floor:
        worst = tuple(int(i) for i in ((k - ref).abs() * finite).flatten().argmax().unsqueeze(0))
        raise AssertionError(f"{name}: max error {stats['kernel_max']:.3e} > {factor} x torch's {stats['torch_max']:.3e}"
                             f" + floor {floor:.1e} (worst flat index {worst[0]}); {stats}")
    if stats["kernel_mean"] > factor * stats["torch_mean"] + floor:
        raise AssertionError(f"{name}: mean error {stats['kernel_mean']:.3e} > {factor} x torch's "
                             f"{stats['torch_mean']:.3e} + floor {floor:.1e}; {stats}")
    return stats


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


class _Counter:
    calls = 0


@contextlib.contextmanager
def poisoned_allocations():
    counter = _Counter()
    originals = {"empty": torch.empty, "empty_like": torch.empty_like, "empty_strided": torch.empty_strided}
    new_empty = torch.Tensor.new_empty

    def wrap(fn):
        def poisoned(*args, **kwargs):
            counter.calls += 1
            return _poison(fn(*args, **kwargs))
        return poisoned

    try:
        for attr, fn in originals.items():
            setattr(torch, attr, wrap(fn))
        torch.Tensor.new_empty = wrap(new_empty)
        yield counter
    finally:
        for attr, fn in originals.items():
            setattr(torch, attr, fn)
        torch.Tensor.new_empty = new_empty


def kernel_devices() -> list[str]:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    devices = ["cpu"] if interpreting else []
    if torch.cuda.is_available() and not interpreting:
        devices.append("cuda")
    return devices
