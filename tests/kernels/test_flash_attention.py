"""Flash attention, Triton backend vs an fp64 reference: forward, backward, masks, GQA, decoding.

Errors are judged by the rule in _tolerance.py (flash-attention's): at most 2x the torch backend's
error at the same precision, max and mean, plus a floor of 8 fp32 ulps of the largest |reference|.
On CPU the kernels run under the Triton interpreter (tests/conftest.py) with 16 x 16 blocks, so the
odd shapes below span several query/key blocks with partial tails; on a GPU (TRITON_INTERPRET unset)
the same cases plus longer sequences run at the real block sizes.
"""
import importlib
import math

import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import flash_attention
from kernels.flash_attention import attention_reference, compile_specs

fa = importlib.import_module("kernels.flash_attention")  # the module (the package exports the function)

DEVICES = kernel_devices()
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _left_padding(b, s_kv, pads):
    """[b, s_kv] key mask, 1 = real key, with pads[i] padding positions on the left of sequence i."""
    mask = torch.ones(b, s_kv, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return mask


def _inputs(b, s_q, s_kv, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype)
               for shape in ((b, s_q, hq, d), (b, s_kv, hkv, d), (b, s_kv, hkv, d)))
    do = torch.randn(b, s_q, hq, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _run(q, k, v, do, causal, mask, backend, scale=None):
    """Output and (dq, dk, dv); backend "fp64" is the reference on fp64 copies of the same inputs,
    "torch" plain PyTorch at the inputs' precision (the baseline of the 2x rule: the torch backend
    itself computes half-precision CPU inputs in fp32, which would not be the same precision)."""
    cast = (lambda t: t.double()) if backend == "fp64" else (lambda t: t)
    leaves = [cast(t.detach()).clone().requires_grad_() for t in (q, k, v)]
    if backend in ("fp64", "torch"):
        out = attention_reference(*leaves, causal=causal, softmax_scale=scale, attention_mask=mask)
    else:
        out = flash_attention(*leaves, causal=causal, softmax_scale=scale, attention_mask=mask, backend=backend)
    grads = torch.autograd.grad(out, leaves, cast(do))
    return (out.detach(),) + tuple(grads)


def _check_against_fp64(q, k, v, do, causal, mask, scale=None):
    names = ("o", "dq", "dk", "dv")
    got = _run(q, k, v, do, causal, mask, "triton", scale)
    base = _run(q, k, v, do, causal, mask, "torch", scale)
    truth = _run(q, k, v, do, causal, mask, "fp64", scale)
    for name, g, t, r in zip(names, got, base, truth):
        assert_within_torch_error(name, g, t, r)
    return got, truth


# (b, s_q, s_kv, hq, hkv, d, causal, dtype, left pads per sequence or None)
CASES = [
    pytest.param(3, 37, 37, 4, 2, 24, True, FP32, None, id="odd-gqa2-d24-causal-fp32"),
    pytest.param(3, 37, 37, 4, 2, 24, False, BF16, None, id="odd-gqa2-d24-full-bf16"),
    pytest.param(2, 32, 32, 4, 2, 32, True, BF16, None, id="round-gqa2-d32-causal-bf16"),
    pytest.param(2, 37, 37, 4, 1, 40, True, FP16, (0, 11), id="mqa-d40-causal-leftpad-fp16"),
    pytest.param(2, 37, 37, 2, 2, 64, True, BF16, (5, 0), id="mha-d64-causal-leftpad-bf16"),
    pytest.param(2, 20, 33, 4, 2, 24, False, FP16, (9, 0), id="cross-d24-full-leftpad-fp16"),
    pytest.param(3, 1, 37, 4, 2, 32, True, BF16, (0, 7, 20), id="decode1-d32-leftpad-bf16"),
    pytest.param(2, 5, 37, 4, 2, 24, True, FP32, (3, 17), id="decode5-d24-leftpad-fp32"),
    pytest.param(2, 40, 21, 4, 2, 24, True, FP32, None, id="sq>skv-d24-causal-emptyrows-fp32"),
    pytest.param(1, 17, 17, 2, 1, 128, True, BF16, (4,), id="d128-causal-leftpad-bf16"),
]
# Real block sizes only on a GPU: several 64/128-row blocks, causal diagonal inside a block.
GPU_CASES = [
    pytest.param(2, 300, 300, 8, 2, 128, True, BF16, (0, 77), id="gpu-s300-d128-bf16"),
    pytest.param(2, 513, 513, 4, 2, 64, True, FP16, (130, 0), id="gpu-s513-d64-fp16"),
    pytest.param(1, 129, 700, 4, 1, 128, True, BF16, (200,), id="gpu-chunked-prefill-d128-bf16"),
    pytest.param(2, 1, 1000, 8, 2, 128, True, BF16, (0, 333), id="gpu-decode-s1000-d128-bf16"),
    pytest.param(2, 200, 200, 4, 2, 256, False, BF16, None, id="gpu-d256-full-bf16"),
    pytest.param(2, 150, 150, 4, 2, 80, True, FP32, (0, 10), id="gpu-d80-fp32"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,s_q,s_kv,hq,hkv,d,causal,dtype,pads", CASES + GPU_CASES)
def test_forward_backward_match_fp64(device, b, s_q, s_kv, hq, hkv, d, causal, dtype, pads):
    if device == "cpu" and max(s_q, s_kv) > 64:
        pytest.skip("long sequence: GPU only (the interpreter is slow)")
    q, k, v, do = _inputs(b, s_q, s_kv, hq, hkv, d, dtype, device)
    mask = _left_padding(b, s_kv, pads).to(device) if pads is not None else None
    _check_against_fp64(q, k, v, do, causal, mask)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_torch_backend_on_cpu_computes_half_inputs_in_fp32(dtype):
    """backend="torch" upcasts bf16/fp16 CPU attention to fp32 (speed on CPU): its output keeps the
    input dtype and is at least as accurate as plain same-precision PyTorch (one final rounding)."""
    q, k, v, do = _inputs(2, 37, 37, 4, 2, 24, dtype, "cpu", seed=3)
    mask = _left_padding(2, 37, (0, 5))
    fast = _run(q, k, v, do, True, mask, "auto")
    plain = _run(q, k, v, do, True, mask, "torch")
    truth = _run(q, k, v, do, True, mask, "fp64")
    errors = []
    for f, p, t in zip(fast, plain, truth):
        assert f.dtype == dtype
        errors.append(((f.double() - t).abs().max().item(), (p.double() - t).abs().max().item()))
        assert errors[-1][0] <= errors[-1][1]
    # dq and dk accumulate many rounded products: computing them in fp32 is clearly more accurate
    # (observed 0.38-0.65 of the same-precision error), which shows the fp32 path really ran
    assert all(fast_err <= 0.9 * plain_err for fast_err, plain_err in errors[1:3]), errors


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale_and_bool_mask(device):
    q, k, v, do = _inputs(2, 19, 19, 4, 2, 24, FP32, device, seed=1)
    mask = _left_padding(2, 19, (0, 6)).bool().to(device)
    _check_against_fp64(q, k, v, do, True, mask, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_output_zero_and_get_zero_grads(device):
    """Left padding + causal: query rows at padded positions see no key; a fully padded sequence
    sees none at all. Their outputs and dq are exactly 0, as are dk/dv of padded keys; every element
    is written (allocations are poisoned with NaN)."""
    b, s, hq, hkv, d = 3, 21, 4, 2, 24
    pads = (0, 7, s)
    q, k, v, do = _inputs(b, s, s, hq, hkv, d, BF16, device, seed=2)
    mask = _left_padding(b, s, pads).to(device)
    with poisoned_allocations() as poisoned:
        o, dq, dk, dv = _run(q, k, v, do, True, mask, "triton")
    assert poisoned.calls >= 5  # out, lse, delta, dq, dk, dv come from torch.empty(_like)
    for name, t in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} elements not written / not finite"
    for i, p in enumerate(pads):
        assert (o[i, :p] == 0).all() and (dq[i, :p] == 0).all(), f"sequence {i}: rows without keys not zero"
        assert (dk[i, :p] == 0).all() and (dv[i, :p] == 0).all(), f"sequence {i}: padded keys got gradients"
        if p < s:
            assert (o[i, p:].abs().sum(-1) > 0).all(), f"sequence {i}: rows with keys output zero"


@pytest.mark.parametrize("device", DEVICES)
def test_every_element_written_with_odd_shapes(device):
    """No mask, no causal: every row sees keys, so the poisoned outputs must be fully overwritten,
    including the tails of partial query/key blocks and the padded head_dim columns (d=40 -> 64)."""
    q, k, v, do = _inputs(3, 23, 29, 6, 3, 40, FP16, device, seed=3)
    with poisoned_allocations() as poisoned:
        got = _run(q, k, v, do, False, None, "triton")
    assert poisoned.calls >= 5
    for name, t in zip(("o", "dq", "dk", "dv"), got):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} elements not written"


@pytest.mark.parametrize("device", DEVICES)
def test_logsumexp(device):
    """The saved statistic is the natural-log logsumexp of the scaled, masked scores (-inf: no key)."""
    b, s_q, s_kv, hq, hkv, d = 2, 18, 24, 4, 2, 24
    q, k, v, _ = _inputs(b, s_q, s_kv, hq, hkv, d, FP32, device, seed=4)
    mask = _left_padding(b, s_kv, (0, 9)).to(device)
    key_mask = mask.ne(0).to(torch.int8)
    scale = 1 / math.sqrt(d)
    _, lse = fa._flash_attn_forward(q, k, v, True, scale, key_mask)
    rep = hq // hkv
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(rep, dim=2)) * scale
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_kv, device=device)[None, :]
    visible = (j <= i + s_kv - s_q)[None, None] & mask.bool()[:, None, None, :]
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.isinf(expected).any(), "the case should contain rows without keys"
    assert (lse.double()[finite] - expected[finite]).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_grad_output(device):
    """Strided q/k/v (a [b, h, s, d] layout seen as [b, s, h, d], a slice of a fused qkv buffer) and an
    expanded (stride-0) output gradient give the same results as contiguous copies, bit for bit."""
    b, s, hq, hkv, d = 2, 19, 4, 2, 24
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, hq, s, d, generator=g).to(device).transpose(1, 2)
    qkv = torch.randn(b, s, hkv, 3, d, generator=g).to(device)  # fused buffer, head_dim stride 1
    k, v = qkv[:, :, :, 1], qkv[:, :, :, 2]
    do = torch.randn(1, s, 1, d, generator=g).to(device).expand(b, s, hq, d)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    strided = _run(q, k, v, do, True, None, "triton")
    dense = _run(q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), True, None, "triton")
    for name, a, c in zip(("o", "dq", "dk", "dv"), strided, dense):
        assert torch.equal(a, c), f"{name}: strided inputs change the result"
    truth = _run(q, k, v, do, True, None, "fp64")
    base = _run(q, k, v, do, True, None, "torch")
    for name, g_, t, r in zip(("o", "dq", "dk", "dv"), strided, base, truth):
        assert_within_torch_error(name, g_, t, r)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_requires_grad(device):
    """Only q needs a gradient (frozen K/V, e.g. a cached prefix), then only k and v."""
    q, k, v, do = _inputs(2, 17, 17, 4, 2, 24, FP32, device, seed=6)
    truth = _run(q, k, v, do, True, None, "fp64")
    qg = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(flash_attention(qg, k, v, backend="triton"), (qg,), do)
    assert (dq.double() - truth[1]).abs().max() < 1e-5
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    dk, dv = torch.autograd.grad(flash_attention(q, kg, vg, backend="triton"), (kg, vg), do)
    assert (dk.double() - truth[2]).abs().max() < 1e-5 and (dv.double() - truth[3]).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_empty_key_sequence(device):
    q = torch.randn(2, 3, 4, 16, device=device, requires_grad=True)
    k = torch.randn(2, 0, 2, 16, device=device, requires_grad=True)
    v = torch.randn(2, 0, 2, 16, device=device, requires_grad=True)
    o = flash_attention(q, k, v, causal=False, backend="triton")
    assert o.shape == q.shape and (o == 0).all()
    (dq,) = torch.autograd.grad(o.sum(), (q,))
    assert (dq == 0).all()


@pytest.mark.parametrize("args, error, words", [
    (dict(q=(2, 8, 4, 16), k=(2, 8, 3, 16), v=(2, 8, 3, 16)), ValueError, ["query heads 4", "(2, 8, 3, 16)"]),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 9, 2, 16)), ValueError, ["k shape", "v shape", "(2, 9, 2, 16)"]),
    (dict(q=(2, 8, 4, 16), k=(3, 8, 2, 16), v=(3, 8, 2, 16)), ValueError, ["q (2, 8, 4, 16)", "k (3, 8, 2, 16)"]),
    (dict(q=(2, 8, 64), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), ValueError, ["q must be", "(2, 8, 64)"]),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16), mask=(2, 7)), ValueError,
     ["attention_mask shape (2, 7)", "(2, 8)"]),
    (dict(q=(1, 4, 2, 320), k=(1, 4, 2, 320), v=(1, 4, 2, 320)), ValueError, ["head_dim <= 256", "(1, 4, 2, 320)"]),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16), v_dtype=torch.float16), TypeError, ["dtypes differ"]),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16), q_dtype=torch.int32), TypeError,
     ["q must be a floating-point", "(2, 8, 4, 16)"]),
])
def test_bad_inputs_raise_with_names_and_shapes(args, error, words):
    if not DEVICES and words[0] == "head_dim <= 256":
        # checked after the backend is resolved, and no device takes the triton backend here
        pytest.skip("the Triton head_dim limit needs CUDA or the interpreter")
    device = DEVICES[0] if DEVICES else "cpu"
    q = torch.zeros(args["q"], device=device).to(args.get("q_dtype", torch.float32))
    k = torch.zeros(args["k"], device=device)
    v = torch.zeros(args["v"], device=device).to(args.get("v_dtype", torch.float32))
    mask = torch.ones(args["mask"], device=device) if "mask" in args else None
    with pytest.raises(error) as info:
        flash_attention(q, k, v, attention_mask=mask, backend="triton")
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_unknown_backend_raises():
    q = torch.zeros(1, 2, 2, 16)
    with pytest.raises(ValueError, match="unknown backend"):
        flash_attention(q, q, q, backend="cudnn")


def test_compile_specs_cover_every_kernel():
    """tests/kernels/test_gpu_compile.py compiles these for sm_80/sm_90; here: one spec per launched
    kernel, every parameter typed, constexprs given, block sizes = what the launchers pick on GPU."""
    module = fa
    kernel_names = {n for n in dir(module) if n.startswith("_flash_attn_") and n.endswith("_kernel")}
    assert kernel_names == {"_flash_attn_fwd_kernel", "_flash_attn_bwd_preprocess_kernel",
                            "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"}
    specs = compile_specs()
    assert {fn.__name__ for fn, *_ in specs} == kernel_names
    assert len({spec[3] for spec in specs}) == len(specs)
    for fn, signature, constexprs, name, options in specs:
        assert list(signature) == list(fn.arg_names), name
        assert set(options) <= {"num_warps", "num_stages"}, name
        assert {k for k, t in signature.items() if t == "constexpr"} == set(constexprs), name
        if "BLOCK_D" in constexprs:  # ChatGLM's head_dim 128 and 64 (fa.COMPILE_HEAD_DIMS), named so
            assert constexprs["BLOCK_D"] == constexprs["HEAD_DIM"] in (128, 64), name
            assert f"_d{constexprs['HEAD_DIM']}" in name, name
        if "EMULATE" in constexprs:
            assert constexprs["EMULATE"] is False and constexprs["CAUSAL"] is True, name
    assert {c["HEAD_DIM"] for _, _, c, _, _ in specs} == {128, 64}
    # packed sequences: every kernel that masks is compiled with and without segments
    for kernel in ("_flash_attn_fwd_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"):
        variants = {c["HAS_SEGMENTS"] for fn, _, c, _, _ in specs if fn.__name__ == kernel}
        assert variants == {False, True}, kernel
    fwd, options = [(c, o) for fn, _, c, _, o in specs if fn.__name__ == "_flash_attn_fwd_kernel"][0]
    blocks = module._FWD_BLOCKS[128]
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"]) == (blocks.block_m, blocks.block_n)
    assert options == {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}


@pytest.mark.skipif("cpu" not in DEVICES, reason="the interpreter runs the GPU code path only on CPU")
@pytest.mark.parametrize("dtype, pads", [(FP16, (0, 9)), (FP32, None)])
def test_gpu_code_path_under_interpreter(monkeypatch, dtype, pads):
    """The interpreter computes fp16 and fp32 dots and fp16 rounding correctly, so with EMULATE off
    the kernels run exactly the code compiled for GPUs (operands in the input dtype, native casts)."""
    monkeypatch.setattr(fa, "_emulate", lambda q: False)
    q, k, v, do = _inputs(2, 21, 26, 4, 2, 40, dtype, "cpu", seed=7)
    mask = _left_padding(2, 26, pads) if pads is not None else None
    _check_against_fp64(q, k, v, do, True, mask)


@pytest.mark.skipif("cuda" not in DEVICES, reason="GPU only: a grid limit of the hardware (axis 1 <= 65535)")
def test_more_than_65535_batch_heads():
    # batch x heads runs on grid axis 0 (up to 2^31 - 1 programs); on axis 1 this launch would fail
    b, s, hq, hkv, d = 2100, 16, 32, 2, 16
    q, k, v, do = _inputs(b, s, s, hq, hkv, d, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    out.backward(do)
    ref = attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
