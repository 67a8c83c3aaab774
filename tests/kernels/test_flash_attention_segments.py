"""Flash attention over packed sequences (``segment_ids``, document masking): torch and Triton backends.

Query row i sits at key position i + s_kv - s_q and sees key j only if both positions carry the same
segment id (plus the causal and key-padding rules). The fp64 truth here does not use the library's
mask builder: it loops over the documents of each sequence, gathers that document's positions (a
document need not be contiguous: the rule is equality of ids) and runs plain causal/full attention
on them alone, scattering the rows back. Triton errors are judged by the rule in _tolerance.py: at
most 2x the same-precision torch error, max and mean, plus a floor of 8 fp32 ulps of max |truth|.
On CPU the kernels run under the Triton interpreter with 16 x 16 blocks, so the ~37-token shapes
put document boundaries inside and across blocks.
"""
import importlib
import math

import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from test_flash_attention import _inputs
from kernels import flash_attention
from kernels.flash_attention import attention_reference

fa = importlib.import_module("kernels.flash_attention")  # the module (the package exports the function)

DEVICES = kernel_devices()
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _documents(lengths, pad=0) -> torch.Tensor:
    """[s] segment ids 1, 1, 2, 2, 2, ... for documents of the given lengths, then `pad` zeros."""
    ids = [i + 1 for i, n in enumerate(lengths) for _ in range(n)]
    return torch.tensor(ids + [0] * pad, dtype=torch.long)



def _per_document_attention(q, k, v, causal, segment_ids, attention_mask=None, scale=None):
    """Independent reference: attention of each document on its own (positions with equal segment
    id), written with einsum/softmax; rows that see no key output zeros. Differentiable."""
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    offset = s_kv - s_q
    rows = []
    for n in range(b):
        out = q.new_zeros(s_q, hq, d)
        for doc in segment_ids[n].unique().tolist():
            keys = (segment_ids[n] == doc).nonzero().flatten()  # key positions of this document
            queries = keys[keys >= offset] - offset  # query rows whose position is in it
            if queries.numel() == 0:
                continue
            kd = k[n, keys].repeat_interleave(hq // hkv, dim=1)  # [keys, hq, d]
            vd = v[n, keys].repeat_interleave(hq // hkv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[n, queries], kd) * scale
            visible = torch.ones(queries.numel(), keys.numel(), dtype=torch.bool, device=q.device)
            if causal:
                visible &= keys[None, :] <= queries[:, None] + offset
            if attention_mask is not None:
                visible &= attention_mask[n, keys].bool()[None, :]
            p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            p = torch.where(visible.any(-1)[:, None], p, 0.0)  # empty rows: NaN -> 0
            out = out.index_put((queries,), torch.einsum("hqk,khd->qhd", p, vd))
        rows.append(out)
    return torch.stack(rows)


def _run(q, k, v, do, causal, segment_ids, mask, impl, scale=None):
    """Output and (dq, dk, dv). impl "fp64": the per-document reference on fp64 copies; "torch": plain
    PyTorch (attention_reference) at the inputs' precision, the baseline of the 2x rule; else the
    flash_attention backend of that name."""
    cast = (lambda t: t.double()) if impl == "fp64" else (lambda t: t)
    leaves = [cast(t.detach()).clone().requires_grad_() for t in (q, k, v)]
    if impl == "fp64":
        out = _per_document_attention(*leaves, causal, segment_ids, mask, scale)
    elif impl == "torch":
        out = attention_reference(*leaves, causal=causal, softmax_scale=scale, attention_mask=mask,
                                  segment_ids=segment_ids)
    else:
        out = flash_attention(*leaves, causal=causal, softmax_scale=scale, attention_mask=mask,
                              segment_ids=segment_ids, backend=impl)
    grads = torch.autograd.grad(out, leaves, cast(do), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))
    return (out.detach(),) + grads


NAMES = ("o", "dq", "dk", "dv")

# (s_q, s_kv, causal, per-sequence segment ids as document lengths + trailing pad, left key padding)
TORCH_CASES = [
    pytest.param(23, 23, True, [((5, 1, 9, 8), 0), ((23,), 0)], None, id="causal"),
    pytest.param(23, 23, False, [((5, 1, 9, 8), 0), ((1, 1, 1, 20), 0)], None, id="full"),
    pytest.param(23, 23, True, [((7, 10), 6), ((2, 21), 0)], (0, 3), id="causal-pad-segment-and-mask"),
    pytest.param(4, 23, True, [((7, 10), 6), ((20, 3), 0)], None, id="decode4-causal"),
    pytest.param(4, 23, False, [((7, 12), 4), ((20, 2, 1), 0)], (2, 0), id="decode4-full-mask"),
]


@pytest.mark.parametrize("s_q,s_kv,causal,docs,pads", TORCH_CASES)
def test_torch_backend_matches_per_document_attention(s_q, s_kv, causal, docs, pads):
    """backend="torch" (the boolean-mask SDPA path) in fp64 equals attention run per document."""
    b, hq, hkv, d = len(docs), 4, 2, 16
    q, k, v, do = _inputs(b, s_q, s_kv, hq, hkv, d, torch.float64, "cpu", seed=11)
    seg = torch.stack([_documents(lengths, pad) for lengths, pad in docs])
    mask = None
    if pads is not None:
        mask = torch.ones(b, s_kv, dtype=torch.long)
        for i, p in enumerate(pads):
            mask[i, :p] = 0
    got = _run(q, k, v, do, causal, seg, mask, "torch")
    truth = _run(q, k, v, do, causal, seg, mask, "fp64")
    for name, g, t in zip(NAMES, got, truth):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the public function with backend="torch" takes the same path
    o = flash_attention(q, k, v, causal=causal, attention_mask=mask, segment_ids=seg, backend="torch")
    torch.testing.assert_close(o, truth[0], rtol=1e-12, atol=1e-12)


def test_torch_backend_non_contiguous_documents_and_id_dtypes():
    """The rule is equality of ids, not runs: a document may be interrupted (1, 2, 1). Any integer
    dtype gives the same result, and a single segment is plain causal attention."""
    s, hq, hkv, d = 19, 2, 1, 16
    q, k, v, do = _inputs(2, s, s, hq, hkv, d, torch.float64, "cpu", seed=12)
    seg = torch.tensor([[1, 1, 2, 2, 2, 1, 1, 1, 3, 2, 2, 3, 3, 1, 1, 1, 7, 7, 7],
                        [5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4, 3, 2]])
    truth = _run(q, k, v, do, True, seg, None, "fp64")
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        got = _run(q, k, v, do, True, seg.to(dtype), None, "torch")
        for name, g, t in zip(NAMES, got, truth):
            torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12, msg=lambda m: f"{dtype} {name}: {m}")
    one = torch.full((2, s), 3, dtype=torch.int32)
    plain = flash_attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(flash_attention(q, k, v, segment_ids=one, backend="torch"), plain,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_torch_backend_low_precision(dtype):
    """backend="torch" at the training dtypes (CPU computes bf16/fp16 in fp32 and rounds once): close
    to the fp64 per-document truth at that dtype's resolution."""
    q, k, v, do = _inputs(2, 21, 21, 4, 2, 24, dtype, "cpu", seed=13)
    seg = torch.stack([_documents((6, 1, 14)), _documents((10, 3), pad=8)])
    got = _run(q, k, v, do, True, seg, None, "torch")
    truth = _run(q, k, v, do, True, seg, None, "fp64")
    # one rounding of outputs of size ~1-3 (bf16: 8 bits, fp16: 11 bits); fp32: summation-order noise
    tol = {BF16: 2e-2, FP16: 3e-3, FP32: 1e-5}[dtype]
    for name, g, t in zip(NAMES, got, truth):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), t, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if DEVICES else []))
@pytest.mark.parametrize("segment_ids, q_len, error, words", [
    (torch.ones(2, 8), 8, TypeError, ["segment_ids must be an integer", "torch.float32", "(2, 8)"]),
    (torch.ones(2, 8, dtype=torch.bool), 8, TypeError, ["segment_ids must be an integer", "torch.bool"]),
    (torch.ones(2, 7, dtype=torch.long), 8, ValueError, ["segment_ids shape (2, 7)", "(2, 8)"]),
    (torch.ones(8, dtype=torch.long), 8, ValueError, ["segment_ids shape (8,)", "(2, 8)"]),
    ([[1] * 8] * 2, 8, TypeError, ["segment_ids must be a torch.Tensor", "list"]),
    (torch.ones(2, 8, dtype=torch.long), 9, ValueError, ["s_q <= s_kv", "(2, 9, 4, 16)", "(2, 8, 2, 16)"]),
])
def test_bad_segment_ids_raise_with_names_and_shapes(backend, segment_ids, q_len, error, words):
    q = torch.zeros(2, q_len, 4, 16)
    k = v = torch.zeros(2, 8, 2, 16)
    with pytest.raises(error) as info:
        flash_attention(q, k, v, segment_ids=segment_ids, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


# ------------------------------------------------------------------------------------------------
# Triton backend
# ------------------------------------------------------------------------------------------------

def _key_mask(b, s_kv, pads, device):
    """[b, s_kv] key mask, 1 = real key, with pads[i] padding positions on the left of sequence i."""
    mask = torch.ones(b, s_kv, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return mask.to(device)


def _check_against_fp64(q, k, v, do, causal, seg, mask, scale=None):
    got = _run(q, k, v, do, causal, seg, mask, "triton", scale)
    base = _run(q, k, v, do, causal, seg, mask, "torch", scale)
    truth = _run(q, k, v, do, causal, seg, mask, "fp64", scale)
    for name, g, t, r in zip(NAMES, got, base, truth):
        assert_within_torch_error(name, g, t, r)
    return got, truth


# Documents per sequence (lengths, trailing padding-segment length); with 16 x 16 interpreter blocks
# at s_kv = 37 these put boundaries inside blocks, documents across block boundaries (14 + 17 from
# position 6), length-1 documents, block-aligned documents (16, 16, 5) and a padding segment.
DOCS_37 = [((5, 1, 14, 17), 0), ((1, 1, 9, 1, 17, 1), 7), ((16, 16, 5), 0)]

# (b, s_q, s_kv, hq, hkv, d, causal, dtype, docs, left key padding or None)
CASES = [
    pytest.param(3, 37, 37, 10, 2, 24, True, BF16, DOCS_37, None, id="odd-gqa5-d24-causal-bf16"),
    pytest.param(3, 37, 37, 10, 2, 24, False, FP32, DOCS_37, None, id="odd-gqa5-d24-full-fp32"),
    pytest.param(3, 37, 37, 4, 2, 40, True, FP16, DOCS_37, (0, 3, 20), id="d40-causal-leftpad-fp16"),
    pytest.param(2, 37, 37, 4, 1, 24, False, BF16, DOCS_37[1:], (6, 0), id="mqa-full-leftpad-bf16"),
    pytest.param(3, 5, 37, 4, 2, 32, True, BF16, DOCS_37, (0, 2, 0), id="decode5-causal-leftpad-bf16"),
    pytest.param(2, 20, 37, 4, 2, 24, False, FP16, DOCS_37[:2], None, id="cross20-full-fp16"),
    pytest.param(1, 1, 37, 4, 2, 24, True, FP32, DOCS_37[2:], None, id="decode1-causal-fp32"),
]
GPU_CASES = [
    pytest.param(2, 300, 300, 8, 2, 128, True, BF16, [((40, 1, 150, 100), 9), ((300,), 0)], None,
                 id="gpu-s300-d128-bf16"),
    pytest.param(2, 513, 513, 4, 2, 64, True, FP16, [((64,) * 8, 1), ((7, 250, 200), 56)], (0, 30),
                 id="gpu-s513-d64-leftpad-fp16"),
    pytest.param(2, 200, 200, 4, 2, 256, False, BF16, [((64, 63, 73), 0), ((1,) * 50 + (150,), 0)], None,
                 id="gpu-d256-full-bf16"),
    pytest.param(1, 129, 700, 4, 1, 128, True, BF16, [((300, 170, 100), 130)], None, id="gpu-chunked-prefill"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,s_q,s_kv,hq,hkv,d,causal,dtype,docs,pads", CASES + GPU_CASES)
def test_triton_matches_fp64(device, b, s_q, s_kv, hq, hkv, d, causal, dtype, docs, pads):
    if device == "cpu" and max(s_q, s_kv) > 64:
        pytest.skip("long sequence: GPU only (the interpreter is slow)")
    q, k, v, do = _inputs(b, s_q, s_kv, hq, hkv, d, dtype, device)
    seg = torch.stack([_documents(lengths, pad) for lengths, pad in docs]).to(device)
    mask = _key_mask(b, s_kv, pads, device) if pads is not None else None
    _check_against_fp64(q, k, v, do, causal, seg, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_triton_non_contiguous_segments(device, causal):
    """Equality of ids, not runs: interrupted documents, ids in any order, int32 ids."""
    q, k, v, do = _inputs(2, 37, 37, 4, 2, 24, FP32, device, seed=21)
    seg = torch.tensor([[1] * 3 + [2] * 17 + [1] * 2 + [9] * 5 + [2] * 10,
                        [5, 4, 3, 2, 1, 0] * 6 + [5]], dtype=torch.int32, device=device)
    _check_against_fp64(q, k, v, do, causal, seg, None, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_and_every_element_written(device):
    """Segments + key mask: a length-1 document whose key is masked and a fully masked padding
    segment leave rows that see no key: output and dq exactly 0, lse -inf, masked keys get zero dk/dv;
    every other element is written (allocations are poisoned with NaN / int max)."""
    b, s, hq, hkv, d = 2, 37, 4, 2, 24
    q, k, v, do = _inputs(b, s, s, hq, hkv, d, BF16, device, seed=22)
    seg = torch.stack([_documents((4, 1, 20, 2), pad=10), _documents((16, 1, 20))]).to(device)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 4] = False  # the length-1 document
    mask[0, 27:] = False  # the padding segment
    mask[1, :16] = False  # a whole block-aligned document
    mask = mask.to(device)
    with poisoned_allocations() as poisoned:
        o, dq, dk, dv = _run(q, k, v, do, True, seg, mask, "triton")
        _, lse = fa._flash_attn_forward(q, k, v, True, d ** -0.5, mask.to(torch.int8),
                                        segments=fa._segment_spans(seg))
    assert poisoned.calls >= 6  # spans, out, lse, delta, dq, dk, dv come from torch.empty(_like)
    for name, t in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} elements not written / not finite"
    empty = torch.zeros(b, s, dtype=torch.bool)
    empty[0, 4] = empty[0, 27:] = empty[1, :16] = True
    assert torch.equal(torch.isinf(lse), empty[:, None, :].expand(b, hq, s).to(device))
    assert (o[empty] == 0).all() and (dq[empty] == 0).all()
    assert (o[~empty].abs().sum(-1) > 0).all()
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()
    truth = _run(q, k, v, do, True, seg, mask, "fp64")
    base = _run(q, k, v, do, True, seg, mask, "torch")
    for name, g, t, r in zip(NAMES, (o, dq, dk, dv), base, truth):
        assert_within_torch_error(name, g, t, r)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's row max over the poisoned rows
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_skipped(device, causal):
    """Documents aligned to the 16-key blocks: the kernels must not even load the blocks of other
    documents. NaN in the K/V of other documents (forward, dQ) or in the Q/dO of other documents
    (dK/dV) would reach the result through 0 * NaN if their blocks were read (masking happens after
    the dots); with skipping the document's results are finite and equal to a clean run's bit for bit."""
    if device != "cpu":
        pytest.skip("the 16-aligned documents match the interpreter's blocks only")
    s, hq, hkv, d = 48, 4, 2, 16
    q, k, v, do = _inputs(1, s, s, hq, hkv, d, FP32, device, seed=23)
    seg = _documents((16, 16, 16))[None].to(device)
    clean = _run(q, k, v, do, causal, seg, None, "triton")
    doc = slice(16, 32)  # the middle document; causal attention can only skip earlier ones
    others = torch.ones(s, dtype=torch.bool)
    others[doc] = False
    if causal:
        others[32:] = False
    nan = float("nan")
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, others] = nan
    v_bad[:, others] = nan
    o, dq, _, _ = _run(q, k_bad, v_bad, do, causal, seg, None, "triton")
    assert torch.equal(o[:, doc], clean[0][:, doc]), "forward read key blocks of another document"
    assert torch.equal(dq[:, doc], clean[1][:, doc]), "dQ read key blocks of another document"
    # dK/dV of the middle document: the rows of the other documents (for causal, the later one) are poisoned
    rows = torch.ones(s, dtype=torch.bool)
    rows[doc] = False
    if causal:
        rows[:16] = False
    q_bad, do_bad = q.clone(), do.clone()
    q_bad[:, rows] = nan
    do_bad[:, rows] = nan
    _, _, dk, dv = _run(q_bad, k, v, do_bad, causal, seg, None, "triton")
    assert torch.equal(dk[:, doc], clean[2][:, doc]), "dK read query blocks of another document"
    assert torch.equal(dv[:, doc], clean[3][:, doc]), "dV read query blocks of another document"


@pytest.mark.parametrize("device", DEVICES)
def test_one_segment_equals_no_segments(device):
    """A single segment changes nothing: same results as plain causal attention, bit for bit."""
    q, k, v, do = _inputs(2, 37, 37, 4, 2, 24, BF16, device, seed=24)
    seg = torch.full((2, 37), 7, dtype=torch.int16, device=device)
    with_segments = _run(q, k, v, do, True, seg, None, "triton")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=True, backend="triton")
    plain = (out.detach(),) + torch.autograd.grad(out, leaves, do)
    for name, a, c in zip(NAMES, with_segments, plain):
        assert torch.equal(a, c), name


def test_segment_spans():
    """First and last position of each key's segment, for runs, interrupted documents and any dtype."""
    seg = torch.tensor([[1, 1, 2, 2, 2, 1, 1, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]], dtype=torch.int8)
    spans = fa._segment_spans(seg)
    assert spans.dtype == torch.int32 and spans.shape == (2, 2, 10)
    assert spans[0].tolist() == [[0, 0, 2, 2, 2, 0, 0, 7, 8, 8], [0] * 10]
    assert spans[1].tolist() == [[6, 6, 4, 4, 4, 6, 6, 7, 9, 9], [9] * 10]
    big = torch.tensor([[2 ** 40, 2 ** 40 + 1, 2 ** 40]])  # ids that int32 would truncate to equal values
    assert fa._segment_spans(big)[0].tolist() == [[0, 1, 0]]


@pytest.mark.skipif("cpu" not in DEVICES, reason="the interpreter runs the GPU code path only on CPU")
def test_gpu_code_path_under_interpreter(monkeypatch):
    """With EMULATE off the kernels run exactly the code compiled for GPUs (fp16 operands, native casts)."""
    monkeypatch.setattr(fa, "_emulate", lambda q: False)
    q, k, v, do = _inputs(2, 21, 26, 4, 2, 40, FP16, "cpu", seed=25)
    seg = torch.stack([_documents((3, 12, 11)), _documents((20,), pad=6)])
    _check_against_fp64(q, k, v, do, True, seg, _key_mask(2, 26, (0, 9), "cpu"))
