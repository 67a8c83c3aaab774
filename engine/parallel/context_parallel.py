"""Context parallelism: every sequence split over the cp ranks of a layout, attention over all of it.

Split (load-balanced for causal attention, as Megatron-Core does): a sequence of S tokens is cut into
2 cp chunks of L = S / (2 cp) tokens, and cp rank r holds chunks r and 2 cp - 1 - r, in that order.
Under the causal mask chunk c attends to (c + 1) L keys, so every rank gets one early and one late
chunk and the same attention work, (2 cp + 1) L^2 key-query pairs.

Everything but attention is per token, so it runs on the local 2 L tokens unchanged (rotary takes the
tokens' global positions, which the caller splits like the tokens). Attention all-gathers K and V
over the cp group (one collective per layer for both) and reduce-scatters their gradients in
backward. An all-gather rather than a ring of K/V blocks because GLM's grouped-query K and V are
small: with 32 query heads and 2 KV groups, K and V of the whole sequence hold 4 heads per token
against the local q's 32 heads per local token, so for cp < 8 the gathered K and V take less memory
than q does, and one collective replaces 2 cp - 1 ring steps (Llama 3 made the same choice for its
context parallelism). Each local chunk c then attends to the keys [0, (c + 1) L): the attention
kernels align the causal mask bottom-right (query i sees keys j <= i + s_kv - s_q), which over that
prefix is exactly the global causal mask, so the kernels need no change and skip no more masked
blocks than unsharded attention does. Key padding masks and packed-sequence segment ids are gathered
once per forward (``gather_keys``); they are small integer tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.parallel import comm

_SEQ_DIM = 1


def local_chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of 2 cp sequence chunks that cp rank ``cp_rank`` holds, in local order."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp={cp})")
    return cp_rank, 2 * cp - 1 - cp_rank


def split_sequence(x: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """This cp rank's tokens of a batch-first tensor ``[b, S, ...]`` -> ``[b, S / cp, ...]``: chunks r and
    2 cp - 1 - r of 2 cp equal chunks along dim 1, concatenated (a copy; ``x`` itself when cp = 1)."""
    if cp == 1:
        return x
    s = x.shape[_SEQ_DIM]
    if s % (2 * cp) != 0:
        raise ValueError(f"context parallel: sequence length {s} (shape {tuple(x.shape)}) is not divisible by "
                         f"2 x cp = {2 * cp}; pad the sequences or change seq_length")
    chunks = x.chunk(2 * cp, dim=_SEQ_DIM)
    a, b = local_chunk_ids(cp, cp_rank)
    return torch.cat([chunks[a], chunks[b]], dim=_SEQ_DIM)


def _to_natural(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """``[cp, b, 2 L, ...]`` (rank-major, each rank's two chunks) -> ``[b, 2 cp L, ...]`` in sequence order."""
    g = gathered.unflatten(2, (2, -1))                    # [cp, b, 2, L, ...]
    early, late = g[:, :, 0], g.flip(0)[:, :, 1]          # chunks 0..cp-1, then cp..2cp-1
    full = torch.cat([early, late], dim=0)                # [2 cp, b, L, ...]
    return full.movedim(0, 1).flatten(1, 2)


def _to_ranks(full: torch.Tensor, cp: int) -> torch.Tensor:
    """Inverse of ``_to_natural``: ``[b, 2 cp L, ...]`` -> contiguous ``[cp, b, 2 L, ...]``."""
    chunks = full.unflatten(1, (2 * cp, -1)).movedim(1, 0)  # [2 cp, b, L, ...]
    pairs = torch.stack([chunks[:cp], chunks[cp:].flip(0)], dim=2)  # [cp, b, 2, L, ...]
    return pairs.flatten(2, 3).contiguous()


def _gather(x: torch.Tensor, cp, name: str = "cp") -> torch.Tensor:
    out = x.new_empty((cp.size * x.shape[0],) + tuple(x.shape[1:]))  # rank-major along the batch dim
    comm.all_gather_into(out, x.contiguous(), cp.group, cp.ledger, name)
    return _to_natural(out.unflatten(0, (cp.size, -1)), cp.size)


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the cp ranks' tokens into the whole sequence. Backward: every rank's gradient
    covers every token (its queries saw all the keys), so the gradients are summed and each rank keeps
    its own tokens' (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return _gather(x, cp)

    @staticmethod
    def backward(ctx, g):
        cp = ctx.cp
        ranked = _to_ranks(g, cp.size).flatten(0, 1)  # [cp b, 2 L, ...], rank-major
        out = ranked.new_empty((g.shape[0],) + tuple(ranked.shape[1:]))
        comm.reduce_scatter_into(out, ranked, cp.group, cp.ledger, "cp")
        return out, None


@dataclass(frozen=True)
class ContextParallel:
    """One rank's place in a cp group, for the model (``ModelSpec.context_parallel``)."""

    group: object
    size: int
    rank: int
    ledger: Optional[comm.CommLedger] = None

    @classmethod
    def of(cls, layout) -> Optional["ContextParallel"]:
        """The layout's cp group, or None when cp = 1."""
        if layout.cp_size == 1:
            return None
        return cls(layout.cp_group, layout.cp_size, layout.cp_rank, layout.ledger)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return split_sequence(x, self.size, self.rank)

    def gather_keys(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A per-token tensor without gradient (key padding mask, segment ids) ``[b, S/cp]`` -> ``[b, S]``."""
        if x is None:
            return None
        return self.gather_tokens(x)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every cp rank's values of its tokens ``[b, S/cp, ...]`` (no gradient) -> the whole rows'
        ``[b, S, ...]`` in sequence order (the inverse of ``split``; e.g. per-token scores)."""
        return _gather(x.detach(), self, "cp")

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local keys and values ``[b, S/cp, hkv, d]`` -> the whole sequence's, ``[b, S, hkv, d]`` each
        (one all-gather for both; gradients reduce-scattered back)."""
        kv = _GatherSequence.apply(torch.cat([k, v], dim=2), self)
        return kv.split([k.shape[2], v.shape[2]], dim=2)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  segment_ids: Optional[torch.Tensor], attend: Callable) -> torch.Tensor:
        """Causal attention of the local queries ``q [b, S/cp, hq, d]`` over the whole sequence's keys
        and values ``k, v [b, S, hkv, d]`` (``gather_kv``); ``attention_mask`` / ``segment_ids``:
        ``[b, S]`` (``gather_keys``) or None. ``attend(q, k, v, mask, segments)`` is the causal
        attention kernel. Returns ``[b, S/cp, hq, d]``."""
        length = q.shape[_SEQ_DIM] // 2
        if k.shape[_SEQ_DIM] != 2 * self.size * length:
            raise ValueError(f"context parallel attention: q {tuple(q.shape)} holds 2 chunks of {length} tokens, so "
                             f"k must hold 2 x cp={self.size} chunks, got {tuple(k.shape)}")
        outs = []
        for slot, chunk in enumerate(local_chunk_ids(self.size, self.rank)):
            end = (chunk + 1) * length  # this chunk's causal prefix; its queries are the prefix's last tokens
            outs.append(attend(q[:, slot * length:(slot + 1) * length], k[:, :end], v[:, :end],
                               None if attention_mask is None else attention_mask[:, :end],
                               None if segment_ids is None else segment_ids[:, :end]))
        return torch.cat(outs, dim=_SEQ_DIM)


__all__ = ["ContextParallel", "local_chunk_ids", "split_sequence"]
