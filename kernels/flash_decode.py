"""Flash-decoding: grouped-query attention forward for a few query tokens over a long KV cache.

    o = softmax(q k^T * scale + mask) v

Same op, shapes, masks and return contract as ``flash_attention`` (q ``[b, s_q, hq, d]``, k/v
``[b, s_kv, hkv, d]``, bottom-right causal mask, ``[b, s_kv]`` key mask, rows that see no key output
zeros with lse = -inf), specialised for decoding, which is bound by reading the KV cache.

The flash_attention forward runs one program per (query block, batch, query head): each of the
``group = hq // hkv`` query heads that share a KV head re-reads that head's whole cache (16x for
ChatGLM3-6B), a single query token fills one row of a 16-row tile, and small batches leave most SMs
idle. Here one program owns one (batch, KV head, KV split) and packs the ``group * s_q`` query rows
that read that KV head into its M tile, row ``r = i * group + g`` (query position i, head g of the
group), so every K/V block of its split is loaded once for all of them.

Split-KV: the keys are cut into ``num_splits`` BLOCK_N-aligned chunks C_s so that b * hkv * num_splits
programs fill the GPU. Split s runs flash_attention's online softmax (base 2, same masking) over its
chunk and writes, per row, the normalised partial output and logsumexp (fp32)::

    lse_s = log sum_{j in C_s} exp(s_ij)          (-inf: the split saw no key of this row)
    o_s   = sum_{j in C_s} exp(s_ij - lse_s) v_j  (0 then)

and a combine kernel merges them (a split with lse_s = -inf has weight 0; a row with no key anywhere
gets o = 0, lse = -inf)::

    lse = log sum_s exp(lse_s),    o = sum_s exp(lse_s - lse) o_s

With one split the first kernel writes o and lse itself. The arithmetic (dot operands in the input
dtype, fp32 accumulation and softmax, the interpreter's EMULATE mode) is flash_attention's, whose
device helpers these kernels call.
"""
from __future__ import annotations

import functools
import math

import torch

from .flash_attention import (_LOG2E, _attention, _batch_head, _block_d, _Blocks, _causal_kv_range, _dtype_name,
                              _fwd_attend, _jit, _MAX_HEAD_DIM, _operand, _softmax_denominator, _to_store, tl, triton)

# Packed rows up to one tile: the routing rule below keeps decoding calls within it, so each K/V block
# is read once per split (more rows are tiled along a third grid axis, each tile re-reading K/V).
DECODE_MAX_ROWS = 64

# GPU tiles, BLOCK_D -> (block_m = most packed rows per program, BLOCK_N keys per step, warps for a
# 64-row tile, stages); BLOCK_M is the packed row count rounded up to a power of two in [16, block_m],
# with 4 warps below 64 rows (_decode_blocks). Compile-time choices, NOT timed on hardware (no GPU in
# CI): the K/V loads are the whole cost, so 64-key steps with 3 stages keep two K/V blocks in flight
# per program (70 KiB of shared memory at d=128, 16 rows: 3 programs fit an H100 SM, 2 an A100 SM).
# ptxas -v (triton 3.9's, sm_90a, 16-byte aligned pointers and strides as at launch), d=128 bf16:
# 16 rows 128 registers, 32 rows 168, 64 rows (8 warps) 159, combine 47; no spills (sm_80 alike).
# The same holds at d=64 and d=256; fp32 gets its own tiles in _decode_blocks.
_DECODE_BLOCKS = {
    16: _Blocks(64, 64, 8, 3), 32: _Blocks(64, 64, 8, 3), 64: _Blocks(64, 64, 8, 3),
    128: _Blocks(64, 64, 8, 3), 256: _Blocks(64, 32, 8, 3),
}
# Interpreter (CPU tests): the smallest tl.dot tile, so short caches span several key blocks and
# group 16 x 3 tokens spans several row tiles.
_INTERPRETER_DECODE_BLOCKS = _Blocks(16, 16, 4, 1)

# Split-KV limits: a split reads at least _MIN_BLOCKS_PER_SPLIT key blocks (256 keys at d=128), so the
# fp32 partial output it writes (rows x d x 4 bytes, 8 KiB for 16 rows) stays small next to the K/V it
# reads (128 KiB); MAX_SPLITS bounds the workspace and the combine's loop.
_MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 128
# Splits merged per step of the combine kernel: one [BLOCK_S, BLOCK_D] fp32 tile of partial outputs
# (16 x 128 x 4 B = 32 registers per thread at 4 warps). The interpreter uses 4 so that tests with a
# handful of splits run the multi-step merge.
_COMBINE_BLOCK_S = 16
_INTERPRETER_COMBINE_BLOCK_S = 4
_COMBINE_WARPS = 4
# FA2's split heuristic: the fewest splits whose wave efficiency is within 15% of the best.
_WAVE_EFFICIENCY_SLACK = 0.85


def pays_off(s_q: int, s_kv: int, group: int) -> bool:
    """Whether flash_attention's forward should use this kernel instead of its per-query-head one.

    s_q < s_kv: decoding over a cache (prefill, s_q == s_kv, has 128-row causal tiles per head and
    plenty of programs: the per-head kernel is compute-bound there and stays). s_q * group <= 64: the
    packed rows fit one tile of this kernel, so it reads the KV cache once per split where the
    per-head kernel reads it ``group`` times, and it does no more tensor-core work: the per-head
    kernel pads each head's s_q rows to a 16-row tile anyway. For ChatGLM3 (group 16) that is up to 4
    tokens per step (speculative decoding); with group 1 (MHA) there is no KV reuse, but split-KV
    still fills the GPU at small batch."""
    return s_q < s_kv and s_q * group <= DECODE_MAX_ROWS


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@_jit
def _packed_rows(offs_r, off_hk, group_size, seq_q):
    """Packed row r = i * group + g of KV head off_hk -> (row_ok, query position i, query head)."""
    row_ok = offs_r < seq_q * group_size
    return row_ok, offs_r // group_size, off_hk * group_size + offs_r % group_size


@_jit
def _flash_decode_fwd_kernel(
    Q, K, V, O, LSE, KEY_MASK,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od, stride_o_split,
    stride_lb, stride_lh, stride_ls, stride_l_split,
    stride_mb, stride_ms,
    seq_q, seq_kv, num_heads_kv, group_size, split_size, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program = the packed rows [pid_m * BLOCK_M, +BLOCK_M) of one (batch, KV head) over the keys
    [split * split_size, +split_size). Grid (b * hkv, num_splits, cdiv(group * s_q, BLOCK_M)).
    Writes o and natural-log lse per row at O/LSE + split * stride_*_split: the final [b, s_q, hq, d]
    output and [b, hq, s_q] lse when there is one split (split strides 0), else fp32 partials."""
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_m = tl.program_id(2)
    off_b, off_hk = _batch_head(pid_bh, num_heads_kv)
    DTYPE: tl.constexpr = Q.dtype.element_ty
    IEEE: tl.constexpr = EMULATE or (DTYPE == tl.float32)

    start_r = pid_m * BLOCK_M
    row_ok, pos, head = _packed_rows(start_r + tl.arange(0, BLOCK_M), off_hk, group_size, seq_q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _operand(tl.load(Q + off_b * stride_qb + pos[:, None] * stride_qs + head[:, None] * stride_qh
                         + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0), EMULATE)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    km_base = KEY_MASK + off_b * stride_mb

    diag_offset = seq_kv - seq_q
    # Rows are position-major, so this tile holds the consecutive positions of its first and last rows.
    pos_hi = tl.minimum((start_r + BLOCK_M - 1) // group_size + 1, seq_q)
    full_end, hi = _causal_kv_range(start_r // group_size, pos_hi, seq_kv, diag_offset, CAUSAL, BLOCK_N)
    # This split's keys: [lo, split_end) is BLOCK_N-aligned (split_size is a multiple of BLOCK_N), and
    # so is full_end, so the unmasked part [lo, mid) is whole in-bounds blocks.
    lo = pid_split * split_size
    split_end = lo + split_size
    mid = tl.minimum(tl.maximum(full_end, lo), split_end)
    # no segment ids here (flash_attention routes packed sequences to its own kernel): the segment
    # arguments are placeholders that HAS_SEGMENTS=False never reads
    o, lse = _fwd_attend(q, k_base, v_base, km_base, km_base, pos, stride_ks, stride_kd, stride_vs, stride_vd,
                         stride_ms, stride_ms, pos, offs_n, offs_d, lo, mid, tl.minimum(split_end, hi), seq_kv,
                         diag_offset, qk_scale_log2, DTYPE, CAUSAL, HAS_KEY_MASK, False, HEAD_DIM, BLOCK_M, BLOCK_N,
                         BLOCK_D, EMULATE, IEEE)
    o_ptrs = (O + pid_split * stride_o_split + off_b * stride_ob + pos[:, None] * stride_os
              + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, _to_store(o, O.dtype.element_ty, EMULATE), mask=io_mask)
    tl.store(LSE + pid_split * stride_l_split + off_b * stride_lb + head * stride_lh + pos * stride_ls,
             lse, mask=row_ok)


@_jit
def _flash_decode_combine_kernel(
    PART_O, PART_LSE, O, LSE,
    stride_pb, stride_ps, stride_ph, stride_p_split, stride_pd,
    stride_plb, stride_plh, stride_pls, stride_pl_split,
    stride_ob, stride_os, stride_oh, stride_od,
    seq_q, num_heads_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program = one output row (batch, query head, query position), merging its num_splits
    partials BLOCK_S at a time with the same running-max rescaling as the forward. Grid (b * hq * s_q,):
    program i writes LSE[i] of the contiguous [b, hq, s_q] lse."""
    pid = tl.program_id(0)
    off_b = (pid // (num_heads_q * seq_q)).to(tl.int64)
    off_h = ((pid // seq_q) % num_heads_q).to(tl.int64)
    pos = (pid % seq_q).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    po_base = PART_O + off_b * stride_pb + pos * stride_ps + off_h * stride_ph
    pl_base = PART_LSE + off_b * stride_plb + off_h * stride_plh + pos * stride_pls

    m_i = tl.full([], float("-inf"), dtype=tl.float32)  # running max of the splits' lse, base 2
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_s in range(0, num_splits, BLOCK_S):
        splits = start_s + offs_s
        s_ok = splits < num_splits
        lse_s = tl.load(pl_base + splits * stride_pl_split, mask=s_ok, other=float("-inf")) * 1.4426950408889634
        o_s = tl.load(po_base + splits[:, None] * stride_p_split + offs_d[None, :] * stride_pd,
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse_s, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split has seen a key yet: 2^-inf = 0
        alpha = tl.math.exp2(m_i - m_sub)
        w = tl.math.exp2(lse_s - m_sub)  # 0 for empty and out-of-range splits
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        m_i = m_new

    l_safe, lse = _softmax_denominator(l_i, m_i)
    o = acc / l_safe
    tl.store(O + off_b * stride_ob + pos * stride_os + off_h * stride_oh + offs_d * stride_od,
             _to_store(o, O.dtype.element_ty, EMULATE), mask=d_ok)
    tl.store(LSE + pid, lse)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

def choose_num_splits(programs: int, kv_blocks: int, num_sms: int) -> int:
    """Number of key chunks for ``programs`` (batch x KV head x row tile) programs over ``kv_blocks`` key
    blocks on ``num_sms`` SMs: 1 when the programs already fill the GPU or the cache is short,
    else the fewest splits whose last wave is about as full as the best choice's (FA2's rule: waves
    = programs * splits / SMs, efficiency = waves / ceil(waves))."""
    max_splits = min(MAX_SPLITS, kv_blocks // _MIN_BLOCKS_PER_SPLIT)
    if programs >= num_sms or max_splits <= 1:
        return 1

    def efficiency(splits: int) -> float:
        waves = programs * splits / num_sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= _WAVE_EFFICIENCY_SLACK * best)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    # The interpreter runs programs one after another: extra splits would only add work.
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _decode_blocks(block_d: int, rows: int, dtype: torch.dtype, on_gpu: bool) -> _Blocks:
    """Tiles for ``rows`` packed query rows: BLOCK_M = rows rounded up to a power of two, capped."""
    if not on_gpu:
        return _INTERPRETER_DECODE_BLOCKS
    blocks = _DECODE_BLOCKS[block_d]
    if dtype == torch.float32:
        # Exact fp32 dots run on CUDA cores with their operands in registers: at d=128, 32-row tiles,
        # a quarter of the keys per step and 8 warps are what stays under 255 registers without spills.
        blocks = blocks._replace(block_m=32, block_n=max(16, blocks.block_n // 4))
    block_m = min(blocks.block_m, max(16, triton.next_power_of_2(rows)))
    # The table's warps are for 64-row tiles (4 warps need 254 registers there at d=128): 4 below.
    half_precision_small_tile = block_m < 64 and dtype != torch.float32
    return blocks._replace(block_m=block_m, num_warps=4 if half_precision_small_tile else blocks.num_warps)


def flash_decode_forward(q, k, v, causal: bool, scale: float, key_mask: torch.Tensor | None, emulate: bool,
                         num_splits: int | None = None):
    """Launch the packed split-KV forward (and the combine when num_splits > 1); called by
    flash_attention's forward launcher, which handles empty inputs. Returns (o [b, s_q, hq, d] in q's
    dtype, lse [b, hq, s_q] fp32 natural log), flash_attention's forward contract."""
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    block_d = _block_d(d)
    blk = _decode_blocks(block_d, s_q * group, q.dtype, q.is_cuda)
    row_tiles = triton.cdiv(s_q * group, blk.block_m)
    if num_splits is None:
        num_splits = choose_num_splits(b * hkv * row_tiles, triton.cdiv(s_kv, blk.block_n), _num_sms(q.device))
    split_size = triton.cdiv(triton.cdiv(s_kv, num_splits), blk.block_n) * blk.block_n

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, s_q), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        part_o, part_lse = out, lse
        o_strides, lse_strides = (*out.stride(), 0), (*lse.stride(), 0)
    else:
        # fp32 partials, laid out so that one output row's splits are contiguous for the combine
        part_o = torch.empty((b, s_q, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, s_q, num_splits), dtype=torch.float32, device=q.device)
        # the kernel takes [b, s_q, hq, d] strides, then the split stride
        o_strides = (*part_o.stride()[:3], part_o.stride(4), part_o.stride(3))
        lse_strides = part_lse.stride()
    mask = key_mask if key_mask is not None else q  # dummy pointer, never read when HAS_KEY_MASK=False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    _flash_decode_fwd_kernel[(b * hkv, num_splits, row_tiles)](
        q, k, v, part_o, part_lse, mask,
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *lse_strides, *mask_strides,
        s_q, s_kv, hkv, group, split_size, scale * _LOG2E,
        CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, HEAD_DIM=d,
        BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, BLOCK_D=block_d, EMULATE=emulate,
        num_warps=blk.num_warps, num_stages=blk.num_stages,
    )
    if num_splits > 1:
        cap = _COMBINE_BLOCK_S if q.is_cuda else _INTERPRETER_COMBINE_BLOCK_S
        _flash_decode_combine_kernel[(b * hq * s_q,)](
            part_o, part_lse, out, lse,
            *part_o.stride()[:3], part_o.stride(3), part_o.stride(4), *part_lse.stride(), *out.stride(),
            s_q, hq, num_splits,
            HEAD_DIM=d, BLOCK_S=min(cap, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, EMULATE=emulate,
            num_warps=_COMBINE_WARPS, num_stages=1,
        )
    return out, lse


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                 softmax_scale: float | None = None, attention_mask: torch.Tensor | None = None,
                 num_splits: int | None = None, backend: str = "auto") -> torch.Tensor:
    """``flash_attention`` (same arguments, masks and result ``[b, s_q, hq, d]``) that always runs the
    packed split-KV forward with ``backend="triton"``; meant for q of a few tokens over a KV cache.
    ``num_splits``: key chunks per (batch, KV head), None = chosen from the GPU's SM count; ignored by
    ``backend="torch"``. Gradients flow through flash_attention's backward kernels."""
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int):
            raise TypeError(f"flash_decode: num_splits must be an int or None, got {type(num_splits).__name__}")
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"flash_decode: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return _attention("flash_decode", q, k, v, causal, softmax_scale, attention_mask, backend,
                      split_kv=True, num_splits=num_splits)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_gpu_compile.py compiles them for sm_80/sm_90)
# ------------------------------------------------------------------------------------------------

def compile_specs(head_dim: int = 128, dtype: torch.dtype = torch.bfloat16):
    """``[(jit_function, signature, constexprs, name, options)]`` for both kernels at the tiles, warps
    and stages the launcher picks on GPU for ``head_dim``/``dtype`` (contract:
    tests/kernels/test_gpu_compile.py): the forward with 16 packed rows (ChatGLM3 decoding, group 16)
    and with the largest routed tile (64 rows), into fp32 partials (split-KV) and straight into the
    output (one split), and the combine. Head_dim and key-mask strides are the constexpr 1 the JIT
    specializes contiguous last dims to. (ptxas register counts: see _DECODE_BLOCKS.)"""
    if triton is None:
        raise RuntimeError("flash_decode.compile_specs: triton is not installed")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16) or not 0 < head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_decode.compile_specs: need fp32/fp16/bf16 and 0 < head_dim <= {_MAX_HEAD_DIM}, "
                         f"got {dtype}, head_dim={head_dim}")
    ptr = "*" + _dtype_name(dtype)
    block_d = _block_d(head_dim)
    unit_strides = {name: 1 for name in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ms")}

    def spec(fn, pointers, constexprs, name, num_warps: int, num_stages: int):
        # every other parameter is an int32 stride or size, except the fp32 softmax scale
        sig = {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if a == "qk_scale_log2" else "i32")
               for a in fn.arg_names}
        return fn, sig, constexprs, name, {"num_warps": num_warps, "num_stages": num_stages}

    specs = []
    for rows, split, has_mask in ((16, True, True), (DECODE_MAX_ROWS, True, True), (16, False, False)):
        blk = _decode_blocks(block_d, rows, dtype, on_gpu=True)
        out_ptr = "*fp32" if split else ptr
        specs.append(spec(
            _flash_decode_fwd_kernel,
            {"Q": ptr, "K": ptr, "V": ptr, "O": out_ptr, "LSE": "*fp32", "KEY_MASK": "*i8"},
            dict(unit_strides, CAUSAL=True, HAS_KEY_MASK=has_mask, HEAD_DIM=head_dim, BLOCK_M=blk.block_m,
                 BLOCK_N=blk.block_n, BLOCK_D=block_d, EMULATE=False),
            f"flash_decode_fwd_d{head_dim}_m{blk.block_m}_{'split' if split else 'single'}_mask{int(has_mask)}",
            blk.num_warps, blk.num_stages))
    specs.append(spec(
        _flash_decode_combine_kernel, {"PART_O": "*fp32", "PART_LSE": "*fp32", "O": ptr, "LSE": "*fp32"},
        dict(stride_pd=1, stride_od=1, HEAD_DIM=head_dim, BLOCK_S=_COMBINE_BLOCK_S, BLOCK_D=block_d, EMULATE=False),
        f"flash_decode_combine_d{head_dim}", _COMBINE_WARPS, 1))
    return specs
