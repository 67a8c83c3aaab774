"""Grouped-query attention with online softmax (flash attention), causal and padding masks.

    o = softmax(q k^T * scale + mask) v

q ``[b, s_q, hq, d]``, k/v ``[b, s_kv, hkv, d]`` with ``hq % hkv == 0``: query head i reads KV head
``i // (hq // hkv)``. The causal mask is bottom-right aligned (query i sees keys j <= i + s_kv - s_q,
as in flash-attn 2), so the same call serves prefill (s_q == s_kv) and decoding (s_q < s_kv).
``attention_mask`` ``[b, s_kv]`` marks real keys with 1/True and padding with 0/False.
A query row that sees no key at all (a left-padding row) outputs zeros.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import TORCH, check_floating, resolve_backend


def attention_mask_matrix(b: int, s_q: int, s_kv: int, causal: bool, attention_mask: torch.Tensor | None,
                          device) -> torch.Tensor | None:
    """Boolean ``[b, 1, s_q, s_kv]`` mask of visible keys, or None when everything is visible."""
    mask = None
    if causal:
        i = torch.arange(s_q, device=device)[:, None]
        j = torch.arange(s_kv, device=device)[None, :]
        mask = (j <= i + (s_kv - s_q))[None, None]
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        mask = keys if mask is None else (mask & keys)
    return None if mask is None else mask.expand(b, 1, s_q, s_kv)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    b, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    rep = hq // hkv
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    mask = attention_mask_matrix(b, s_q, s_kv, causal, attention_mask, q.device)
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        # Rows with no visible key would be NaN (and NaN * 0 poisons later layers through V);
        # let them see everything, then zero their output.
        seen = mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~seen, scale=scale)
        out = out * seen.to(out.dtype)
    return out.transpose(1, 2)


def _check(q, k, v, attention_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating("flash_attention", name, t)
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"flash_attention: query heads {q.shape[2]} (q {tuple(q.shape)}) not divisible by "
                         f"KV heads {k.shape[2]} (k {tuple(k.shape)})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"flash_attention: attention_mask shape {tuple(attention_mask.shape)} must be "
                         f"[batch, s_kv] = {(k.shape[0], k.shape[1])}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, attention_mask: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    _check(q, k, v, attention_mask)
    backend = resolve_backend("flash_attention", backend, q)
    if backend == TORCH:
        return attention_reference(q, k, v, causal, softmax_scale, attention_mask)
    raise NotImplementedError(f"flash_attention: backend {backend!r} is not implemented yet")
