"""Kernel benchmarks: per op forward / backward / forward+backward time, peak memory, bytes/s, FLOP/s.

    python -m launch.bench kernels [--op NAME[,NAME]] [--dtype bf16|fp16|fp32] [--small] [--device cpu|cuda]
                                   [--json FILE]
    python -m launch.bench gpu [--budget-s S] [--json FILE] ...   # lent GPU: build, tests, these benchmarks

Ops (the public ``kernels.*`` API): rms_norm (with the fused residual add), rotary (q and k heads in
one call), swiglu, flash_attention (causal GQA), flash_decode (one token over a KV cache, batch 8,
forward only), cross_entropy, token_logprobs, adamw (one optimizer step over one GLM block's parameters). Implementations, side by side in one run:

- ``torch``: our torch reference (``backend="torch"``, what CPU runs by default);
- ``torch.compile``: ``torch.compile`` of that same reference;
- ``triton``: our kernels (``backend="triton"``; CUDA only: on CPU they would run in the interpreter);
- ``cuda``: the csrc kernels (``kernels._cuda_ops``, rms_norm) where the extension is built;
- ``liger`` / ``apex`` / ``transformer_engine`` / ``flash_attn`` / ``torch.optim``: third-party
  equivalents when importable (every import is guarded with ``except Exception``); rms_norm's apex and
  transformer_engine rows go through ``kernels.rms_norm(backend=...)``, i.e. with the same weight and
  the residual add as a separate torch op.

An op or implementation that is missing or raises is skipped with the reason printed.
Default shapes are ChatGLM3-6B (hidden 4096, ffn 13696, 32 heads / 2 KV groups, head dim 128,
vocab 65024, seq 4096, batch 1); ``--small`` shrinks them so the run finishes quickly on CPU.
The same run measures the device's copy bandwidth (large tensor copy, bytes read + written) and
matmul rate (bf16 on GPU, fp32 on CPU) and prints each kernel's fraction of them. The byte counts
are the minimum traffic of the op (inputs read once, outputs written once), so "fraction of copy
bandwidth" is how close the op is to its memory roofline. Timing: median; on CUDA our own CUDA-event
loop with the L2 flushed before every timed call (``_cuda_median_ms``), on CPU ``time.perf_counter``.

``python -m launch.bench gpu`` (launch/bench_gpu.py) builds the CUDA extension if needed, runs
``pytest tests/kernels`` with the Triton interpreter off on the GPU, then these benchmarks, within a
time budget, and writes everything to one JSON file.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ["rms_norm", "rotary", "swiglu", "flash_attention", "flash_decode", "cross_entropy", "token_logprobs",
       "adamw"]


@dataclass(frozen=True)
class Shapes:
    batch: int
    seq: int
    hidden: int
    ffn: int
    heads: int
    kv_groups: int
    head_dim: int
    vocab: int
    eps: float = 1e-5
    rope_base: float = 10000.0


CHATGLM3_6B = Shapes(batch=1, seq=4096, hidden=4096, ffn=13696, heads=32, kv_groups=2, head_dim=128, vocab=65024)
SMALL = Shapes(batch=1, seq=256, hidden=256, ffn=688, heads=8, kv_groups=2, head_dim=32, vocab=4096)


@dataclass
class OpCase:
    """One op at one shape: zero-argument implementations over shared inputs, and its traffic/work."""
    name: str
    shape: str
    diff_inputs: list  # tensors gradients are taken for (empty: no backward, e.g. an optimizer step)
    impls: dict = field(default_factory=dict)  # impl name -> () -> output tensor or tuple of tensors
    skipped: dict = field(default_factory=dict)  # impl name -> reason
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0


# ------------------------------------------------------------------------------------------------
# Optional third-party implementations (every import guarded: broken installs raise all sorts)
# ------------------------------------------------------------------------------------------------

def _optional(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except Exception:
        return None


def _add_optional(case: OpCase, name: str, build: Callable[[], Callable]) -> None:
    """build() returns the implementation, or raises (missing package, no GPU, API changed)."""
    try:
        case.impls[name] = build()
    except Exception as e:  # an optional baseline must never break the benchmark
        case.skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _needs_cuda(device) -> None:
    if device.type != "cuda":
        raise RuntimeError("needs a CUDA device")


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------

def case_rms_norm(sh: Shapes, device, dtype) -> OpCase:
    t, h = sh.batch * sh.seq, sh.hidden
    x = torch.randn(sh.batch, sh.seq, h, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(sh.batch, sh.seq, h, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
    es = x.element_size()
    # fwd: read x, residual, write y, h; bwd: read dy, dh, h, write dx (= dresidual); w is negligible
    case = OpCase("rms_norm", f"x,residual [{sh.batch},{sh.seq},{h}] {str(dtype)[6:]}", [x, r, w],
                  bytes_fwd=4 * t * h * es, bytes_bwd=4 * t * h * es, flops_fwd=5 * t * h, flops_bwd=9 * t * h)
    case.impls["torch"] = lambda: kernels.rms_norm(x, w, sh.eps, residual=r, backend="torch")
    case.impls["triton"] = lambda: kernels.rms_norm(x, w, sh.eps, residual=r, backend="triton")
    ref = _compiled(lambda x, w, r: kernels.rms_norm(x, w, sh.eps, residual=r, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(x, w, r)

    def unfused(norm):  # third-party norms have no fused residual add: add, then normalise
        return lambda: norm(x + r)

    def liger():
        from liger_kernel.transformers import LigerRMSNorm
        _needs_cuda(device)
        m = LigerRMSNorm(h, eps=sh.eps).to(device=device, dtype=dtype)
        return unfused(m)

    def backend(name):  # kernels.rms_norm's own routes to csrc / apex / TE: same inputs, same weight
        def build():
            _needs_cuda(device)
            impl = lambda: kernels.rms_norm(x, w, sh.eps, residual=r, backend=name)  # noqa: E731
            impl()  # a missing extension or package raises here, so the row says why it is skipped
            return impl
        return build

    for name, build in (("cuda", backend("cuda")), ("liger", liger), ("apex", backend("apex")),
                        ("transformer_engine", backend("transformer_engine"))):
        _add_optional(case, name, build)
    return case


def case_rotary(sh: Shapes, device, dtype) -> OpCase:
    heads = sh.heads + sh.kv_groups  # GLM rotates q and k heads in one call
    rot = sh.head_dim // 2
    x = torch.randn(sh.batch, sh.seq, heads, sh.head_dim, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(sh.seq, device=device)
    n = x.numel()
    case = OpCase("rotary", f"q+k [{sh.batch},{sh.seq},{heads},{sh.head_dim}] rotary_dim {rot} interleaved "
                  f"{str(dtype)[6:]}", [x], bytes_fwd=2 * n * x.element_size(), bytes_bwd=2 * n * x.element_size(),
                  flops_fwd=3 * n * rot / sh.head_dim, flops_bwd=3 * n * rot / sh.head_dim)
    case.impls["torch"] = lambda: kernels.apply_rotary(x, pos, rot, sh.rope_base, backend="torch")
    case.impls["triton"] = lambda: kernels.apply_rotary(x, pos, rot, sh.rope_base, backend="triton")
    ref = _compiled(lambda x, pos: kernels.apply_rotary(x, pos, rot, sh.rope_base, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(x, pos)
    case.skipped["liger"] = "Liger's RoPE rotates whole heads in halves; GLM's partial interleaved rotary differs"
    return case


def case_swiglu(sh: Shapes, device, dtype) -> OpCase:
    t, f = sh.batch * sh.seq, sh.ffn
    x = torch.randn(sh.batch, sh.seq, 2 * f, device=device, dtype=dtype, requires_grad=True)
    es = x.element_size()
    # fwd: read gate, up, write y; bwd: read gate, up, dy, write dgate, dup
    case = OpCase("swiglu", f"x [{sh.batch},{sh.seq},{2 * f}] {str(dtype)[6:]}", [x],
                  bytes_fwd=3 * t * f * es, bytes_bwd=5 * t * f * es, flops_fwd=5 * t * f, flops_bwd=10 * t * f)
    case.impls["torch"] = lambda: kernels.swiglu(x, backend="torch")
    case.impls["triton"] = lambda: kernels.swiglu(x, backend="triton")
    ref = _compiled(lambda x: kernels.swiglu(x, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(x)

    def liger():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        _needs_cuda(device)
        return lambda: LigerSiLUMulFunction.apply(*x.chunk(2, dim=-1))

    _add_optional(case, "liger", liger)
    return case


def case_flash_attention(sh: Shapes, device, dtype) -> OpCase:
    b, s, hq, hkv, d = sh.batch, sh.seq, sh.heads, sh.kv_groups, sh.head_dim
    q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    es = q.element_size()
    qo, kv = b * s * hq * d * es, b * s * hkv * d * es
    causal_flops = 4 * b * hq * s * s * d / 2  # QK^T and PV, half the scores visible
    case = OpCase("flash_attention", f"q [{b},{s},{hq},{d}] k,v [{b},{s},{hkv},{d}] causal {str(dtype)[6:]}",
                  [q, k, v], bytes_fwd=2 * qo + 2 * kv, bytes_bwd=4 * qo + 4 * kv,
                  flops_fwd=causal_flops, flops_bwd=2.5 * causal_flops)  # bwd: 5 matmuls vs 2
    case.impls["torch"] = lambda: kernels.flash_attention(q, k, v, causal=True, backend="torch")
    case.impls["triton"] = lambda: kernels.flash_attention(q, k, v, causal=True, backend="triton")
    ref = _compiled(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(q, k, v)

    def flash_attn():
        from flash_attn import flash_attn_func
        _needs_cuda(device)
        return lambda: flash_attn_func(q, k, v, causal=True)

    _add_optional(case, "flash_attn", flash_attn)
    return case


# Decoding batch for the flash_decode case: a serving-size batch whose b x hkv = 16 programs leave most
# of an H100's 132 SMs idle without split-KV.
_DECODE_BATCH = 8


def case_flash_decode(sh: Shapes, device, dtype) -> OpCase:
    """One new token per sequence over a full KV cache (s_kv = sh.seq), forward only: the packed
    split-KV kernel vs the per-query-head flash-attention kernel (which reads each KV head once per
    query head) and torch (SDPA, the reference)."""
    b, s_kv, hq, hkv, d = _DECODE_BATCH, sh.seq, sh.heads, sh.kv_groups, sh.head_dim
    q = torch.randn(b, 1, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, s_kv, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, s_kv, hkv, d, device=device, dtype=dtype)
    es = q.element_size()
    # the KV cache read once, q read and o written once
    case = OpCase("flash_decode", f"q [{b},1,{hq},{d}] k,v cache [{b},{s_kv},{hkv},{d}] {str(dtype)[6:]}", [],
                  bytes_fwd=2 * b * s_kv * hkv * d * es + 2 * b * hq * d * es, flops_fwd=4 * b * hq * s_kv * d)
    case.impls["torch"] = lambda: kernels.flash_decode(q, k, v, backend="torch")
    case.impls["triton"] = lambda: kernels.flash_decode(q, k, v, backend="triton")

    def per_head():  # flash_attention's own forward kernel, routing switched off
        from kernels.flash_attention import _flash_attn_forward
        _needs_cuda(device)
        return lambda: _flash_attn_forward(q, k, v, True, d ** -0.5, None, split_kv=False)[0]

    def flash_attn():
        from flash_attn import flash_attn_func
        _needs_cuda(device)
        return lambda: flash_attn_func(q, k, v, causal=True)

    _add_optional(case, "triton per-head", per_head)
    _add_optional(case, "flash_attn", flash_attn)
    return case


def _logits_case(name: str, sh: Shapes, device, dtype) -> tuple[OpCase, torch.Tensor, torch.Tensor]:
    t, vocab = sh.batch * sh.seq, sh.vocab
    logits = torch.randn(t, vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (t,), device=device)
    es = logits.element_size()
    case = OpCase(name, f"logits [{t},{vocab}] {str(dtype)[6:]}", [logits], bytes_fwd=t * vocab * es,
                  bytes_bwd=2 * t * vocab * es, flops_fwd=4 * t * vocab, flops_bwd=4 * t * vocab)
    return case, logits, labels


def case_cross_entropy(sh: Shapes, device, dtype) -> OpCase:
    case, logits, labels = _logits_case("cross_entropy", sh, device, dtype)
    case.impls["torch"] = lambda: kernels.cross_entropy(logits, labels, backend="torch")
    case.impls["triton"] = lambda: kernels.cross_entropy(logits, labels, backend="triton")
    ref = _compiled(lambda lg, lb: kernels.cross_entropy(lg, lb, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(logits, labels)

    def liger():
        from liger_kernel.transformers import LigerCrossEntropyLoss
        _needs_cuda(device)
        loss = LigerCrossEntropyLoss()
        return lambda: loss(logits, labels)

    _add_optional(case, "liger", liger)
    return case


def case_token_logprobs(sh: Shapes, device, dtype) -> OpCase:
    case, logits, labels = _logits_case("token_logprobs", sh, device, dtype)
    case.impls["torch"] = lambda: kernels.token_logprobs(logits, labels, backend="torch")
    case.impls["triton"] = lambda: kernels.token_logprobs(logits, labels, backend="triton")
    ref = _compiled(lambda lg, lb: kernels.token_logprobs(lg, lb, backend="torch"))
    case.impls["torch.compile"] = lambda: ref(logits, labels)
    return case


def case_adamw(sh: Shapes, device, dtype) -> OpCase:
    # One GLM block's matrices (fp32 master weights, as the distributed optimizer keeps them).
    qkv = (sh.heads + 2 * sh.kv_groups) * sh.head_dim
    shapes = [(qkv, sh.hidden), (qkv,), (sh.hidden, sh.heads * sh.head_dim), (2 * sh.ffn, sh.hidden),
              (sh.hidden, sh.ffn), (sh.hidden,), (sh.hidden,)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    m = [torch.zeros(s, device=device) for s in shapes]
    v = [torch.zeros(s, device=device) for s in shapes]
    n = sum(p.numel() for p in params)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)
    # read p, g, m, v; write p, m, v (fp32)
    case = OpCase("adamw", f"{len(shapes)} tensors, {n / 1e6:.1f}M fp32 params (one GLM block)", [],
                  bytes_fwd=7 * 4 * n, flops_fwd=16 * n)
    try:
        from kernels.adamw import fused_adamw_step
        case.impls["torch"] = lambda: fused_adamw_step(params, grads, m, v, None, backend="torch", **hyper)
        case.impls["triton"] = lambda: fused_adamw_step(params, grads, m, v, None, backend="triton", **hyper)
    except Exception as e:
        from engine.optim import adamw_step_torch
        case.impls["torch"] = lambda: adamw_step_torch(params, grads, m, v, **hyper)
        case.skipped["triton"] = f"kernels.adamw.fused_adamw_step not importable ({type(e).__name__})"

    def optim(fused: bool):
        def build():
            if fused:
                _needs_cuda(device)
            ps = [p.clone() for p in params]
            for p, g in zip(ps, grads):
                p.grad = g
            opt = torch.optim.AdamW(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                                    weight_decay=hyper["weight_decay"], foreach=not fused, fused=fused or None)
            return opt.step
        return build

    def apex():
        from apex.optimizers import FusedAdam
        _needs_cuda(device)
        ps = [p.clone() for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        return FusedAdam(ps, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                         weight_decay=hyper["weight_decay"], adam_w_mode=True).step

    _add_optional(case, "torch.optim foreach", optim(False))
    _add_optional(case, "torch.optim fused", optim(True))
    _add_optional(case, "apex", apex)
    case.skipped["torch.compile"] = "a per-tensor loop; torch.optim foreach/fused are the compiled-style baselines"
    return case


CASES = {"rms_norm": case_rms_norm, "rotary": case_rotary, "swiglu": case_swiglu,
         "flash_attention": case_flash_attention, "flash_decode": case_flash_decode,
         "cross_entropy": case_cross_entropy,
         "token_logprobs": case_token_logprobs, "adamw": case_adamw}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# CUDA timing is our own (events), not triton.testing.do_bench, so the numbers mean the same on
# every Triton version (do_bench's arguments and cache handling have changed between releases).
# L2 is flushed before every timed call: H100/H200 have 50-60 MB of L2, which holds whole inputs at
# --small shapes, and repeated calls over one buffer would time the cache instead of memory.
_L2_FLUSH_BYTES = 256 * 2 ** 20
_CUDA_WARMUP_MS = 25.0  # warm-up calls add up to about this much GPU time (at least 2 calls)
_CUDA_TIMED_MS = 100.0  # timed calls add up to about this much GPU time ...
_CUDA_CALLS = (10, 1000)  # ... within this many calls


def _cuda_median_ms(fn: Callable, device) -> float:
    fn()  # first call outside all timing: Triton / inductor compilation, allocator growth
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    per_call = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(2, int(_CUDA_WARMUP_MS / per_call))):
        fn()
    n = min(_CUDA_CALLS[1], max(_CUDA_CALLS[0], int(_CUDA_TIMED_MS / per_call)))
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()  # before the start event: the flush itself is not timed
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))


def median_ms(fn: Callable, device, repeats: int) -> float:
    """Median time of fn() in ms, after warm-up: CUDA events on GPU (``repeats`` unused there: the
    call count follows from the op's duration), ``time.perf_counter`` over ``repeats`` calls on CPU."""
    if device.type == "cuda":
        return _cuda_median_ms(fn, device)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _outputs(out) -> list:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def measure(case: OpCase, impl: Callable, device, repeats: int) -> dict:
    """fwd / bwd / fwd+bwd median ms and peak memory of one implementation."""
    res = {}
    res["fwd_ms"] = median_ms(impl, device, repeats)  # with autograd recording, as in training
    if case.diff_inputs:
        outs = _outputs(impl())
        grads = [torch.randn_like(o) for o in outs]

        def bwd():
            torch.autograd.grad(outs, case.diff_inputs, grads, retain_graph=True, allow_unused=True)

        def full():
            o = _outputs(impl())
            torch.autograd.grad(o, case.diff_inputs, grads, allow_unused=True)

        res["bwd_ms"] = median_ms(bwd, device, repeats)
        del outs
        res["full_ms"] = median_ms(full, device, repeats)
    else:
        full = impl
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        full()
        _sync(device)
        res["peak_mem_MiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    else:
        res["peak_mem_MiB"] = None  # no allocator statistics on CPU
    return res


def device_rates(device, small: bool, repeats: int) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense matmul FLOP/s of this device."""
    if device.type == "cuda":
        n_copy, n_mm, mm_dtype = (2 ** 28 if not small else 2 ** 26), (8192 if not small else 4096), torch.bfloat16
    else:
        # 64 MiB: well past the last-level cache, so this is DRAM bandwidth even with --small
        n_copy, n_mm, mm_dtype = 2 ** 24, (1024 if not small else 512), torch.float32
    src = torch.empty(n_copy, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, repeats)
    a = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    mm_ms = median_ms(lambda: a @ b, device, repeats)
    return {"copy_bytes": 2 * src.numel() * 4, "copy_GBps": 2 * src.numel() * 4 / copy_ms / 1e6,
            "matmul": f"{n_mm}^3 {str(mm_dtype)[6:]}", "matmul_TFLOPs": 2 * n_mm ** 3 / mm_ms / 1e9}


def run_case(case: OpCase, device, repeats: int, rates: dict, only: Callable[[str], bool] | None = None,
             budget_skip: Callable[[str], str | None] | None = None) -> list[dict]:
    """Rows of one op. ``only(impl_name)``: whether to report that implementation (None: all);
    ``budget_skip(impl_name)``: called just before timing it, returns a reason to skip it or None."""
    rows = []
    for name, impl in case.impls.items():
        if only is not None and not only(name):
            continue
        row = {"op": case.name, "impl": name, "shape": case.shape}
        reason = budget_skip(name) if budget_skip is not None else None
        if reason:
            row["skipped"] = reason
        elif name == "triton" and device.type != "cuda":
            row["skipped"] = "Triton timings need a GPU (on CPU the kernels only run in the interpreter)"
        else:
            try:
                row.update(measure(case, impl, device, repeats))
            except Exception as e:  # not implemented yet, unsupported dtype, out of memory, ...
                row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if "fwd_ms" in row:
            row["fwd_GBps"] = case.bytes_fwd / row["fwd_ms"] / 1e6
            row["fwd_GFLOPs"] = case.flops_fwd / row["fwd_ms"] / 1e6
            if "full_ms" in row:
                row["full_GBps"] = (case.bytes_fwd + case.bytes_bwd) / row["full_ms"] / 1e6
                row["full_GFLOPs"] = (case.flops_fwd + case.flops_bwd) / row["full_ms"] / 1e6
            row["frac_copy_bw"] = row.get("full_GBps", row["fwd_GBps"]) / rates["copy_GBps"]
            row["frac_matmul"] = row.get("full_GFLOPs", row["fwd_GFLOPs"]) / (rates["matmul_TFLOPs"] * 1e3)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, reason in case.skipped.items():
        if only is None or only(name):
            rows.append({"op": case.name, "impl": name, "shape": case.shape, "skipped": reason})
    return rows


def _fmt(v, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)


def print_rows(rows: list[dict]) -> None:
    head = f"{'op':16s} {'impl':20s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} {'peak MiB':>9s} " \
           f"{'f+b GB/s':>9s} {'%copy':>6s} {'f+b GFLOP/s':>11s} {'%mm':>6s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['op']:16s} {r['impl']:20s} skipped: {r['skipped']}")
            continue
        gbps = r.get("full_GBps", r.get("fwd_GBps"))
        gflops = r.get("full_GFLOPs", r.get("fwd_GFLOPs"))
        print(f"{r['op']:16s} {r['impl']:20s} {_fmt(r.get('fwd_ms'), '9.3f')} {_fmt(r.get('bwd_ms'), '9.3f')} "
              f"{_fmt(r.get('full_ms'), '9.3f')} {_fmt(r.get('peak_mem_MiB'), '9.1f')} {_fmt(gbps, '9.2f')} "
              f"{_fmt(100 * r['frac_copy_bw'], '5.1f')}% {_fmt(gflops, '11.2f')} {_fmt(100 * r['frac_matmul'], '5.2f')}%")


# ------------------------------------------------------------------------------------------------
# Entry point (the GPU validation run, ``python -m launch.bench gpu``, is launch/bench_gpu.py)
# ------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``launch.bench kernels`` and ``launch.bench gpu``."""
    p.add_argument("--op", default="all", help=f"comma-separated subset of {OPS}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--small", action="store_true", help="small shapes that finish quickly on CPU")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions on CPU (default 5, --small 10)")


def parse_selection(p: argparse.ArgumentParser, args) -> tuple[list[str], torch.device, torch.dtype, Shapes, int]:
    """(ops, device, dtype, shapes, CPU repeats) from the shared options; unknown ops are a usage error."""
    ops = OPS if args.op == "all" else [o.strip() for o in args.op.split(",")]
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {OPS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return (ops, device, DTYPES[args.dtype], SMALL if args.small else CHATGLM3_6B,
            args.repeats or (10 if args.small else 5))


def describe_run(device, args, shapes: Shapes, command: str) -> dict:
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "device_type": device.type, "torch": torch.__version__, "dtype": args.dtype,
              "shapes": "small" if args.small else "chatglm3-6b", "shape_params": shapes.__dict__,
              "cpu_threads": torch.get_num_threads(), "command": command}
    try:
        import triton
        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    return report


def run_op(op: str, shapes: Shapes, device, dtype, repeats: int, rates: dict, only=None,
           budget_skip=None) -> list[dict]:
    """Build one op's case and time it (``run_case``); a case that cannot be built is one skipped row."""
    try:
        case = CASES[op](shapes, device, dtype)
    except Exception as e:  # e.g. out of memory at full size on a small machine
        return [{"op": op, "impl": "*", "skipped": f"{type(e).__name__}: {str(e)[:300]}"}]
    print(f"[{op}] {case.shape}", flush=True)
    rows = run_case(case, device, repeats, rates, only=only, budget_skip=budget_skip)
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    ops, device, dtype, shapes, repeats = parse_selection(p, args)
    torch.manual_seed(0)
    report = describe_run(device, args, shapes, "python -m launch.bench kernels " + " ".join(argv or []))

    print(f"device {report['device']} ({device.type}), torch {torch.__version__}, triton {report['triton']}, "
          f"dtype {args.dtype}, shapes {report['shapes']}")
    if device.type != "cuda":
        print("CPU run: torch and torch.compile timings only; Triton timings need a GPU.")
    rates = device_rates(device, args.small, repeats)
    report["device_rates"] = rates
    print(f"copy bandwidth {rates['copy_GBps']:.1f} GB/s (read+write), matmul {rates['matmul']}: "
          f"{rates['matmul_TFLOPs'] * 1e3:.1f} GFLOP/s")
    rows = []
    for op in ops:
        rows.extend(run_op(op, shapes, device, dtype, repeats, rates))
    print()
    print_rows(rows)
    report["results"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
