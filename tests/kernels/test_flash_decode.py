"""Flash-decoding (packed grouped-query rows, split-KV) vs an fp64 reference, and its routing.

Errors are judged by the rule in _tolerance.py (flash-attention's): at most 2x the torch backend's
error at the same precision, max and mean, plus a floor of 8 fp32 ulps of the largest |reference|.
On CPU the kernels run under the Triton interpreter with 16-row / 16-key tiles, so the odd shapes
below span several key blocks (and, for group 16 x 3 tokens, several row tiles), and forced split
counts include more splits than key blocks (empty splits) and several combine steps.
"""
import importlib
import math

import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import flash_attention, flash_decode
from kernels.flash_attention import attention_reference
from test_flash_attention import _check_against_fp64, _inputs, _left_padding

fa = importlib.import_module("kernels.flash_attention")  # the modules (the package exports the functions)
fd = importlib.import_module("kernels.flash_decode")

DEVICES = kernel_devices()
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _forward(q, k, v, causal, mask, impl, num_splits=None):
    """impl "fp64": the reference on fp64 copies of the same inputs; "torch": plain PyTorch at the
    inputs' precision (the baseline of the 2x rule); "triton": flash_decode."""
    if impl == "fp64":
        return attention_reference(q.double(), k.double(), v.double(), causal, None, mask)
    if impl == "torch":
        return attention_reference(q, k, v, causal, None, mask)
    return flash_decode(q, k, v, causal=causal, attention_mask=mask, num_splits=num_splits, backend="triton")


def _logsumexp_fp64(q, k, causal, mask):
    """[b, hq, s_q] natural-log logsumexp of the scaled, masked scores (-inf: no visible key)."""
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(hq // hkv, dim=2))
    visible = fa.attention_mask_matrix(b, s_q, s_kv, causal, mask, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.logsumexp(scores / math.sqrt(d), dim=-1)


# (b, s_q, s_kv, hq, hkv, d, causal, dtype, left pads per sequence or None, num_splits or None = auto)
# A pad equal to s_kv is a sequence without any key; with s_q = 3 and causal, a pad of s_kv - 1 leaves
# the first two query rows of that sequence without a visible key. s_kv = 33 with 3 tokens: the last
# row's newest key starts a key block that the first row's causal range ends before. s_kv = 100 in 7
# splits of 16 keys: every split sees keys, and the combine merges them in two steps of 4.
CASES = [
    pytest.param(3, 1, 37, 10, 2, 24, True, BF16, (0, 7, 37), 3, id="g5-decode1-bf16-emptyseq-split3"),
    pytest.param(3, 3, 33, 10, 2, 24, True, FP16, (0, 20, 32), 2, id="g5-decode3-fp16-emptyrows-split2"),
    pytest.param(3, 3, 37, 10, 2, 24, False, FP32, (4, 0, 37), 1, id="g5-decode3-full-fp32-split1"),
    pytest.param(2, 3, 37, 32, 2, 24, True, FP32, (5, 0), 7, id="g16-decode3-fp32-rowtiles-split7"),
    pytest.param(3, 1, 100, 32, 2, 24, False, BF16, None, 7, id="g16-decode1-full-bf16-split7"),
    pytest.param(2, 1, 37, 4, 4, 32, True, BF16, (0, 30), 2, id="g1-mha-decode1-bf16-split2"),
    pytest.param(2, 3, 40, 4, 2, 40, True, FP32, None, 3, id="g2-decode3-d40-fp32-split3"),
    pytest.param(1, 1, 64, 32, 2, 128, True, BF16, (10,), 2, id="chatglm3-heads-d128-bf16-split2"),
    pytest.param(2, 1, 37, 10, 2, 24, False, FP16, None, None, id="g5-decode1-full-fp16-auto"),
]
# Real tiles on a GPU: long caches, heuristic and forced split counts.
GPU_CASES = [
    pytest.param(8, 1, 4096, 32, 2, 128, True, BF16, None, None, id="gpu-chatglm3-decode-auto"),
    pytest.param(3, 1, 1000, 32, 2, 128, True, BF16, (0, 333, 1000), None, id="gpu-leftpad-auto"),
    pytest.param(2, 4, 777, 32, 2, 128, True, FP16, (0, 100), 5, id="gpu-spec4-fp16-split5"),
    pytest.param(2, 2, 513, 8, 2, 64, False, FP32, None, 3, id="gpu-d64-fp32-split3"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,s_q,s_kv,hq,hkv,d,causal,dtype,pads,num_splits", CASES + GPU_CASES)
def test_forward_matches_fp64(device, b, s_q, s_kv, hq, hkv, d, causal, dtype, pads, num_splits):
    if device == "cpu" and s_kv > 128:
        pytest.skip("long cache: GPU only (the interpreter is slow)")
    q, k, v, _ = _inputs(b, s_q, s_kv, hq, hkv, d, dtype, device)
    mask = _left_padding(b, s_kv, pads).to(device) if pads is not None else None
    got = _forward(q, k, v, causal, mask, "triton", num_splits)
    truth = _forward(q, k, v, causal, mask, "fp64")
    assert_within_torch_error("o", got, _forward(q, k, v, causal, mask, "torch"), truth)
    if pads is not None:  # rows that see no key at all output exact zeros
        empty = ~fa.attention_mask_matrix(b, s_q, s_kv, causal, mask, device)[:, 0].any(-1)  # [b, s_q]
        assert (got[empty] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_lse_equals_per_head_kernel_and_every_element_written(device, num_splits):
    """o and lse of the split-KV path against the per-query-head kernel (split_kv=False) and the fp64
    logsumexp; allocations are poisoned with NaN, so an element the kernels never write shows up."""
    b, s_q, s_kv, hq, hkv, d = 3, 3, 37, 10, 2, 24
    q, k, v, _ = _inputs(b, s_q, s_kv, hq, hkv, d, FP32, device, seed=1)
    mask = _left_padding(b, s_kv, (0, 36, s_kv)).to(device)
    key_mask = mask.ne(0).to(torch.int8)
    scale = 1 / math.sqrt(d)
    with poisoned_allocations() as poisoned:
        o, lse = fa._flash_attn_forward(q, k, v, True, scale, key_mask, split_kv=True, num_splits=num_splits)
    assert poisoned.calls >= (2 if num_splits == 1 else 4)  # o, lse (+ the fp32 partials)
    o_ref, lse_ref = fa._flash_attn_forward(q, k, v, True, scale, key_mask, split_kv=False)
    expected = _logsumexp_fp64(q, k, True, mask)
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()
    for name, got in (("per-head kernel", lse_ref), ("split-KV kernel", lse)):
        assert got.dtype == torch.float32 and got.shape == (b, hq, s_q)
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), name
        assert not torch.isnan(got).any(), name
    finite = torch.isfinite(expected)
    assert (lse[finite] - lse_ref[finite]).abs().max() < 1e-5
    assert (lse.double()[finite] - expected[finite]).abs().max() < 1e-5
    assert torch.isfinite(o).all() and o.dtype == q.dtype and o.shape == q.shape
    assert (o - o_ref).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_routes_decoding_and_its_backward_still_matches(device, monkeypatch):
    """Decoding calls (s_q < s_kv, group * s_q <= 64 rows) go to the split-KV forward; prefill and wide
    calls stay on the per-head kernel. The backward of a routed call (the unchanged backward kernels
    on the routed o and lse) matches the fp64 reference by the 2x rule."""
    calls = []
    launch = fd.flash_decode_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(fd, "flash_decode_forward", spy)
    q, k, v, do = _inputs(3, 3, 37, 10, 2, 24, BF16, device, seed=2)  # 15 packed rows per KV head
    mask = _left_padding(3, 37, (0, 36, 37)).to(device)
    _check_against_fp64(q, k, v, do, True, mask)
    assert calls and all(shape == q.shape for shape in calls)

    calls.clear()
    wide = _inputs(1, 5, 37, 32, 2, 24, FP32, device)[:3]  # 80 rows > 64: per-head kernel
    prefill = _inputs(1, 20, 20, 4, 2, 24, FP32, device)[:3]
    for args in (wide, prefill):
        flash_attention(*args, backend="triton")
    assert not calls


@pytest.mark.parametrize("device", DEVICES)
def test_flash_decode_gradients(device):
    """flash_decode goes through flash_attention's autograd Function: gradients flow (2x rule)."""
    q, k, v, do = _inputs(2, 1, 37, 10, 2, 24, FP32, device, seed=3)
    mask = _left_padding(2, 37, (0, 12)).to(device)
    results = {}
    for impl in ("triton", "torch", "fp64"):
        cast = (lambda t: t.double()) if impl == "fp64" else (lambda t: t)
        leaves = [cast(t).clone().requires_grad_() for t in (q, k, v)]
        if impl == "triton":
            out = flash_decode(*leaves, attention_mask=mask, num_splits=3, backend="triton")
        else:
            out = attention_reference(*leaves, causal=True, attention_mask=mask)
        results[impl] = (out.detach(),) + torch.autograd.grad(out, leaves, cast(do))
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert_within_torch_error(name, results["triton"][i], results["torch"][i], results["fp64"][i])


@pytest.mark.parametrize("device", DEVICES)
def test_auto_split_count_on_a_routed_call(device, monkeypatch):
    """With more SMs than (batch x KV head) programs and a cache of several key blocks per split, the
    launcher picks several splits by itself, and the result still matches the reference."""
    chosen = []
    choose = fd.choose_num_splits
    monkeypatch.setattr(fd, "choose_num_splits", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    monkeypatch.setattr(fd, "_num_sms", lambda device: 64)
    # interpreter tiles: 130 keys = 9 blocks of 16, at least 4 blocks per split -> 2 splits
    s_kv = 130 if device == "cpu" else 4096
    q, k, v, _ = _inputs(1, 1, s_kv, 4, 2, 16, BF16, device, seed=4)
    got = flash_attention(q, k, v, backend="triton")
    assert chosen and chosen[0] > 1
    truth = _forward(q, k, v, True, None, "fp64")
    assert_within_torch_error("o", got, _forward(q, k, v, True, None, "torch"), truth)


@pytest.mark.skipif("cpu" not in DEVICES, reason="the interpreter runs the GPU code path only on CPU")
@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_gpu_code_path_under_interpreter(monkeypatch, dtype):
    """With EMULATE off (the interpreter computes fp16/fp32 dots and casts correctly) both kernels run
    exactly the code compiled for GPUs."""
    monkeypatch.setattr(fa, "_emulate", lambda q: False)
    q, k, v, _ = _inputs(2, 3, 37, 10, 2, 24, dtype, "cpu", seed=5)
    mask = _left_padding(2, 37, (0, 9))
    got = _forward(q, k, v, True, mask, "triton", num_splits=3)
    assert_within_torch_error("o", got, _forward(q, k, v, True, mask, "torch"), _forward(q, k, v, True, mask, "fp64"))


def test_choose_num_splits():
    """Split only when (batch x KV head x row tile) programs leave SMs idle and the cache is long."""
    h100 = 132
    assert fd.choose_num_splits(264, 64, h100) == 1  # b=64 x 2 KV heads already fill the GPU
    assert fd.choose_num_splits(16, 3, h100) == 1  # a 192-key cache: not worth a combine
    # ChatGLM3 decoding, b=8 x 2 KV heads, 4096 keys = 64 blocks of 64: 7 splits -> 112 programs
    # (85% of one wave; 8 would be 97%, the rule takes the fewest within 15% of the best)
    assert fd.choose_num_splits(16, 64, h100) == 7
    for programs in (1, 2, 5, 16, 40, 100, 131):
        for kv_blocks in (4, 8, 64, 1024):
            splits = fd.choose_num_splits(programs, kv_blocks, h100)
            assert 1 <= splits <= max(1, min(fd.MAX_SPLITS, kv_blocks // fd._MIN_BLOCKS_PER_SPLIT))


def test_routing_rule():
    assert fd.pays_off(1, 4096, 16) and fd.pays_off(4, 4096, 16) and fd.pays_off(1, 2, 1)
    assert not fd.pays_off(5, 4096, 16)  # 80 packed rows: more than one tile
    assert not fd.pays_off(64, 64, 1) and not fd.pays_off(3, 2, 2)  # prefill, s_q > s_kv


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(num_splits=0), ValueError, ["flash_decode", "num_splits", "0"]),
    (dict(num_splits=fd.MAX_SPLITS + 1), ValueError, ["num_splits", str(fd.MAX_SPLITS)]),
    (dict(num_splits=2.0), TypeError, ["num_splits", "float"]),
    (dict(num_splits=True), TypeError, ["num_splits", "bool"]),
    (dict(k=(2, 9, 3, 16)), ValueError, ["flash_decode:", "query heads 4", "(2, 9, 3, 16)"]),
    (dict(mask=(2, 8)), ValueError, ["flash_decode:", "attention_mask shape (2, 8)", "(2, 9)"]),
])
def test_bad_inputs_raise_with_names_and_shapes(kwargs, error, words):
    device = DEVICES[0] if DEVICES else "cpu"
    q = torch.zeros(2, 1, 4, 16, device=device)
    k = torch.zeros(kwargs.get("k", (2, 9, 2, 16)), device=device)
    mask = torch.ones(kwargs["mask"], device=device) if "mask" in kwargs else None
    with pytest.raises(error) as info:
        flash_decode(q, k, k, attention_mask=mask, num_splits=kwargs.get("num_splits"), backend="triton")
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_torch_backend_is_the_reference():
    q, k, v, _ = _inputs(2, 3, 37, 10, 2, 24, FP32, "cpu", seed=6)
    mask = _left_padding(2, 37, (0, 9))
    got = flash_decode(q, k, v, attention_mask=mask, num_splits=4, backend="torch")
    assert torch.equal(got, attention_reference(q, k, v, True, None, mask))


def test_compile_specs_cover_both_kernels():
    """tests/kernels/test_gpu_compile.py compiles these for sm_80/sm_90; here: both launched kernels,
    every parameter typed, constexprs given, tiles/warps = what the launcher picks for d=128 bf16."""
    kernel_names = {n for n in dir(fd) if n.startswith("_flash_decode_") and n.endswith("_kernel")}
    assert kernel_names == {"_flash_decode_fwd_kernel", "_flash_decode_combine_kernel"}
    specs = fd.compile_specs()
    assert {fn.__name__ for fn, *_ in specs} == kernel_names
    assert len({spec[3] for spec in specs}) == len(specs)
    for fn, signature, constexprs, name, options in specs:
        assert list(signature) == list(fn.arg_names), name
        assert {k for k, t in signature.items() if t == "constexpr"} == set(constexprs), name
        assert constexprs["EMULATE"] is False and constexprs["BLOCK_D"] == 128, name
        if fn.__name__ == "_flash_decode_fwd_kernel":
            blk = fd._decode_blocks(128, constexprs["BLOCK_M"], BF16, on_gpu=True)
            assert (constexprs["BLOCK_M"], constexprs["BLOCK_N"]) == (blk.block_m, blk.block_n), name
            assert options == {"num_warps": blk.num_warps, "num_stages": blk.num_stages}, name
    assert {c["BLOCK_M"] for fn, _, c, *_ in specs if "BLOCK_M" in c} == {16, fd.DECODE_MAX_ROWS}
