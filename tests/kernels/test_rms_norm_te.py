"""rms_norm(backend="transformer_engine"): the glue in kernels/_cuda.py around NVIDIA TE's RMSNorm.

TE is not installed here (nor on the lent GPU machines), so the glue is checked against a stand-in
``transformer_engine.pytorch`` module whose RMSNorm computes like TE (in the weight's dtype, one
rounding at the end): that the caller's weight and eps are what TE sees, that gradients reach the
caller's weight (not the cached module's placeholder), the residual convention, the output dtype,
and the error messages. The numerics of the real TE are checked only where it imports on a GPU.
"""
import sys
import types

import pytest
import torch

from kernels import _cuda, rms_norm

EPS = 1e-5


class FakeTERMSNorm(torch.nn.Module):
    """transformer_engine.pytorch.RMSNorm's constructor and math, on any device."""

    def __init__(self, normalized_shape, eps=1e-5, sequence_parallel=None, params_dtype=None,
                 zero_centered_gamma=False, device=None):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape, dtype=params_dtype, device=device))

    def forward(self, x):
        w = self.weight
        xf = x.to(w.dtype).float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w.float()
        return y.to(w.dtype)


@pytest.fixture
def fake_te(monkeypatch):
    """Installs the stand-in package; returns the list of RMSNorm modules the glue constructs."""
    made = []

    class Recording(FakeTERMSNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    pkg = types.ModuleType("transformer_engine")
    mod = types.ModuleType("transformer_engine.pytorch")
    mod.RMSNorm = Recording
    pkg.pytorch = mod
    monkeypatch.setitem(sys.modules, "transformer_engine", pkg)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", mod)
    monkeypatch.setattr(_cuda, "_TE_NORMS", {})  # modules cached by other tests must not leak in or out
    return made


@pytest.fixture
def fake_te_on_cpu(fake_te, monkeypatch):
    # The real TE runs on CUDA only and the glue refuses CPU tensors (test below); the stand-in runs
    # anywhere, so lifting that one check lets the rest of the glue run on CPU tensors here.
    monkeypatch.setattr(_cuda, "_require_cuda_tensor", lambda *args, **kwargs: None)
    return fake_te


def test_backend_is_listed():
    with pytest.raises(ValueError, match="'transformer_engine'"):
        rms_norm(torch.randn(2, 8), torch.ones(8), EPS, backend="te")


def test_missing_transformer_engine_says_what_and_what_else(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(RuntimeError, match=r"backend='transformer_engine' needs NVIDIA Transformer Engine "
                                           r"\(transformer_engine\.pytorch\), which is not importable.*"
                                           r"backend='triton' / 'cuda' / 'apex' / 'torch'"):
        rms_norm(torch.randn(2, 8), torch.ones(8), EPS, backend="transformer_engine")
    assert not _cuda.te_rms_norm_available()


def test_cpu_tensors_are_refused_with_the_alternative(fake_te):
    with pytest.raises(RuntimeError, match=r"backend='transformer_engine' needs CUDA tensors, got x on cpu "
                                           r"\(shape \(2, 8\)\); for CPU tensors use backend='torch'"):
        rms_norm(torch.randn(2, 8), torch.ones(8), EPS, backend="transformer_engine")
    assert _cuda.te_rms_norm_available()


def test_glue_uses_the_callers_weight_and_eps_and_returns_its_gradient(fake_te_on_cpu):
    g = torch.Generator().manual_seed(0)
    eps = 0.25  # large, so a dropped or default eps shows in the output
    x0, r0 = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    w0 = 1 + 0.5 * torch.randn(16, generator=g)  # not ones: TE's placeholder weight would show
    dy, dh = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)

    results = {}
    for backend in ("torch", "transformer_engine"):
        x, w, r = (t.clone().requires_grad_() for t in (x0, w0, r0))
        y, h = rms_norm(x, w, eps, residual=r, backend=backend)
        grads = torch.autograd.grad((y, h), (x, w, r), (dy, dh))
        results[backend] = (y, h) + grads
    for name, got, want in zip(["y", "h", "dx", "dweight", "dresidual"], results["transformer_engine"],
                               results["torch"]):
        # fp32 on both sides, same formula; only the summation order differs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    (norm,) = fake_te_on_cpu
    assert norm.eps == eps and norm.zero_centered_gamma is False and norm.weight.dtype == w0.dtype
    assert torch.equal(norm.weight, torch.ones(16)) and norm.weight.grad is None  # placeholder untouched

    y = rms_norm(x0, w0, eps, backend="transformer_engine")  # same key: the cached module again
    assert len(fake_te_on_cpu) == 1 and isinstance(y, torch.Tensor)
    rms_norm(x0, w0, EPS, backend="transformer_engine")  # another eps: another module
    assert len(fake_te_on_cpu) == 2


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)], ids=str)
def test_output_dtype_is_the_references(fake_te_on_cpu, x_dtype, w_dtype):
    x = torch.randn(4, 32).to(x_dtype)
    w = torch.ones(32, dtype=w_dtype)
    want = rms_norm(x, w, EPS, backend="torch").dtype
    assert rms_norm(x, w, EPS, backend="transformer_engine").dtype == want


def _te_importable() -> bool:
    return torch.cuda.is_available() and _cuda.te_rms_norm_available()


@pytest.mark.skipif(not _te_importable(), reason="needs a GPU and an importable transformer_engine.pytorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 37, 100)], ids=str)
def test_real_transformer_engine_within_2x_torch_error(dtype, shape):
    from _tolerance import assert_within_torch_error
    from test_rms_norm import _inputs, _run

    x, w, r, dy, dh = _inputs(shape, dtype, "cuda", residual=True)
    truth = _run(x, w, r, dy, dh, "fp64")
    ref = _run(x, w, r, dy, dh, "torch")
    out = _run(x, w, r, dy, dh, "transformer_engine")
    for name, o, t, tr in zip(["y", "h", "dx", "dweight", "dresidual"], out, ref, truth):
        assert_within_torch_error(f"rms_norm te {name} {dtype} {shape}", o, t, tr)
