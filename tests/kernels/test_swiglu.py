"""SwiGLU on a fused [gate | up] input, Triton backend vs an fp64 reference, forward and backward.

Errors are judged by the rule in _tolerance.py: at most 2x the torch backend's error at the same
precision. On CPU the kernels run under the Triton interpreter (tests/conftest.py).
"""
import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import swiglu
from kernels.swiglu import swiglu_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# round; odd (111 rows of ffn 61: masked rows and columns); ffn 1100 > one 1024-column tile
SHAPES = [(4, 16, 2 * 64), (3, 37, 2 * 61), (3, 2 * 1100)]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # gate spans the saturated tails of silu as well as its curved middle
    x = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    dy = torch.randn(shape[:-1] + (shape[-1] // 2,), generator=g).to(device=device, dtype=dtype)
    return x, dy


def _run(x, dy, backend):
    """Forward + backward; returns [y, dx]. fp64: the reference on fp64 copies (swiglu_reference keeps
    its input dtype, so it computes in fp64)."""
    leaf = (x.detach().double() if backend == "fp64" else x.detach()).clone().requires_grad_()
    y = swiglu_reference(leaf) if backend == "fp64" else swiglu(leaf, backend=backend)
    (dx,) = torch.autograd.grad(y, leaf, dy.to(y.dtype))
    return [y.detach(), dx]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_within_2x_torch_error(device, dtype, shape):
    x, dy = _inputs(shape, dtype, device)
    truth, ref, out = _run(x, dy, "fp64"), _run(x, dy, "torch"), _run(x, dy, "triton")
    for name, o, t, tr in zip(("y", "dx"), out, ref, truth):
        assert_within_torch_error(f"swiglu {name} {dtype} {shape}", o, t, tr)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy exp(-g)
@pytest.mark.parametrize("device", kernel_devices())
def test_extreme_gates_stay_finite(device):
    # sigmoid(-g) overflows exp for large |g|: silu must go to 0 (and its gradient too), not NaN.
    gate = torch.tensor([-1e4, -200.0, -90.0, 0.0, 90.0, 200.0, 1e4], device=device)
    x = torch.cat([gate, torch.ones_like(gate)])[None]
    dy = torch.ones(1, gate.numel(), device=device)
    truth, ref, out = _run(x, dy, "fp64"), _run(x, dy, "torch"), _run(x, dy, "triton")
    for name, o, t, tr in zip(("y", "dx"), out, ref, truth):
        assert_within_torch_error(f"swiglu extreme {name}", o, t, tr)


@pytest.mark.parametrize("device", kernel_devices())
def test_every_output_element_is_written(device):
    x, dy = _inputs((3, 2 * 1100), torch.bfloat16, device)
    clean = _run(x, dy, "triton")
    with poisoned_allocations() as counter:
        poisoned = _run(x, dy, "triton")
    assert counter.calls > 0
    for a, b in zip(poisoned, clean):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
def test_non_contiguous_inputs_match_contiguous(device):
    x, dy = _inputs((6, 2 * 20), torch.float32, device)
    wide = torch.cat([x, x], dim=1)[:, :40]  # row stride 80: used as a strided view
    transposed = x.t().contiguous().t()  # column-major: copied by the launcher
    dy_t = dy.t().contiguous().t()
    expected = _run(x, dy, "triton")
    for xs, dys in ((wide, dy), (transposed, dy_t)):
        for a, b in zip(_run(xs, dys, "triton"), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
def test_empty_batch(device):
    x = torch.zeros(0, 3, 8, device=device, requires_grad=True)
    y = swiglu(x, backend="triton")
    assert y.shape == (0, 3, 4)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == (0, 3, 8)


def test_bad_inputs_name_tensor_and_shape():
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*int32.*\(2, 8\)"):
        swiglu(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"last dim must be even.*\(2, 7\)"):
        swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"last dim must be even.*\(\)"):
        swiglu(torch.tensor(1.0))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        swiglu([1.0, 2.0])
