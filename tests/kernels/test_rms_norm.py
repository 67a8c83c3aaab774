"""RMSNorm (+ fused residual add), Triton backend vs an fp64 reference, forward and backward.

Errors are judged by the rule in _tolerance.py: at most 2x the torch backend's error at the same
precision. On CPU the kernels run under the Triton interpreter (tests/conftest.py).
"""
import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# round; odd (3 x 37 rows of 100: tiles with masked rows and columns); wide rows of 1100 (one row
# per tile lane group, masked tail); many rows (backward programs loop over several row tiles)
SHAPES = [(2, 8, 64), (3, 37, 100), (3, 1100), (300, 24)]
if "cuda" in kernel_devices():  # GPU runs: more row tiles than the backward's 2 x SM programs, so each loops
    SHAPES.append((4, 300, 512))
EPS = 1e-5


def _inputs(shape, dtype, device, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype)
    r = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if residual else None
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dh = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if residual else None
    return x, w, r, dy, dh


def _rms_norm_fp64(h, w):
    # not kernels.rms_norm.rms_norm_reference: that one normalises in fp32 by design
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w


def _run(x, w, r, dy, dh, backend):
    """Forward + backward; returns outputs and input gradients (y[, h], dx, dw[, dr])."""
    cast = (lambda t: t.double()) if backend == "fp64" else (lambda t: t)
    leaves = [cast(t.detach()).clone().requires_grad_() for t in (x, w) + ((r,) if r is not None else ())]
    if backend == "fp64":
        h = leaves[0] if r is None else leaves[0] + leaves[2]
        outs = [_rms_norm_fp64(h, leaves[1])] + ([h] if r is not None else [])
    else:
        res = rms_norm(leaves[0], leaves[1], EPS, residual=leaves[2] if r is not None else None, backend=backend)
        outs = list(res) if isinstance(res, tuple) else [res]
    grads_out = [dy] + ([dh] if r is not None else [])
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward_backward_within_2x_torch_error(device, dtype, shape, residual):
    x, w, r, dy, dh = _inputs(shape, dtype, device, residual)
    truth = _run(x, w, r, dy, dh, "fp64")
    ref = _run(x, w, r, dy, dh, "torch")
    out = _run(x, w, r, dy, dh, "triton")
    names = ["y"] + (["h"] if residual else []) + ["dx", "dweight"] + (["dresidual"] if residual else [])
    for name, o, t, tr in zip(names, out, ref, truth):
        assert_within_torch_error(f"rms_norm {name} {dtype} {shape}", o, t, tr)


@pytest.mark.parametrize("device", kernel_devices())
def test_mixed_dtypes_bf16_input_fp32_weight(device):
    # y takes the promoted dtype (fp32) like the reference; the residual may be fp32 while x is bf16.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 100, generator=g).to(device, torch.bfloat16)
    r = torch.randn(3, 37, 100, generator=g).to(device, torch.float32)
    w = (1 + torch.randn(100, generator=g)).to(device, torch.float32)
    dy = torch.randn(3, 37, 100, generator=g).to(device)
    dh = torch.randn(3, 37, 100, generator=g).to(device)
    truth = _run(x, w, r, dy, dh, "fp64")
    ref = _run(x, w, r, dy, dh, "torch")
    out = _run(x, w, r, dy, dh, "triton")
    assert [t.dtype for t in out] == [t.dtype for t in ref] == [torch.float32, torch.float32, torch.bfloat16,
                                                                 torch.float32, torch.float32]
    for name, o, t, tr in zip(["y", "h", "dx", "dweight", "dresidual"], out, ref, truth):
        assert_within_torch_error(f"rms_norm mixed {name}", o, t, tr)


@pytest.mark.parametrize("device", kernel_devices())
def test_gradient_only_through_one_output(device):
    # Only h is used downstream (y's gradient is None), then only y (h's gradient is None).
    x, w, r, dy, dh = _inputs((5, 7, 48), torch.float32, device, residual=True)
    for used in (0, 1):
        grads = {}
        for backend in ("torch", "triton"):
            leaves = [t.clone().requires_grad_() for t in (x, w, r)]
            outs = rms_norm(leaves[0], leaves[1], EPS, residual=leaves[2], backend=backend)
            grads[backend] = torch.autograd.grad(outs[used], leaves, (dy, dh)[used], allow_unused=True)
        for name, a, b in zip(("dx", "dweight", "dresidual"), grads["triton"], grads["torch"]):
            if b is None or not b.any():
                assert a is None or not a.any(), f"used output {used}: {name} should be zero"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"used output {used}: {name}")


@pytest.mark.parametrize("device", kernel_devices())
def test_every_output_element_is_written(device):
    # NaN-filled allocations: an element the kernels skip would come out NaN instead of matching.
    x, w, r, dy, dh = _inputs((3, 37, 100), torch.bfloat16, device, residual=True)
    r32 = r.float()  # dresidual in its own dtype: the separate store path
    clean = _run(x, w, r32, dy, dh, "triton")
    with poisoned_allocations() as counter:
        poisoned = _run(x, w, r32, dy, dh, "triton")
    assert counter.calls > 0
    for a, b in zip(poisoned, clean):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
def test_non_contiguous_inputs_match_contiguous(device):
    x, w, r, dy, dh = _inputs((6, 40), torch.float32, device, residual=True)
    xt = x.t().contiguous().t()  # same values, column-major: the launcher must copy
    rs = torch.cat([r, r], dim=1)[:, :40]  # row stride 80: used as a strided view
    for a, b in zip(_run(xt, w, rs, dy, dh, "triton"), _run(x, w, r, dy, dh, "triton")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
def test_empty_batch(device):
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = rms_norm(x, w, EPS, backend="triton")
    assert y.shape == (0, 16)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16, device=device))


def test_bad_inputs_name_tensor_and_shape():
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*int64.*\(2, 3, 8\)"):
        rms_norm(torch.ones(2, 3, 8, dtype=torch.long), torch.ones(8), EPS)
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor.*\(8,\)"):
        rms_norm(x, torch.ones(8, dtype=torch.int32), EPS)
    with pytest.raises(ValueError, match=r"weight shape \(7,\).*x's last dim 8.*\(2, 3, 8\)"):
        rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match=r"residual shape \(2, 8\) != x shape \(2, 3, 8\)"):
        rms_norm(x, torch.ones(8), EPS, residual=torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"residual must be a floating-point tensor.*\(2, 3, 8\)"):
        rms_norm(x, torch.ones(8), EPS, residual=torch.ones(2, 3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="unknown backend"):
        rms_norm(x, torch.ones(8), EPS, backend="cudnn")


@pytest.mark.parametrize("device", kernel_devices())
def test_row_wider_than_one_tile_is_refused(device):
    x, w = torch.randn(1, 40000, device=device), torch.ones(40000, device=device)
    with pytest.raises(ValueError, match=r"last dim must be <= 32768.*\(1, 40000\).*backend='torch'"):
        rms_norm(x, w, EPS, backend="triton")


@pytest.mark.parametrize("device", kernel_devices())
def test_frozen_weight_and_residual(device):
    # weight and residual need no gradient (e.g. a frozen norm): no dweight partials, dx only.
    x, w, r, dy, dh = _inputs((3, 37, 100), torch.float32, device, residual=True)
    got = {}
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        y, h = rms_norm(xx, w, EPS, residual=r, backend=backend)
        got[backend] = torch.autograd.grad((y, h), xx, (dy, dh))[0]
    torch.testing.assert_close(got["triton"], got["torch"], rtol=1e-5, atol=1e-5)


def test_cuda_backend_without_extension_says_how_to_build():
    from kernels._cuda import cuda_ops_available
    if cuda_ops_available():
        pytest.skip("the CUDA extension is built here; this checks the error when it is not")
    with pytest.raises(RuntimeError, match="pip install -e"):
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, backend="cuda")
