"""Rotary embedding, Triton backend vs an fp64 reference, forward and backward.

Errors are judged by the rule in _tolerance.py: at most 2x the torch backend's error at the same
precision. The fp64 reference computes the angles in fp64 too, so the fp32 angle rounding that both
backends share (position * theta in fp32, ~1e-7 relative) counts as error for both.
"""
import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import apply_rotary

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BASE = 10000.0


def _rotary_fp64(x, positions, rotary_dim, interleaved):
    b, s = x.shape[:2]
    pos = (positions.expand(b, s) if positions.dim() == 1 else positions).double()
    inv_freq = BASE ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    angle = (pos[..., None] * inv_freq)[:, :, None, :]  # [b, s, 1, r/2]
    cos, sin = angle.cos(), angle.sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    else:
        x0, x1 = rot.chunk(2, dim=-1)
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _positions(kind, b, s, device):
    if kind == "offset":  # decoding s new tokens after a 1000-token prefix, all rows aligned
        return torch.arange(1000, 1000 + s, device=device)
    # per-row: left padding (padded slots at position 0) and a different cache offset per row
    g = torch.Generator().manual_seed(3)
    pad = torch.randint(0, s, (b, 1), generator=g)
    offset = torch.randint(0, 5000, (b, 1), generator=g)
    pos = (torch.arange(s)[None, :] - pad).clamp(min=0) + offset * (torch.arange(s)[None, :] >= pad)
    return pos.to(device=device, dtype=torch.int32 if b % 2 else torch.int64)


def _run(x, positions, dy, rotary_dim, interleaved, backend):
    """Forward + backward; returns [y, dx]."""
    leaf = (x.detach().double() if backend == "fp64" else x.detach()).clone().requires_grad_()
    if backend == "fp64":
        y = _rotary_fp64(leaf, positions, rotary_dim, interleaved)
    else:
        y = apply_rotary(leaf, positions, rotary_dim, BASE, interleaved=interleaved, backend=backend)
    (dx,) = torch.autograd.grad(y, leaf, dy.to(y.dtype))
    return [y.detach(), dx]


# odd: 3 x 37 tokens, 5 heads of 24, 6 rotated pairs (a masked 8-lane block), per-row positions;
# round: GLM-like halves of 32-dim heads with aligned positions; full: every channel rotated
CASES = [((3, 37, 5, 24), 12, "per_row"), ((2, 16, 4, 32), 16, "offset"), ((2, 5, 3, 16), 16, "per_row")]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("shape,rotary_dim,pos_kind", CASES, ids=["odd", "round", "full"])
def test_forward_backward_within_2x_torch_error(device, dtype, interleaved, shape, rotary_dim, pos_kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    pos = _positions(pos_kind, shape[0], shape[1], device)
    truth = _run(x, pos, dy, rotary_dim, interleaved, "fp64")
    ref = _run(x, pos, dy, rotary_dim, interleaved, "torch")
    out = _run(x, pos, dy, rotary_dim, interleaved, "triton")
    for name, o, t, tr in zip(("y", "dx"), out, ref, truth):
        assert_within_torch_error(f"rotary {name} {dtype} {shape} r={rotary_dim}", o, t, tr)
    if rotary_dim < shape[-1]:  # pass-through channels are copied bit for bit, values and gradients
        assert torch.equal(out[0][..., rotary_dim:], x[..., rotary_dim:])
        assert torch.equal(out[1][..., rotary_dim:], dy[..., rotary_dim:])


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_qk_view_and_every_element_written(device):
    # GLM rotates q and k inside the fused QKV projection: x is a strided view, not a copy.
    g = torch.Generator().manual_seed(1)
    b, s, hq, hkv, d = 2, 7, 4, 2, 16
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=torch.bfloat16)
    qk = qkv[..., : (hq + hkv) * d].reshape(b, s, hq + hkv, d)
    assert not qk.is_contiguous()
    pos = _positions("per_row", b, s, device)
    dy = torch.randn(b, s, hq + hkv, d, generator=g).to(device=device, dtype=torch.bfloat16)
    expected = _run(qk.contiguous(), pos, dy, 8, True, "triton")
    with poisoned_allocations() as counter:
        got = _run(qk, pos, dy.transpose(1, 2).contiguous().transpose(1, 2), 8, True, "triton")
    assert counter.calls > 0
    for a, e in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
def test_backward_is_inverse_rotation(device):
    # The Jacobian is orthogonal: rotating forward then applying backward to the result returns x.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64).float().to(device).requires_grad_()
    pos = torch.arange(9, device=device) * 37
    y = apply_rotary(x, pos, 8, BASE, backend="triton")
    (back,) = torch.autograd.grad(y, x, y.detach())
    torch.testing.assert_close(back, x.detach(), rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_tensor_and_shape():
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*int64.*\(2, 5, 3, 8\)"):
        apply_rotary(torch.ones(2, 5, 3, 8, dtype=torch.long), pos, 4, BASE)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\].*\(5, 3, 8\)"):
        apply_rotary(torch.randn(5, 3, 8), pos, 4, BASE)
    for bad_dim in (3, 0, 10, -2):
        with pytest.raises(ValueError, match=rf"rotary_dim must be even.*head_dim 8.*\(2, 5, 3, 8\).*got {bad_dim}"):
            apply_rotary(x, pos, bad_dim, BASE)
    with pytest.raises(TypeError, match=r"positions must be an integer tensor.*float32.*\(5,\)"):
        apply_rotary(x, pos.float(), 4, BASE)
    with pytest.raises(TypeError, match=r"positions must be an integer tensor.*bool"):
        apply_rotary(x, pos > 2, 4, BASE)
    with pytest.raises(ValueError, match=r"positions shape \(4,\).*\(2, 5, 3, 8\)"):
        apply_rotary(x, torch.arange(4), 4, BASE)
    with pytest.raises(ValueError, match=r"positions shape \(3, 5\).*\(2, 5, 3, 8\)"):
        apply_rotary(x, torch.zeros(3, 5, dtype=torch.long), 4, BASE)
