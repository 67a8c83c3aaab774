"""Cross entropy, per-token log-probabilities and entropy over (optionally vocab-sharded) logits.

Per token t with logits z (a row of the vocabulary V), label y and p = softmax(z)::

    lse      = log sum_v exp(z_v)
    logprob  = z_y - lse                     loss = -logprob   (0 where y == ignore_index)
    entropy  = lse - sum_v p_v z_v

Gradients with respect to the logits, for upstream gradients g (of logprob) and h (of entropy)::

    d logprob / d z_j = [j == y] - p_j
    d entropy / d z_j = -p_j (z_j - zbar),     zbar = sum_v p_v z_v
    dz_j = g ([j == y] - p_j) - h p_j (z_j - zbar)

(derivation: d lse/dz_j = p_j and dp_v/dz_j = p_v ([v == j] - p_j), so d(sum_v p_v z_v)/dz_j =
p_j + p_j z_j - p_j zbar; subtract it from p_j.)

Both backends compute four statistics per row, relative to the row's maximum m::

    m,   s = sum_v exp(z_v - m),   w = sum_v exp(z_v - m) (z_v - m),   t = z_y

from which lse = m + log s and entropy = log s - w / s. The entropy is formed from shifted logits,
so no large lse - zbar cancellation happens when the logits carry a large common offset.

Vocab parallel (``group`` given): rank r of the group holds the contiguous vocab slice
[r * V_r, (r + 1) * V_r) of every row (V_r = logits.shape[-1], the same on every rank); labels are
global ids and identical on every rank. Each rank computes its local (m_r, s_r, w_r, t_r), then
(Megatron's scheme, two collectives on [tokens]-sized tensors)::

    M = all_reduce_max(m_r)
    S = all_reduce_sum(exp(m_r - M) s_r)        W = all_reduce_sum(exp(m_r - M) (w_r + (m_r - M) s_r))
    T = all_reduce_sum(t_r)                      (t_r = 0 on the ranks that do not own the label)

packed as one all-reduce of [S, W, T]. Every rank then holds the full-vocabulary lse, entropy and
zbar, and the backward pass is local: each rank writes the gradient of its own shard with the
formula above, no communication. The loss is replicated across the group, as the gradient
flowing into it is.

Triton backend: one program per row. The forward loops over the row in chunks of BLOCK_V with an
online max / rescaled sum (a chunk's new max m' rescales s by exp(m - m') and w by
exp(m - m') (w + (m - m') s)), so it reads the logits once and stores 4 fp32 numbers per row; no
[tokens, V] fp32 tensor ever exists. The backward recomputes p chunk by chunk from the saved
lse and writes dlogits directly in the logits' dtype (rounded to nearest). Rows whose upstream
gradients are both zero (ignored labels, masked PPO tokens) skip the logits read.

Memory: the forward saves the logits (no copy when the last dim is contiguous) and three fp32
[tokens] vectors; the backward allocates only dlogits. We deliberately do not compute the
gradient inside the forward (as Liger does, writing it over the logits): that saves one read of
the logits but bakes the upstream gradient (e.g. 1 / n_tokens) into the forward and cannot serve
token_logprobs, whose per-token upstream gradients (PPO advantages, masks) are only known later.

Outputs are fp32 (fp64 only for fp64 logits with backend="torch"); dlogits has the logits' dtype.
Labels may be any integer dtype. Labels outside [0, V) (other than ignore_index) are rejected with ValueError when the labels live
on the CPU; on CUDA that check would cost a device sync, so there the kernels turn such tokens'
outputs into NaN instead of reading out of bounds (the torch backend hits a device assert).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._backend import TORCH, TRITON, check_floating, resolve_backend

from ._triton_utils import jit as _jit
from ._triton_utils import round_to as _round_to
from ._triton_utils import tl, triton


# Vocab chunk per loop iteration. On GPU 4096 elements with 8 warps is 16 fp32 values per thread
# per chunk, enough loads in flight for a memory-bound row sweep (ChatGLM's 65024-entry rows take
# 16 chunks); a heuristic, not yet swept on a GPU. Under the interpreter a small chunk makes the
# CPU tests walk several chunks per row and a masked tail.
_BLOCK_V_GPU = 4096
_NUM_WARPS_GPU = 8
_BLOCK_V_CPU = 256
_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------------
# Triton kernels: one program per row of z viewed as [rows, V_local].
# ------------------------------------------------------------------------------------------------

@_jit
def _ce_fwd_kernel(z_ptr, labels_ptr, stats_ptr, n_rows, n_cols, stride_z, vocab_start, ignore_index,
                   HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """stats [4, n_rows] fp32 <- (m, s, w, t) of each row (see the module docstring)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - vocab_start
    end = n_cols
    if HAS_IGNORE:
        end = tl.where(label == ignore_index, 0, n_cols)  # ignored rows read nothing
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # while every logit seen is -inf, shift by 0 so exp() gives 0 instead of exp(-inf + inf) = NaN
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(z - ref)
        if WITH_ENTROPY:
            # the where()s keep 0 * inf out where exp() underflowed to 0 or z = -inf
            w = alpha * (w + tl.where(s > 0, m - ref, 0.0) * s)
            w += tl.sum(e * tl.where(e > 0, z - ref, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    owned = (local >= 0) & (local < n_cols) & (end > 0)
    t = tl.load(z_row + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    active = end > 0
    tl.store(stats_ptr + row, tl.where(active, m, 0.0))
    tl.store(stats_ptr + n_rows + row, tl.where(active, s, 1.0))  # ignored rows: lse = 0
    tl.store(stats_ptr + 2 * n_rows + row, w)
    tl.store(stats_ptr + 3 * n_rows + row, t)


@_jit
def _ce_bwd_kernel(z_ptr, labels_ptr, lse_ptr, zbar_ptr, g_ptr, h_ptr, dz_ptr,
                   n_rows, n_cols, stride_z, stride_dz, vocab_start, ignore_index,
                   HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                   EMULATE: tl.constexpr):
    """dz[row] <- g ([j == y] - p_j) - h p_j (z_j - zbar), in dz's dtype."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - vocab_start
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    if HAS_IGNORE:
        g = tl.where(label == ignore_index, 0.0, g)
    live = g != 0  # dead rows: masked loads read no memory and p = 0, so dz = 0
    h = 0.0
    zbar = 0.0
    if WITH_ENTROPY:
        h = tl.load(h_ptr + row)
        zbar = tl.load(zbar_ptr + row)
        if HAS_IGNORE:
            h = tl.where(label == ignore_index, 0.0, h)
        live = live | (h != 0)
    n_read = tl.where(live, n_cols, 0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        z = tl.load(z_ptr + row64 * stride_z + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse)
        dz = tl.where(cols == local, g, 0.0) - g * p
        if WITH_ENTROPY:
            dz -= h * p * tl.where(p > 0, z - zbar, 0.0)  # p = 0 where z = -inf: no 0 * inf
        tl.store(dz_ptr + row64 * stride_dz + cols, _round_to(dz, dz_ptr.dtype.element_ty, EMULATE), mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Per-row statistics and their gradient: torch (reference math) and Triton launchers.
# All take z2 [rows, V_local] with unit column stride and labels [rows].
# ------------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_stats_torch(z2, labels, vocab_start, ignore_index, with_entropy):
    """(m, s, w, t), each [rows], in fp32 (fp64 for fp64 logits)."""
    z = z2.to(_compute_dtype(z2.dtype))
    m = z.amax(dim=-1) if z.shape[0] else z.new_empty(0)
    ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    shifted = z - ref[:, None]
    e = shifted.exp()
    s = e.sum(-1)
    w = (e * torch.where(e > 0, shifted, torch.zeros_like(e))).sum(-1) if with_entropy else torch.zeros_like(s)
    local = labels - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    t = torch.where(owned, z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1), torch.zeros_like(s))
    return m, s, w, t


def _grad_torch(z2, labels, vocab_start, lse, zbar, g, h):
    z = z2.to(lse.dtype)
    p = torch.exp(z - lse[:, None])
    dz = -g[:, None] * p
    local = labels - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    rows = owned.nonzero().squeeze(-1)
    dz[rows, local[rows]] += g[rows]
    if h is not None:
        dz -= h[:, None] * p * torch.where(p > 0, z - zbar[:, None], torch.zeros_like(p))
    return dz.to(z2.dtype)


def _block_v(t: torch.Tensor, n_cols: int) -> tuple[int, int]:
    block = _BLOCK_V_GPU if t.is_cuda else _BLOCK_V_CPU
    block = min(block, triton.next_power_of_2(max(n_cols, 1)))
    return block, (_NUM_WARPS_GPU if block >= 2048 else max(1, block // 256))


def _row_stats_triton(z2, labels, vocab_start, ignore_index, with_entropy):
    n_rows, n_cols = z2.shape
    stats = torch.empty((4, n_rows), device=z2.device, dtype=torch.float32)
    if n_rows:
        block, warps = _block_v(z2, n_cols)
        _ce_fwd_kernel[(n_rows,)](
            z2, labels, stats, n_rows, n_cols, z2.stride(0), vocab_start,
            0 if ignore_index is None else ignore_index,
            HAS_IGNORE=ignore_index is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps)
    return stats.unbind(0)


def _grad_triton(z2, labels, vocab_start, ignore_index, lse, zbar, g, h):
    n_rows, n_cols = z2.shape
    dz = torch.empty((n_rows, n_cols), device=z2.device, dtype=z2.dtype)
    if n_rows:
        block, warps = _block_v(z2, n_cols)
        _ce_bwd_kernel[(n_rows,)](
            z2, labels, lse, zbar, g, h if h is not None else g, dz, n_rows, n_cols, z2.stride(0), dz.stride(0),
            vocab_start, 0 if ignore_index is None else ignore_index,
            HAS_IGNORE=ignore_index is not None, WITH_ENTROPY=h is not None, BLOCK_V=block,
            EMULATE=not z2.is_cuda, num_warps=warps)
    return dz


def _combine(m, s, w, t, group, world: int, with_entropy: bool):
    """Per-rank row statistics -> full-vocabulary (lse, T, entropy, zbar), each [rows]."""
    big_m = m
    if world > 1:
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    ref = torch.where(torch.isneginf(big_m), torch.zeros_like(big_m), big_m)
    scale = torch.exp(m - ref)  # 0 for a shard whose row is all -inf
    parts = [scale * s, t]
    if with_entropy:
        parts.append(scale * (w + torch.where(s > 0, m - ref, torch.zeros_like(s)) * s))
    packed = torch.stack(parts)
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    big_s, big_t = packed[0], packed[1]
    lse = ref + torch.log(big_s)
    if not with_entropy:
        return lse, big_t, None, None
    mean_shift = packed[2] / big_s  # sum_v p_v (z_v - ref) <= 0
    return lse, big_t, torch.log(big_s) - mean_shift, ref + mean_shift


def _group_rank_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _LogSoftmaxAtLabel(torch.autograd.Function):
    """logits [rows, V_local] (vocab shard of this rank) -> logprob [rows] (and entropy [rows]).

    Rows with label == ignore_index get logprob 0 and no gradient; other labels outside the full
    vocabulary get NaN. Outputs are fp32 (fp64 for fp64 logits with the torch backend).
    """

    @staticmethod
    def forward(ctx, z2, labels, group, ignore_index, with_entropy, backend):
        rank, world = _group_rank_world(group)
        vocab_start = rank * z2.shape[-1]
        stats = (_row_stats_triton if backend == TRITON else _row_stats_torch)(
            z2, labels, vocab_start, ignore_index, with_entropy)
        lse, target, entropy, zbar = _combine(*stats, group, world, with_entropy)
        logprob = target - lse
        out_of_vocab = (labels < 0) | (labels >= z2.shape[-1] * world)
        if ignore_index is not None:
            ignored = labels == ignore_index
            out_of_vocab &= ~ignored
            logprob = logprob.masked_fill(ignored, 0.0)
            if entropy is not None:
                entropy = entropy.masked_fill(ignored, 0.0)
        logprob = logprob.masked_fill(out_of_vocab, float("nan"))
        ctx.save_for_backward(z2, labels, lse, zbar)
        ctx.meta = (vocab_start, ignore_index, backend)
        ctx.set_materialize_grads(False)
        return logprob if entropy is None else (logprob, entropy)

    @staticmethod
    def backward(ctx, d_logprob, d_entropy=None):
        z2, labels, lse, zbar = ctx.saved_tensors
        vocab_start, ignore_index, backend = ctx.meta
        g = torch.zeros_like(lse) if d_logprob is None else d_logprob.to(lse.dtype).contiguous()
        h = None if d_entropy is None else d_entropy.to(lse.dtype).contiguous()
        if backend == TRITON:
            dz = _grad_triton(z2, labels, vocab_start, ignore_index, lse.contiguous(),
                              zbar.contiguous() if h is not None else lse, g, h)
        else:
            if ignore_index is not None:
                ignored = labels == ignore_index
                g = g.masked_fill(ignored, 0.0)
                h = None if h is None else h.masked_fill(ignored, 0.0)
            dz = _grad_torch(z2, labels, vocab_start, lse, zbar, g, h)
        return dz, None, None, None, None, None


def _log_softmax_at_label(logits, labels, group, ignore_index, with_entropy, backend):
    """The vocab-parallel path of both public functions (any backend, any group)."""
    v_local = logits.shape[-1]
    z2 = logits.reshape(-1, v_local)
    if z2.stride(-1) != 1 and v_local > 1:
        z2 = z2.contiguous()
    out = _LogSoftmaxAtLabel.apply(z2, labels.reshape(-1).long(), group, ignore_index, with_entropy, backend)
    if with_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _check(op: str, logits: torch.Tensor, labels: torch.Tensor, group, ignore_index) -> int:
    """Validate the inputs; returns the full vocabulary size (V_local * group size)."""
    check_floating(op, "logits", logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got dtype {labels.dtype} with shape "
                        f"{tuple(labels.shape)}")
    if logits.dim() == 0 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"{op}: logits shape {tuple(logits.shape)} must be labels shape {tuple(labels.shape)} "
                         f"+ [vocab]")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits has an empty vocab dim, shape {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} are on {labels.device} but logits "
                         f"{tuple(logits.shape)} are on {logits.device}")
    vocab = logits.shape[-1] * _group_rank_world(group)[1]
    if not labels.is_cuda and labels.numel():  # on CUDA: NaN outputs instead of a device sync
        bad = (labels < 0) | (labels >= vocab)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: labels (shape {tuple(labels.shape)}) must lie in [0, {vocab}) for logits of "
                             f"shape {tuple(logits.shape)}" + (f" x {vocab // logits.shape[-1]} vocab shards"
                                                               if group is not None else "")
                             + f"{'' if ignore_index is None else f' or equal ignore_index={ignore_index}'};"
                             f" got {int(labels[first])} at {first}")
    return vocab


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, group=None,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Cross entropy of ``logits [..., V]`` (fp32 math) against integer ``labels [...]``.

    Tokens whose label equals ``ignore_index`` give loss 0 and no gradient. ``reduction``: "mean"
    (over the non-ignored tokens; NaN when there are none, as in torch), "sum", or "none" (fp32,
    shaped like labels). With ``group``, logits are this rank's vocab shard (see module docstring)
    and the result equals the unsharded one on every rank of the group.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    _check("cross_entropy", logits, labels, group, ignore_index)
    backend = resolve_backend("cross_entropy", backend, logits)
    if backend == TORCH and group is None:
        z = logits.to(_compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(z, labels.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction)
        return loss.view(labels.shape) if reduction == "none" else loss
    logprob = _log_softmax_at_label(logits, labels, group, ignore_index, False, backend)
    valid = labels != ignore_index
    loss = torch.where(valid, -logprob, torch.zeros_like(logprob))
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / valid.sum()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, group=None, return_entropy: bool = False,
                   backend: str = "auto"):
    """``log p(label)`` per token, fp32, shaped like ``labels``; with ``return_entropy`` also the
    entropy of each token's distribution: ``(logprob, entropy)``. Differentiable in both outputs.
    With ``group``, logits are this rank's vocab shard (see module docstring)."""
    _check("token_logprobs", logits, labels, group, None)
    backend = resolve_backend("token_logprobs", backend, logits)
    if backend == TORCH and group is None:
        logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
        out = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        if not return_entropy:
            return out
        # p = 0 where z = -inf: drop those terms, or 0 * (-inf) gives NaN (also in the backward)
        return out, -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)
    return _log_softmax_at_label(logits, labels, group, None, return_entropy, backend)


def compile_specs():
    """Representative launches for the GPU compile test (see tests/kernels/test_gpu_compile.py):
    ChatGLM's vocab 65024 (TP=1; a TP=4 shard is 16256, the same BLOCK_V), bf16 logits, int64 labels."""
    specs = []
    for dt in ("bf16", "fp16", "fp32"):
        for has_ignore, entropy in ((True, False), (False, True))[: 2 if dt == "bf16" else 1]:
            fwd = {"z_ptr": f"*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32", "n_rows": "i32",
                   "n_cols": "i32", "stride_z": "i64", "vocab_start": "i32", "ignore_index": "i32"}
            bwd = {"z_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "zbar_ptr": "*fp32",
                   "g_ptr": "*fp32", "h_ptr": "*fp32", "dz_ptr": f"*{dt}", "n_rows": "i32", "n_cols": "i32",
                   "stride_z": "i64", "stride_dz": "i64", "vocab_start": "i32", "ignore_index": "i32"}
            meta = {"HAS_IGNORE": has_ignore, "WITH_ENTROPY": entropy, "BLOCK_V": _BLOCK_V_GPU}
            tag = f"{dt}_{'ignore' if has_ignore else 'entropy'}_65024"
            options = {"num_warps": _NUM_WARPS_GPU}  # what _block_v picks for BLOCK_V >= 2048
            specs.append((_ce_fwd_kernel, fwd, meta, f"ce_fwd_{tag}", options))
            specs.append((_ce_bwd_kernel, bwd, dict(meta, EMULATE=False), f"ce_bwd_{tag}", options))
    return specs
