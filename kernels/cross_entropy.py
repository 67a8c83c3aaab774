"""Cross entropy and per-token log-probabilities over (optionally vocab-sharded) logits.

    loss_t = logsumexp(z_t) - z_t[label_t]        logprob_t = -loss_t
    entropy_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import TORCH, check_floating, resolve_backend


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    check_floating("cross_entropy", "logits", logits)
    if labels.is_floating_point():
        raise TypeError(f"cross_entropy: labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"cross_entropy: logits shape {tuple(logits.shape)} must be labels shape "
                         f"{tuple(labels.shape)} + [vocab]")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, group=None,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Mean (or sum / per-token 'none') cross entropy over tokens whose label != ignore_index."""
    _check(logits, labels)
    backend = resolve_backend("cross_entropy", backend, logits)
    if backend == TORCH and group is None:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                               reduction=reduction).reshape(labels.shape if reduction == "none" else ())
    raise NotImplementedError(f"cross_entropy: backend {backend!r} with group={group} is not implemented yet")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, group=None, return_entropy: bool = False,
                   backend: str = "auto"):
    """log p(label) per token, fp32, shape ``labels.shape``; with entropy when asked."""
    _check(logits, labels)
    backend = resolve_backend("token_logprobs", backend, logits)
    if backend == TORCH and group is None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if not return_entropy:
            return out
        return out, -(logp.exp() * logp).sum(-1)
    raise NotImplementedError(f"token_logprobs: backend {backend!r} with group={group} is not implemented yet")
