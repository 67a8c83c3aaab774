"""Grouped-query attention with online softmax (flash attention), causal and padding masks.

    o = softmax(q k^T * scale + mask) v

q ``[b, s_q, hq, d]``, k/v ``[b, s_kv, hkv, d]`` with ``hq % hkv == 0``: query head i reads KV head
``i // (hq // hkv)``. The causal mask is bottom-right aligned (query i sees keys j <= i + s_kv - s_q,
as in flash-attn 2), so the same call serves prefill (s_q == s_kv) and decoding (s_q < s_kv).
``attention_mask`` ``[b, s_kv]`` marks real keys with 1/True and padding with 0/False.
``segment_ids`` ``[b, s_kv]`` (integers; needs s_q <= s_kv) packs several documents into one sequence:
query i, at key position i + s_kv - s_q, sees key j only if segment_ids[j] == segment_ids[i + s_kv - s_q]
(equality, so a document need not be contiguous), on top of the causal and padding rules.
A query row that sees no key at all (a left-padding row) outputs zeros, and gets zero gradients.

Triton backend, per query row i of one (batch, query head) and with ``s_ij = scale * q_i . k_j``
over the visible keys j (in base 2: ``t_ij = s_ij * log2(e)``, so ``exp(s) = exp2(t)``):

forward (online softmax, one pass over K/V blocks; m = running max, l = running sum)::

    m' = max(m, max_j t_ij);  l = l * 2^(m - m') + sum_j 2^(t_ij - m');  acc = acc * 2^(m - m') + P V
    o_i = acc / l;  lse_i = (m + log2 l) * ln 2 = log sum_j exp(s_ij)      (lse_i = -inf: empty row)

backward (P recomputed from lse, never stored)::

    P_ij = exp(s_ij - lse_i),  delta_i = sum_d o_id * do_id  (= sum_j P_ij dP_ij)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * dS^T Q

Decoding calls (s_q < s_kv with at most 64 query rows per KV head) run the forward of flash_decode.py
instead, which packs the query heads of a KV group into one tile and splits the KV cache across
programs (see ``flash_decode.pays_off``); it returns the same o and lse, so the backward is shared.
Calls with segment_ids always run the kernels below (flash_decode has no segment test).

Segments in the kernels: the launcher turns the ids into int32 spans (``_segment_spans``: per position,
the first and last position of its segment; the first one serves as the id). Every key block, the
causally "unmasked" ones included, compares ids, and each program visits only the blocks between the
first and last position of its rows' (or, for dK/dV, its keys') segments: with contiguous documents,
blocks of other documents are neither loaded nor multiplied.

dK/dV of a KV head are accumulated in registers over the ``hq // hkv`` query heads that read it, in
one program per KV block, so K/V are never expanded in memory and no atomics are needed. Matmul
operands are the input dtype (bf16/fp16 tensor cores on GPU; P and dS are rounded to it) with fp32
accumulation; softmax statistics, scaling and masking are fp32.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right  # torch >= 2.3

from ._backend import TORCH, check_floating, resolve_backend

try:
    import triton
    import triton.language as tl
except Exception:  # triton is an optional extra; the torch backend stays available without it
    triton = None
    tl = None

# A no-op decorator without triton: the kernels below are then never launched (resolve_backend
# refuses backend="triton"), but the module still imports.
_jit = triton.jit if triton is not None else (lambda fn: fn)

# log2(e): scores are kept in base 2 so the kernels can use exp2. (Inside @triton.jit code the
# constants log2(e) and ln(2) are written as literals: plain Python globals are not visible there.)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256  # one [BLOCK, head_dim] tile per operand lives in registers/shared memory


def attention_mask_matrix(b: int, s_q: int, s_kv: int, causal: bool, attention_mask: torch.Tensor | None,
                          device, segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean ``[b, 1, s_q, s_kv]`` mask of visible keys, or None when everything is visible.
    ``segment_ids`` ``[b, s_kv]`` (needs s_q <= s_kv): query i, at key position i + s_kv - s_q, sees
    only the keys whose segment id equals the one at its own position."""
    mask = None
    if causal:
        i = torch.arange(s_q, device=device)[:, None]
        j = torch.arange(s_kv, device=device)[None, :]
        mask = (j <= i + (s_kv - s_q))[None, None]
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        mask = keys if mask is None else (mask & keys)
    if segment_ids is not None:
        same = segment_ids[:, None, s_kv - s_q:, None] == segment_ids[:, None, None, :]  # [b, 1, s_q, s_kv]
        mask = same if mask is None else (mask & same)
    return None if mask is None else mask.expand(b, 1, s_q, s_kv)


# torch >= 2.5 lets SDPA read grouped K/V heads directly (enable_gqa); 2.4 needs the K/V expanded
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None, attention_mask: torch.Tensor | None = None,
                        segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    rep = hq // hkv
    # Grouped-query without copying K/V (the KV cache when decoding): the `rep` query heads that
    # share a KV head are stacked along the query axis, [b, hkv, rep * s_q, d].
    qt = q.transpose(1, 2).reshape(b, hkv, rep * s_q, d)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if attention_mask is None and segment_ids is None and causal and s_q > 1 and s_q <= s_kv:
        # plain causal attention as SDPA's causal forms, which its fused kernels take where the backend has
        # them (then no [s_q, s_kv] mask nor the probabilities the math path saves for backward); a query
        # chunk at the end of the keys (context-parallel chunks, prefill after a cache) takes the
        # bottom-right-aligned causal bias
        qh = q.transpose(1, 2)
        causal_kw = {"is_causal": True} if s_q == s_kv else {"attn_mask": causal_lower_right(s_q, s_kv)}
        if rep == 1:
            out = F.scaled_dot_product_attention(qh, kt, vt, scale=scale, **causal_kw)
        elif _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(qh, kt, vt, scale=scale, enable_gqa=True, **causal_kw)
        else:
            out = F.scaled_dot_product_attention(qh, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1),
                                                 scale=scale, **causal_kw)
        return out.transpose(1, 2)
    # one query row per step (decoding): the bottom-right causal mask hides nothing
    mask = attention_mask_matrix(b, s_q, s_kv, causal and s_q > 1, attention_mask, q.device, segment_ids)
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        mask = mask.unsqueeze(2).expand(b, 1, rep, s_q, s_kv).reshape(b, 1, rep * s_q, s_kv)
        # Rows with no visible key would be NaN (and NaN * 0 poisons later layers through V);
        # let them see everything, then zero their output.
        seen = mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~seen, scale=scale)
        out = out * seen.to(out.dtype)
    return out.reshape(b, hq, s_q, d).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Triton device helpers (inlined into the kernels)
#
# EMULATE is set when the kernels run under the Triton interpreter (CPU tensors). The interpreter
# computes bf16 dots wrongly and rounds fp32 -> bf16 by truncation, so in that mode the matmul
# operands are fp32 tensors holding values already rounded (to nearest even) to the input dtype,
# and dots run in fp32: the same numbers a bf16/fp16 tensor-core dot with fp32 accumulation gives.
# ------------------------------------------------------------------------------------------------

@_jit
def _round_bf16_bits(x):
    """fp32 -> bf16 bit pattern, round to nearest even (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@_jit
def _to_store(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 tile -> DTYPE for tl.store, rounding to nearest even."""
    if EMULATE and DTYPE == tl.bfloat16:
        return _round_bf16_bits(x)
    else:
        return x.to(DTYPE)


@_jit
def _operand(x, EMULATE: tl.constexpr):
    """A loaded tile as a dot operand (kept in its dtype; fp32 under the interpreter)."""
    if EMULATE:
        return x.to(tl.float32)
    else:
        return x


@_jit
def _to_operand(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """An fp32 tile (P or dS) rounded to the input dtype, as a dot operand."""
    if EMULATE:
        if DTYPE == tl.float32:
            return x
        else:
            return _to_store(x, DTYPE, EMULATE).to(tl.float32)
    else:
        return x.to(DTYPE)


@_jit
def _batch_head(pid_bh, num_heads):
    """Grid index over (batch, head) pairs -> (batch, head), as int64 for the pointer offsets."""
    return (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)


@_jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs use exact fp32 products (as torch does by default), not tf32.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@_jit
def _mask_scores(x, fill, cols, offs_m, km_base, seg_base, seg_q, stride_ms, stride_ss, seq_kv, diag_offset,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """x [BLOCK_M, BLOCK_N] (scores or P of query positions offs_m, keys cols) set to ``fill`` where the
    row cannot see the key. MASKED: apply the key bounds and the causal diagonal (the caller guarantees
    that unmasked blocks are in bounds and causally fully visible). The key-padding mask and the
    segment test (seg_q: the rows' segment ids) apply to every block: they follow no block structure."""
    if MASKED:
        in_kv = cols < seq_kv
        visible = in_kv[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag_offset)
        if HAS_KEY_MASK:
            visible = visible & (tl.load(km_base + cols * stride_ms, mask=in_kv, other=0)[None, :] != 0)
        if HAS_SEGMENTS:
            seg_k = tl.load(seg_base + cols * stride_ss, mask=in_kv, other=-1)
            visible = visible & (seg_k[None, :] == seg_q[:, None])
        x = tl.where(visible, x, fill)
    else:
        if HAS_KEY_MASK:
            x = tl.where(tl.load(km_base + cols * stride_ms)[None, :] != 0, x, fill)
        if HAS_SEGMENTS:
            x = tl.where(tl.load(seg_base + cols * stride_ss)[None, :] == seg_q[:, None], x, fill)
    return x


@_jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd, stride_vs,
               stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, start, end, seq_kv, diag_offset,
               qk_scale_log2, DTYPE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, EMULATE: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update over key blocks [start, end). MASKED: apply key bounds and the causal
    diagonal (the caller guarantees unmasked blocks are in bounds and causally fully visible)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seq_kv) & d_ok
        else:
            kv_mask = d_ok
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(_operand(k, EMULATE)), IEEE) * qk_scale_log2  # [BLOCK_M, BLOCK_N], base 2
        s = _mask_scores(s, float("-inf"), cols, offs_m, km_base, seg_base, seg_q, stride_ms, stride_ss, seq_kv,
                         diag_offset, MASKED, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so that 2^(-inf) = 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(_to_operand(p, DTYPE, EMULATE), _operand(v, EMULATE), IEEE)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _fwd_attend(q, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
                stride_ss, offs_m, offs_n, offs_d, start, full_end, end, seq_kv, diag_offset, qk_scale_log2,
                DTYPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EMULATE: tl.constexpr, IEEE: tl.constexpr):
    """Attention of the BLOCK_M rows of q (query positions offs_m) over the keys [start, end), keys below
    full_end unmasked (whole in-bounds blocks visible to every row but for the key mask and segments;
    start and full_end BLOCK_N-aligned). seg_q: the rows' segment ids (read only if HAS_SEGMENTS).
    Returns (o [BLOCK_M, BLOCK_D] fp32, lse [BLOCK_M] natural log); rows that saw no key: 0 and -inf."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd,
                               stride_vs, stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, start, full_end,
                               seq_kv, diag_offset, qk_scale_log2, DTYPE, False, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS,
                               HEAD_DIM, BLOCK_N, EMULATE, IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd,
                               stride_vs, stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, full_end, end,
                               seq_kv, diag_offset, qk_scale_log2, DTYPE, True, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS,
                               HEAD_DIM, BLOCK_N, EMULATE, IEEE)
    l_safe, lse = _softmax_denominator(l_i, m_i)
    return acc / l_safe[:, None], lse


@_jit
def _causal_kv_range(pos_lo, pos_hi, seq_kv, diag_offset, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a tile whose rows hold query positions in [pos_lo, pos_hi) (pos_hi <= s_q): keys
    < full_end are visible to every row (no causal mask needed, BLOCK_N-aligned and in bounds); keys in
    [full_end, hi) need masking."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seq_kv, pos_hi + diag_offset), 0)
        full_end = tl.maximum(pos_lo + diag_offset + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = seq_kv
        full_end = seq_kv // BLOCK_N * BLOCK_N
    return full_end, hi


@_jit
def _segment_kv_range(seg_base, seg_span, stride_ss, pos, row_ok, full_end, hi, CAUSAL: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Packed sequences: (segment ids of the rows at key positions ``pos``, start, full_end, hi), the
    ``_causal_kv_range`` of a query tile narrowed to the keys its rows' segments can occupy. A segment
    id is the first position of its segment in the row and seg_base + seg_span holds the last one, so
    the keys of the tile's segments lie in [min first, max last]: blocks outside are skipped (with
    contiguous documents, all but the tile's own documents). start and full_end stay BLOCK_N-aligned and
    [start, full_end) within the in-bounds, causally visible [0, full_end) it was given."""
    seg_q = tl.load(seg_base + pos * stride_ss, mask=row_ok, other=-1)
    start = tl.min(tl.where(row_ok, seg_q, 2147483647), 0) // BLOCK_N * BLOCK_N
    if not CAUSAL:  # (causally, hi is the last row's own position + 1, which its segment reaches anyway)
        seg_end = tl.max(tl.load(seg_base + seg_span + pos * stride_ss, mask=row_ok, other=-1), 0) + 1
        hi = tl.minimum(hi, seg_end)
        full_end = tl.minimum(full_end, tl.cdiv(seg_end, BLOCK_N) * BLOCK_N)
    full_end = tl.maximum(start, full_end)
    return seg_q, start, full_end, hi


@_jit
def _query_tile_kv_range(start_m, offs_m, row_ok, seq_q, seq_kv, seg_base, stride_sf, stride_ss,
                         CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """(seg_q, start, full_end, hi) of the query tile [start_m, start_m + BLOCK_M): keys [start, full_end)
    need no causal mask, [full_end, hi) do (``_causal_kv_range``), narrowed to the tile's segments with
    packed sequences (``_segment_kv_range``; seg_q is a placeholder without them)."""
    diag_offset = seq_kv - seq_q
    full_end, hi = _causal_kv_range(start_m, tl.minimum(start_m + BLOCK_M, seq_q), seq_kv, diag_offset,
                                     CAUSAL, BLOCK_N)
    start = 0
    seg_q = offs_m
    if HAS_SEGMENTS:
        seg_q, start, full_end, hi = _segment_kv_range(seg_base, stride_sf, stride_ss, offs_m + diag_offset, row_ok,
                                                       full_end, hi, CAUSAL, BLOCK_N)
    return seg_q, start, full_end, hi


@_jit
def _softmax_denominator(l_i, m_i):
    """(l_safe, lse) from the online-softmax sum l and base-2 max m: o = acc / l_safe, and lse the
    natural-log logsumexp. Rows that saw no key (l == 0, acc == 0) get o = 0 and lse = -inf."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # * ln 2
    return l_safe, lse


@_jit
def _flash_attn_fwd_kernel(
    Q, K, V, O, LSE, KEY_MASK, SEGMENTS,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_mb, stride_ms,
    stride_sf, stride_sb, stride_ss,
    seq_q, seq_kv, num_heads_q, group_size, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, query head). Grid (b * hq, cdiv(s_q, BLOCK_M)).
    Writes O [b, s_q, hq, d] and LSE [b, hq, s_q] (fp32, natural log, -inf for rows with no key).
    SEGMENTS [2, b, s_kv] int32 (HAS_SEGMENTS): per key position the first and last position of its
    segment (``_segment_spans``)."""
    # Last query blocks first: under the causal mask they have the most keys, so the longest
    # programs start in the first wave instead of forming a tail.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_bh = tl.program_id(0)
    off_b, off_h = _batch_head(pid_bh, num_heads_q)
    off_hk = off_h // group_size
    DTYPE: tl.constexpr = Q.dtype.element_ty
    IEEE: tl.constexpr = EMULATE or (DTYPE == tl.float32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = _operand(tl.load(q_ptrs, mask=io_mask, other=0.0), EMULATE)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    km_base = KEY_MASK + off_b * stride_mb
    seg_base = SEGMENTS + off_b * stride_sb

    diag_offset = seq_kv - seq_q
    seg_q, start, full_end, hi = _query_tile_kv_range(start_m, offs_m, row_ok, seq_q, seq_kv, seg_base, stride_sf,
                                                      stride_ss, CAUSAL, HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    o, lse = _fwd_attend(q, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd, stride_vs, stride_vd,
                         stride_ms, stride_ss, offs_m, offs_n, offs_d, start, full_end, hi, seq_kv, diag_offset,
                         qk_scale_log2, DTYPE, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
                         EMULATE, IEEE)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _to_store(o, O.dtype.element_ty, EMULATE), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

@_jit
def _flash_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    seq_q, num_heads_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d o[b, i, h, d] * do[b, i, h, d] (fp32). Grid (b * hq, cdiv(s_q, BLOCK_M))."""
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(0)
    off_b, off_h = _batch_head(pid_bh, num_heads_q)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@_jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, col_ok, seg_base, seg_k,
                    stride_qs, stride_qd, stride_dos, stride_dod, stride_ss,
                    offs_n, offs_d, start, end, seq_q, diag_offset, qk_scale_log2,
                    DTYPE: tl.constexpr, MASKED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, EMULATE: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [start, end) of one query head.
    Works on transposed tiles ([keys, queries]) so that no P/dS transpose is needed.
    MASKED: apply the causal diagonal. HAS_SEGMENTS: every block compares the rows' segment ids with
    the keys' (seg_k, -2 where col_ok is False), which then replaces the col_ok/row_ok test."""
    offs_mb = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_mb
        row_ok = offs_m < seq_q
        qT = _operand(tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qs,
                              mask=d_ok[:, None] & row_ok[None, :], other=0.0), EMULATE)  # [BLOCK_D, BLOCK_M]
        do = _operand(tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                              mask=row_ok[:, None] & d_ok[None, :], other=0.0), EMULATE)  # [BLOCK_M, BLOCK_D]
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634  # empty rows are masked below
        sT = _dot(k, qT, IEEE) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
        if HAS_SEGMENTS:
            # seg_k is -2 at invalid keys and seg_q -1 at rows past seq_q, so equal ids also mean both
            # are valid (folding col_ok in keeps the register-hungry loop one [BLOCK_N] vector lighter)
            seg_q = tl.load(seg_base + (offs_m + diag_offset) * stride_ss, mask=row_ok, other=-1)
            visible = seg_k[:, None] == seg_q[None, :]
        else:
            visible = col_ok[:, None] & row_ok[None, :]
        if MASKED:
            visible = visible & (offs_m[None, :] + diag_offset >= offs_n[:, None])
        pT = tl.where(visible, tl.math.exp2(sT - lse2[None, :]), 0.0)
        dv += _dot(_to_operand(pT, DTYPE, EMULATE), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_to_operand(dsT, DTYPE, EMULATE), tl.trans(qT), IEEE)
    return dk, dv


@_jit
def _flash_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KEY_MASK, SEGMENTS,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_mb, stride_ms,
    stride_sf, stride_sb, stride_ss,
    seq_q, seq_kv, num_heads_q, num_heads_kv, group_size, sm_scale, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, KV head), looping over the group's query heads.
    Grid (b * hkv, cdiv(s_kv, BLOCK_N))."""
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(0)
    off_b, off_hk = _batch_head(pid_bh, num_heads_kv)
    DTYPE: tl.constexpr = Q.dtype.element_ty
    IEEE: tl.constexpr = EMULATE or (DTYPE == tl.float32)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_kv
    kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = _operand(tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_ks
                         + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0), EMULATE)
    v = _operand(tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vs
                         + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0), EMULATE)
    if HAS_KEY_MASK:
        km = tl.load(KEY_MASK + off_b * stride_mb + offs_n * stride_ms, mask=col_ok, other=0)
        col_ok = col_ok & (km != 0)

    diag_offset = seq_kv - seq_q
    if CAUSAL:
        # Query i sees key j iff i >= j - diag_offset: rows below start_n - diag_offset see none of this
        # block, rows from start_n + BLOCK_N - 1 - diag_offset on see all of it.
        lo = tl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
        masked_end = tl.minimum(full_start, seq_q)
    else:
        lo = 0
        full_start = 0
        masked_end = 0
    end = seq_q
    seg_base = SEGMENTS + off_b * stride_sb
    seg_k = offs_n  # placeholder, read only with segments
    if HAS_SEGMENTS:
        # Only the queries at positions of this block's (visible) keys' segments can see it: those in
        # [min first - diag_offset, max last - diag_offset] (see _segment_kv_range); skip the rest.
        seg_k = tl.load(seg_base + offs_n * stride_ss, mask=col_ok, other=-2)  # -2: invalid key (_bwd_dkdv_inner)
        last_k = tl.load(seg_base + stride_sf + offs_n * stride_ss, mask=col_ok, other=-1)
        end = tl.minimum(tl.max(last_k, 0) + 1 - diag_offset, seq_q)
        masked_end = tl.minimum(masked_end, end)
        if not CAUSAL:  # (causally, the rows before the block's own keys already see none of it)
            lo = tl.maximum(tl.min(tl.where(col_ok, seg_k, 2147483647), 0) - diag_offset, 0) // BLOCK_M * BLOCK_M
            full_start = lo

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * num_heads_q + off_h) * seq_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, col_ok,
                                 seg_base, seg_k, stride_qs, stride_qd, stride_dos, stride_dod, stride_ss, offs_n,
                                 offs_d, lo, masked_end, seq_q, diag_offset, qk_scale_log2, DTYPE, True, HAS_SEGMENTS,
                                 HEAD_DIM, BLOCK_M, EMULATE, IEEE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, col_ok,
                                 seg_base, seg_k, stride_qs, stride_qd, stride_dos, stride_dod, stride_ss, offs_n,
                                 offs_d, full_start, end, seq_q, diag_offset, qk_scale_log2, DTYPE, False,
                                 HAS_SEGMENTS, HEAD_DIM, BLOCK_M, EMULATE, IEEE)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dks
             + offs_d[None, :] * stride_dkd, _to_store(dk, DK.dtype.element_ty, EMULATE), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvs
             + offs_d[None, :] * stride_dvd, _to_store(dv, DV.dtype.element_ty, EMULATE), mask=kv_mask)


@_jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd, stride_vs,
                  stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, start, end, seq_kv, diag_offset,
                  qk_scale_log2, DTYPE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, EMULATE: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) (same masking split as forward)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seq_kv) & d_ok
        else:
            kv_mask = d_ok
        k = _operand(tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                             mask=kv_mask, other=0.0), EMULATE)
        v = _operand(tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                             mask=kv_mask, other=0.0), EMULATE)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = _mask_scores(p, 0.0, cols, offs_m, km_base, seg_base, seg_q, stride_ms, stride_ss, seq_kv, diag_offset,
                         MASKED, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(_to_operand(ds, DTYPE, EMULATE), k, IEEE)
    return dq


@_jit
def _flash_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KEY_MASK, SEGMENTS,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_mb, stride_ms,
    stride_sf, stride_sb, stride_ss,
    seq_q, seq_kv, num_heads_q, group_size, sm_scale, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, query head). Grid (b * hq, cdiv(s_q, BLOCK_M))."""
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks first
    pid_bh = tl.program_id(0)
    off_b, off_h = _batch_head(pid_bh, num_heads_q)
    off_hk = off_h // group_size
    DTYPE: tl.constexpr = Q.dtype.element_ty
    IEEE: tl.constexpr = EMULATE or (DTYPE == tl.float32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _operand(tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
                         + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0), EMULATE)
    do = _operand(tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                          + offs_d[None, :] * stride_dod, mask=io_mask, other=0.0), EMULATE)
    row_base = pid_bh.to(tl.int64) * seq_q
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    # Empty rows (lse = -inf) see only masked keys, so P is zeroed by the masks; avoid inf - inf.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    km_base = KEY_MASK + off_b * stride_mb
    seg_base = SEGMENTS + off_b * stride_sb
    diag_offset = seq_kv - seq_q
    seg_q, start, full_end, hi = _query_tile_kv_range(start_m, offs_m, row_ok, seq_q, seq_kv, seg_base, stride_sf,
                                                      stride_ss, CAUSAL, HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd,
                       stride_vs, stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, start, full_end, seq_kv,
                       diag_offset, qk_scale_log2, DTYPE, False, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS, HEAD_DIM,
                       BLOCK_N, EMULATE, IEEE)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, km_base, seg_base, seg_q, stride_ks, stride_kd,
                       stride_vs, stride_vd, stride_ms, stride_ss, offs_m, offs_n, offs_d, full_end, hi, seq_kv,
                       diag_offset, qk_scale_log2, DTYPE, True, CAUSAL, HAS_KEY_MASK, HAS_SEGMENTS, HEAD_DIM,
                       BLOCK_N, EMULATE, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs
             + offs_d[None, :] * stride_dqd, _to_store(dq, DQ.dtype.element_ty, EMULATE), mask=io_mask)


# ------------------------------------------------------------------------------------------------
# Launchers: block sizes and warps
# ------------------------------------------------------------------------------------------------

class _Blocks(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Interpreter (CPU tests): 16-row/16-key blocks, the smallest tl.dot tile, so that modest test shapes
# (s ~ 37) already cover several blocks, partial tail blocks and the causal-diagonal split.
_INTERPRETER_BLOCKS = _Blocks(16, 16, 4, 1)

# GPU block sizes: compile-time choices, NOT yet timed on hardware (no GPU in CI). For each head_dim
# tile, the largest (BLOCK_M, BLOCK_N, num_warps, num_stages) among a handful of candidates that ptxas
# (via triton.compile for sm_80 and sm_90, causal + key mask, contiguous head_dim) assigns <= 255
# registers with no or negligible (<= 56 B) spills for bf16/fp16 (measured with the launch-time
# specialization: 16-byte aligned pointers and strides, head_dim stride 1); shared memory stays under
# sm_80's 163 KiB. The backward dK/dV kernel is the register-hungry one (K, V, dK, dV tiles live
# across its loops). fp32 inputs (not a training path: exact fp32 dots, no tensor cores) halve
# BLOCK_M/BLOCK_N (_gpu_blocks) and still spill in the forward at head_dim 128 on sm_90.
# A GPU session should time these with launch/bench.py and record the sweep in docs/.
_FWD_BLOCKS = {  # BLOCK_D -> blocks for the forward kernel (BLOCK_M query rows per program)
    16: _Blocks(128, 64, 8, 3), 32: _Blocks(128, 64, 8, 3), 64: _Blocks(128, 64, 8, 3),
    128: _Blocks(128, 64, 8, 3), 256: _Blocks(64, 32, 8, 2),
}
_BWD_DKDV_BLOCKS = {  # BLOCK_D -> (BLOCK_M = query rows per step, BLOCK_N = keys per program)
    16: _Blocks(32, 64, 4, 2), 32: _Blocks(32, 64, 4, 2), 64: _Blocks(32, 32, 8, 2),
    128: _Blocks(32, 64, 8, 2), 256: _Blocks(32, 32, 8, 1),
}
_BWD_DQ_BLOCKS = {  # BLOCK_D -> (BLOCK_M = query rows per program, BLOCK_N = keys per step)
    16: _Blocks(64, 64, 8, 2), 32: _Blocks(64, 64, 8, 2), 64: _Blocks(64, 32, 8, 2),
    128: _Blocks(64, 64, 8, 2), 256: _Blocks(64, 32, 8, 2),
}
# Packed sequences (HAS_SEGMENTS): the segment ids of the rows and the span bounds stay live across the
# loops, and at head_dim 128 the tiles above sit at ptxas's 255-register cap and spill over the 64 B limit
# of tests/kernels/test_gpu_compile.py, by how much depending on the triton version (spill stores per
# thread, causal, bf16, key mask on for the backward, sm_80 / sm_90):
#   forward (128, 64, 8, 3), no key mask:  triton 3.9: 48 / 0 B;  triton 3.6: 68 / 0 B
#   dK/dV   (32, 64, 8, 2):                triton 3.9: 28 / 0 B;  triton 3.6:  0 / 68 B
# Halving BLOCK_N of the forward (same query rows, warps and stages) and BLOCK_M of dK/dV (same keys per
# program and pipelining) fit every variant: forward 0 B except 12 B (3.9, key mask, sm_80), dK/dV 0 B,
# on both versions and both archs. Rejected: forward with 2 stages spills 52-84 B on sm_80 (both
# versions); (64, 64, 4, 3) up to 36 B on 3.6; dK/dV with 1 stage keeps the 32 x 64 tile (0-4 B) but
# loses the prefetch of the next Q/dO block. dQ with segments fits as is (0 B).
# head_dim 64 (in compile_specs too): dK/dV at (32, 64, 4, 2) and dQ at (64, 64, 8, 2) spilled on sm_80
# (triton 3.9: dK/dV 44 B, 192 B with segments; dQ with segments 36 B). Swept, sm_80 spill B (sm_90: 0
# for all), plain / segments, triton 3.9 | 3.6: dK/dV (32, 64, 8, 2) 48 / 176 | -; (32, 64, 8, 1) 0 / 16
# | 24 / 0; (16, 64, 8, 2) 0 / 0 at 252-255 registers | 20 / 32; (16, 64, 4, 2) 0 / 0 | 40 / 44;
# (32, 32, 4, 2) 0 / 0 | 0 / 0 at 212-228 registers; (32, 32, 8, 2) 0 / 0 | 0 / 0 at 170-184. dQ
# (64, 64, 8, 1) 0 / 0 at 255 registers; (64, 32, 8, 2) 0 / 0 at 172-196 on both versions;
# (64, 64, 4, 2) 48 / 52. Chosen for both variants: dK/dV (32, 32, 8, 2), the only candidate with
# register headroom on both versions (keys per program halved: twice the programs), and dQ
# (64, 32, 8, 2) (query rows per program and pipelining kept); untimed, like the rest. The d64 forward
# with segments and key mask spills 4 B on sm_80 under triton 3.6 (0 under 3.9): left. 256 fits with
# segments.
_FWD_SEG_BLOCKS = {**_FWD_BLOCKS, 128: _Blocks(128, 32, 8, 3)}
_BWD_DKDV_SEG_BLOCKS = {**_BWD_DKDV_BLOCKS, 128: _Blocks(16, 64, 8, 2)}


def _preprocess_block_m(block_d: int) -> int:
    # delta = rowsum(o * do) is pure bandwidth: 4096-element tiles keep o and do at 32 fp32 registers
    # per thread each (4 warps).
    return max(16, 4096 // block_d)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _gpu_blocks(table: dict, block_d: int, dtype: torch.dtype) -> _Blocks:
    blocks = table[block_d]
    if dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory of bf16 ones
        blocks = blocks._replace(block_m=max(16, blocks.block_m // 2), block_n=max(16, blocks.block_n // 2))
    return blocks


def _fwd_blocks(block_d: int, seq_q: int, dtype: torch.dtype, on_gpu: bool, segments: bool = False) -> _Blocks:
    if not on_gpu:
        return _INTERPRETER_BLOCKS
    blocks = _gpu_blocks(_FWD_SEG_BLOCKS if segments else _FWD_BLOCKS, block_d, dtype)
    if seq_q < blocks.block_m:  # decoding / short prompts: do not compute mostly-masked query rows
        block_m = max(16, triton.next_power_of_2(seq_q))
        blocks = blocks._replace(block_m=block_m, num_warps=4 if block_m < 64 else blocks.num_warps)
    return blocks


def _emulate(q: torch.Tensor) -> bool:
    """EMULATE for the kernels: under the Triton interpreter (CPU tensors), emulate low-precision
    dot operands in fp32 (see the device helpers). Tests switch it off for fp16/fp32, which the
    interpreter handles natively, to run the exact GPU code path on CPU."""
    return not q.is_cuda


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _segment_spans(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[2, b, s_kv]`` int32 from integer ``segment_ids`` ``[b, s_kv]``: for each key position, the first
    and the last position in its row holding the same id. The first position is the id the kernels
    compare (equal ids <=> equal first positions, in int32 whatever the input dtype), and [first, last]
    bounds the keys of a segment, which lets them skip blocks of other documents. Sort-based, so it
    holds for non-contiguous segments too and never synchronizes with the GPU."""
    b, s_kv = segment_ids.shape
    spans = torch.empty((2, b, s_kv), dtype=torch.int32, device=segment_ids.device)
    if s_kv == 0:
        return spans
    ids, order = torch.sort(segment_ids, dim=1, stable=True)  # equal ids stay in position order
    index = torch.arange(s_kv, device=segment_ids.device).expand(b, s_kv)
    run_start = torch.ones_like(ids, dtype=torch.bool)
    run_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_end = torch.ones_like(run_start)
    run_end[:, :-1] = run_start[:, 1:]
    # sorted index of the first / last element of each element's run of equal ids
    first = torch.where(run_start, index, 0).cummax(dim=1).values
    last = torch.where(run_end, index, s_kv - 1).flip(1).cummin(dim=1).values.flip(1)
    spans[0].scatter_(1, order, order.gather(1, first).to(torch.int32))
    spans[1].scatter_(1, order, order.gather(1, last).to(torch.int32))
    return spans


def _flash_attn_forward(q, k, v, causal: bool, scale: float, key_mask: torch.Tensor | None,
                        split_kv: bool | None = None, num_splits: int | None = None,
                        segments: torch.Tensor | None = None):
    """Launch the forward kernel. Returns (o [b, s_q, hq, d], lse [b, hq, s_q] fp32).

    split_kv: None routes decoding calls to the split-KV kernel of flash_decode.py when it pays (its
    ``pays_off`` rule); True always, False never (the per-query-head kernel, e.g. to benchmark it).
    num_splits: the split-KV kernel's number of key chunks (None: chosen from the GPU's size).
    segments: ``_segment_spans`` of the segment ids, or None. Calls with segments always run the
    per-query-head kernel: flash_decode has no segment test (packed sequences are a training layout;
    generation does not pack), and split_kv is ignored for them."""
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    if q.numel() == 0 or s_kv == 0:  # nothing to compute, or every row sees no key
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        return out, torch.full((b, hq, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    # Imported here, not at the top: flash_decode.py imports this module's device helpers.
    from .flash_decode import flash_decode_forward, pays_off
    if segments is None and (split_kv or (split_kv is None and pays_off(s_q, s_kv, hq // hkv))):
        return flash_decode_forward(q, k, v, causal, scale, key_mask, _emulate(q), num_splits)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, s_q), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    blk = _fwd_blocks(block_d, s_q, q.dtype, q.is_cuda, segments is not None)
    mask = key_mask if key_mask is not None else q  # dummy pointer, never read when HAS_KEY_MASK=False
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    segs, seg_strides = _segment_args(segments, q)
    grid = (b * hq, triton.cdiv(s_q, blk.block_m))  # batch x heads on axis 0: up to 2^31 - 1 programs
    _flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, segs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides, *seg_strides,
        s_q, s_kv, hq, hq // hkv, scale * _LOG2E,
        CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, HAS_SEGMENTS=segments is not None, HEAD_DIM=d,
        BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, BLOCK_D=block_d, EMULATE=_emulate(q),
        num_warps=blk.num_warps, num_stages=blk.num_stages,
    )
    return out, lse


def _segment_args(segments: torch.Tensor | None, dummy: torch.Tensor):
    """(pointer, (stride_sf, stride_sb, stride_ss)) of the kernels' SEGMENTS; a dummy pointer, never
    read when HAS_SEGMENTS=False."""
    return (segments, segments.stride()) if segments is not None else (dummy, (0, 0, 0))


def _flash_attn_backward(do, q, k, v, o, lse, causal: bool, scale: float, key_mask: torch.Tensor | None,
                         need_dq: bool = True, need_dkdv: bool = True, segments: torch.Tensor | None = None):
    """Launch the backward kernels. Returns (dq, dk, dv); a gradient that is not needed is None."""
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_dq else None
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_dkdv else None
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_dkdv else None
    if q.numel() == 0 or k.numel() == 0:  # no query or no key: every gradient is zero
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv

    block_d = _block_d(d)
    on_gpu = q.is_cuda
    emulate = _emulate(q)
    has_mask = key_mask is not None
    mask = key_mask if has_mask else q
    mask_strides = key_mask.stride() if has_mask else (0, 0)
    segs, seg_strides = _segment_args(segments, q)
    common = dict(CAUSAL=causal, HAS_KEY_MASK=has_mask, HAS_SEGMENTS=segments is not None, HEAD_DIM=d,
                  BLOCK_D=block_d, EMULATE=emulate)

    delta = torch.empty((b, hq, s_q), dtype=torch.float32, device=q.device)
    pre_m = _preprocess_block_m(block_d) if on_gpu else _INTERPRETER_BLOCKS.block_m
    _flash_attn_bwd_preprocess_kernel[(b * hq, triton.cdiv(s_q, pre_m))](
        o, do, delta, *o.stride(), *do.stride(), s_q, hq, HEAD_DIM=d, BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    if need_dkdv:
        dkdv_table = _BWD_DKDV_SEG_BLOCKS if segments is not None else _BWD_DKDV_BLOCKS
        blk = _gpu_blocks(dkdv_table, block_d, q.dtype) if on_gpu else _INTERPRETER_BLOCKS
        _flash_attn_bwd_dkdv_kernel[(b * hkv, triton.cdiv(s_kv, blk.block_n))](
            q, k, v, do, dk, dv, lse, delta, mask, segs,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *mask_strides,
            *seg_strides,
            s_q, s_kv, hq, hkv, hq // hkv, scale, scale * _LOG2E,
            BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps, num_stages=blk.num_stages, **common,
        )
    if need_dq:
        blk = _gpu_blocks(_BWD_DQ_BLOCKS, block_d, q.dtype) if on_gpu else _INTERPRETER_BLOCKS
        _flash_attn_bwd_dq_kernel[(b * hq, triton.cdiv(s_q, blk.block_m))](
            q, k, v, do, dq, lse, delta, mask, segs,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *mask_strides, *seg_strides,
            s_q, s_kv, hq, hq // hkv, scale, scale * _LOG2E,
            BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps, num_stages=blk.num_stages, **common,
        )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ------------------------------------------------------------------------------------------------

class FlashAttentionFunction(torch.autograd.Function):
    """Triton flash attention; saves q, k, v, o and the fp32 logsumexp [b, hq, s_q] for backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, key_mask: torch.Tensor | None,
                split_kv: bool | None = None, num_splits: int | None = None, segments: torch.Tensor | None = None):
        o, lse = _flash_attn_forward(q, k, v, causal, scale, key_mask, split_kv, num_splits, segments)
        ctx.save_for_backward(q, k, v, o, lse, key_mask, segments)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask, segments = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, key_mask,
                                          need_dq=ctx.needs_input_grad[0],
                                          need_dkdv=ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
                                          segments=segments)
        return dq, dk, dv, None, None, None, None, None, None


def _check(op: str, q, k, v, attention_mask, segment_ids=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{op}: query heads {q.shape[2]} (q {tuple(q.shape)}) not divisible by "
                         f"KV heads {k.shape[2]} (k {tuple(k.shape)})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} must be [batch, s_kv] = {(k.shape[0], k.shape[1])}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} is on {t.device}, q on {q.device}")
    if segment_ids is not None:
        if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
            raise TypeError(f"{op}: segment_ids must be an integer tensor (document index per key), got "
                            f"dtype {segment_ids.dtype} with shape {tuple(segment_ids.shape)}")
        if q.shape[1] > k.shape[1]:
            # query i sits at key position i + s_kv - s_q: with more queries than keys the first rows
            # have no position, hence no segment
            raise ValueError(f"{op}: segment_ids needs s_q <= s_kv, got q {tuple(q.shape)} and k {tuple(k.shape)}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, attention_mask: torch.Tensor | None = None,
                    segment_ids: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q ``[b, s_q, hq, d]`` over k/v ``[b, s_kv, hkv, d]`` -> ``[b, s_q, hq, d]`` (see module doc).
    ``segment_ids`` ``[b, s_kv]`` (any integer dtype): packed sequences, a key is visible only to the
    queries of its own segment (see module doc)."""
    return _attention("flash_attention", q, k, v, causal, softmax_scale, attention_mask, backend,
                      segment_ids=segment_ids)


def _attention(op: str, q, k, v, causal, softmax_scale, attention_mask, backend: str,
               split_kv: bool | None = None, num_splits: int | None = None,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """flash_attention and flash_decode: validation (errors name ``op``), backend choice, autograd."""
    _check(op, q, k, v, attention_mask, segment_ids)
    backend = resolve_backend(op, backend, q)
    if backend == TORCH:
        if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
            # CPU has no fast half-precision attention (its bf16 SDPA backward runs ~3x slower than
            # fp32): compute in fp32 and round the output once, which is also the more accurate path.
            out = attention_reference(q.float(), k.float(), v.float(), causal, softmax_scale, attention_mask,
                                      segment_ids)
            return out.to(q.dtype)
        return attention_reference(q, k, v, causal, softmax_scale, attention_mask, segment_ids)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: backend='triton' supports fp32/fp16/bf16, got q {tuple(q.shape)} {q.dtype}")
    if q.shape[3] > _MAX_HEAD_DIM:
        raise ValueError(f"{op}: backend='triton' supports head_dim <= {_MAX_HEAD_DIM}, got q {tuple(q.shape)}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    # int8 0/1 copy of the [b, s_kv] mask: any dtype in, one pointer type for the kernels.
    key_mask = attention_mask.ne(0).to(torch.int8) if attention_mask is not None else None
    segments = _segment_spans(segment_ids) if segment_ids is not None else None
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, key_mask, split_kv, num_splits, segments)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (a shared test compiles them for sm_80/sm_90 without a GPU)
# ------------------------------------------------------------------------------------------------

COMPILE_HEAD_DIMS = (128, 64)  # ChatGLM3 / GLM-4's head_dim, and the common smaller one


def compile_specs(head_dim: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, causal: bool = True):
    """``[(jit_function, signature, constexprs, name, options)]`` for every kernel in this file, at the
    block sizes, warps and stages the launchers pick on GPU for ``head_dim`` (None: each of
    ``COMPILE_HEAD_DIMS``) and ``dtype``, for
    ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``.

    Signature format (triton 3.x): every parameter name -> ``"*bf16"``/``"*fp32"``/``"*i8"``/``"*i32"``
    (pointers), ``"i32"``/``"fp32"`` (scalars) or ``"constexpr"`` (value given in ``constexprs``). The
    head_dim strides and the key-mask and segment position strides are the constexpr 1 that the JIT
    specializes them to for contiguous last dims (the case launched in practice), so the compiled code
    is the one that runs. Each kernel comes with and without HAS_SEGMENTS (packed sequences).
    ``_fwd_inner`` and the other helpers are device functions inlined into these kernels."""
    if triton is None:
        raise RuntimeError("flash_attention.compile_specs: triton is not installed")
    if head_dim is None:
        return [s for d in COMPILE_HEAD_DIMS for s in compile_specs(d, dtype, causal)]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16) or not 0 < head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_attention.compile_specs: need fp32/fp16/bf16 and 0 < head_dim <= {_MAX_HEAD_DIM}, "
                         f"got {dtype}, head_dim={head_dim}")
    ptr = "*" + _dtype_name(dtype)
    block_d = _block_d(head_dim)

    def tensor_strides(*names):
        """(signature, constexprs) for [b, s, h, d] strides of the named tensors; stride_d == 1."""
        sig, consts = {}, {}
        for n in names:
            sig.update({f"stride_{n}b": "i32", f"stride_{n}s": "i32", f"stride_{n}h": "i32", f"stride_{n}d": "constexpr"})
            consts[f"stride_{n}d"] = 1
        return sig, consts

    def spec(fn, pointers, tensors, scalars, consts, name, blocks=None):
        stride_sig, stride_consts = tensor_strides(*tensors)
        consts = {**stride_consts, **consts}
        sig = {**pointers, **stride_sig, **scalars}
        sig.update({k: "constexpr" for k in consts if k not in sig})
        missing = [a for a in fn.arg_names if a not in sig]
        if missing:  # keep the specs in step with the kernel signatures
            raise RuntimeError(f"compile_specs: {name} lacks parameters {missing}")
        # the launch options the launcher passes (Triton's defaults where it passes none)
        options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages} if blocks else {}
        return fn, {a: sig[a] for a in fn.arg_names}, consts, name, options

    # key mask and segment strides: the rows of the [b, s_kv] mask and of the [2, b, s_kv] spans are contiguous
    mask_stride_sig = {"stride_mb": "i32", "stride_ms": "constexpr", "stride_sf": "i32", "stride_sb": "i32",
                       "stride_ss": "constexpr"}
    mask_stride_consts = {"stride_ms": 1, "stride_ss": 1}
    mask_pointers = {"KEY_MASK": "*i8", "SEGMENTS": "*i32"}

    def variant(has_mask: bool, has_segments: bool) -> str:
        return f"mask{int(has_mask)}" + ("_seg" if has_segments else "")

    specs = []
    # forward: plain, key mask, and packed sequences without and with a key mask
    for has_mask, has_segments in ((False, False), (True, False), (False, True), (True, True)):
        fwd = _gpu_blocks(_FWD_SEG_BLOCKS if has_segments else _FWD_BLOCKS, block_d, dtype)
        consts = dict(CAUSAL=causal, HAS_KEY_MASK=has_mask, HAS_SEGMENTS=has_segments, HEAD_DIM=head_dim,
                      BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_D=block_d, EMULATE=False, **mask_stride_consts)
        specs.append(spec(
            _flash_attn_fwd_kernel,
            {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", **mask_pointers}, ("q", "k", "v", "o"),
            {**mask_stride_sig, "seq_q": "i32", "seq_kv": "i32", "num_heads_q": "i32", "group_size": "i32",
             "qk_scale_log2": "fp32"},
            consts, f"flash_attn_fwd_d{head_dim}_{variant(has_mask, has_segments)}", fwd))

    specs.append(spec(
        _flash_attn_bwd_preprocess_kernel, {"O": ptr, "DO": ptr, "DELTA": "*fp32"}, ("o", "do"),
        {"seq_q": "i32", "num_heads_q": "i32"},
        dict(HEAD_DIM=head_dim, BLOCK_M=_preprocess_block_m(block_d), BLOCK_D=block_d),
        f"flash_attn_bwd_preprocess_d{head_dim}"))

    # backward: with the key mask (the superset of the unmasked code), without and with segments
    for has_segments in (False, True):
        blk = _gpu_blocks(_BWD_DKDV_SEG_BLOCKS if has_segments else _BWD_DKDV_BLOCKS, block_d, dtype)
        specs.append(spec(
            _flash_attn_bwd_dkdv_kernel,
            {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "DK": ptr, "DV": ptr, "LSE": "*fp32", "DELTA": "*fp32",
             **mask_pointers}, ("q", "k", "v", "do", "dk", "dv"),
            {**mask_stride_sig, "seq_q": "i32", "seq_kv": "i32", "num_heads_q": "i32", "num_heads_kv": "i32",
             "group_size": "i32", "sm_scale": "fp32", "qk_scale_log2": "fp32"},
            dict(CAUSAL=causal, HAS_KEY_MASK=True, HAS_SEGMENTS=has_segments, HEAD_DIM=head_dim, BLOCK_M=blk.block_m,
                 BLOCK_N=blk.block_n, BLOCK_D=block_d, EMULATE=False, **mask_stride_consts),
            f"flash_attn_bwd_dkdv_d{head_dim}" + ("_seg" if has_segments else ""), blk))

        blk = _gpu_blocks(_BWD_DQ_BLOCKS, block_d, dtype)
        specs.append(spec(
            _flash_attn_bwd_dq_kernel,
            {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "DQ": ptr, "LSE": "*fp32", "DELTA": "*fp32", **mask_pointers},
            ("q", "k", "v", "do", "dq"),
            {**mask_stride_sig, "seq_q": "i32", "seq_kv": "i32", "num_heads_q": "i32", "group_size": "i32",
             "sm_scale": "fp32", "qk_scale_log2": "fp32"},
            dict(CAUSAL=causal, HAS_KEY_MASK=True, HAS_SEGMENTS=has_segments, HEAD_DIM=head_dim, BLOCK_M=blk.block_m,
                 BLOCK_N=blk.block_n, BLOCK_D=block_d, EMULATE=False, **mask_stride_consts),
            f"flash_attn_bwd_dq_d{head_dim}" + ("_seg" if has_segments else ""), blk))
    return specs
