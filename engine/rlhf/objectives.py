"""PPO's actor and critic losses as Trainer objectives (``engine.train.objectives``), so the PPO update
runs on the same Trainer, schedules and distributed optimizer as every other mode.

A rollout row is ``[prompt (left-padded to P) | response (right-padded to T)]``, ``S = P + T`` tokens.
Every per-token PPO quantity is stored ``[G, S]``, aligned with the position whose output concerns
it: response token j sits at sequence position ``P + j`` and is predicted by the logits (and valued
by the critic, "the state before token j") at position ``P + j - 1``. ``labels`` carries the
response token there and ``-100`` elsewhere (prompt, padding, filtered-out rows), so the mask of
every loss is ``labels != -100`` and N (the normalizer) is the number of response tokens that
train in the global batch. Under context parallelism each cp rank sums the loss of its own chunks of
the rows (``Trainer`` splits every ``[G, S]`` tensor alike): a token's loss reads its own position only,
except GSPO's, which also reads its response's mean log-ratio; every cp rank all-reduces those per-response
sums for every micro-batch, also when it holds none of the response tokens (``_sequence_log_ratio``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import kernels
from engine.model.glm import head_positions
from engine.parallel import comm
from engine.rlhf.core import kl_penalty, ppo_policy_loss, sequence_mean, value_loss
from engine.train.objectives import IGNORE_INDEX, record_vocab_parallel_loss


def _mask(mb: dict):
    return mb["labels"] != IGNORE_INDEX


def _at_outputs(mb: dict, key: str):
    """``mb[key] [b, S]`` at the head's n positions (``output_index``), as one row ``[1, n]`` (the PPO math
    in ``core`` takes ``[b, t]``)."""
    return mb[key].reshape(-1)[mb["output_index"]][None]


def _tokens(batch: dict) -> int:
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    if n == 0:
        raise ValueError("the PPO batch has no response token that trains (empty responses or every row "
                         "filtered out)")
    return n


def _sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, mb: dict,
                        layout) -> torch.Tensor:
    """GSPO's mean log(pi / pi_old) of each output token's sequence ``[1, n]``. A sequence is a row of the
    micro-batch, or with packing a (row, segment) pair. Under context parallelism the other cp ranks hold
    the rest of the same rows (the micro-batch's rows are the same rows on every cp rank), so the
    per-sequence sums are all-reduced over cp: every rank then weighs its tokens by the whole sequence's
    ratio."""
    rows, length = mb["labels"].shape
    span = length * layout.cp_size  # a whole row's tokens: segment ids are below it
    index = mb["output_index"] // length * span
    if "segment_ids" in mb:
        index = index + _at_outputs(mb, "segment_ids")[0].clamp(min=0)  # -1 only on padding, never trained

    def over_cp(totals: torch.Tensor) -> None:
        comm.all_reduce(totals, layout.cp_group, layout.ledger, "cp")

    return sequence_mean(logprobs.detach() - old_logprobs, mask, index[None], rows * span,
                         over_cp if layout.cp_size > 1 else None)


@dataclass(frozen=True)
class PolicyObjective:
    """Clipped PPO surrogate of the actor, summed over response tokens (``core.ppo_policy_loss``), plus
    ``kl_coef`` times the summed ``kl_kind`` estimate of KL(actor || reference) when ``kl_coef > 0`` (a
    loss on the rollout's samples, as GRPO: ``PPOConfig.kl_loss_coef``)
    (``core.kl_penalty``; the batch then carries the rollout's ``ref_logprobs``, and the stats its value
    as ``ref_kl``). Output: logits ``[n, v(/tp)]`` at the n response tokens that train only
    (``output_index``); log-probs of the sampled tokens under ``logits / temperature`` (the
    distribution the rollout sampled from), vocab-parallel under TP. ``clip_eps_high`` / ``dual_clip``: as in
    ``core.ppo_policy_loss``. ``weighted``: the batch carries ``token_weights`` (``core.loss_token_weights``
    of the global mini-batch), which scale each token's policy and KL loss: a sequence-level aggregation.
    ``entropy_coef``: an entropy bonus, minus this weight times the summed (weighted) entropy of the tempered
    distribution at the trained tokens. ``mode``: ``core.POLICY_LOSSES``; gspo's sequence ratios are
    computed per micro-batch (``_sequence_log_ratio``), so they hold for packed rows and under cp.
    ``rollout_is``: the batch carries ``rollout_is_weights`` (``core.truncated_importance_weights``), which
    scale each token's policy loss (not the entropy bonus or the KL term)."""

    clip_eps: float = 0.2
    temperature: float = 1.0
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    clip_eps_high: Optional[float] = None
    dual_clip: float = 0.0
    weighted: bool = False
    entropy_coef: float = 0.0
    mode: str = "ppo"
    rollout_is: bool = False
    name = "policy"
    optional_keys = ("position_ids", "segment_ids")  # packed sequences (PPOConfig.pack_sequences)
    rows_per_sample = 1
    context_parallel = True  # a per-token sum (gspo: after a per-response all-reduce over cp, _sequence_log_ratio)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        keys = ("input_ids", "attention_mask", "labels", "old_logprobs", "advantages")
        return (keys + ("ref_logprobs",) * (self.kl_coef > 0) + ("token_weights",) * self.weighted
                + ("rollout_is_weights",) * self.rollout_is)

    @property
    def stat_names(self) -> tuple[str, ...]:
        names = ("clipfrac", "approx_kl", "entropy")
        return names + ("ref_kl",) * (self.kl_coef > 0) + ("dual_clipfrac",) * (self.dual_clip > 0)

    def normalizer(self, batch: dict) -> int:
        return _tokens(batch)

    def model_inputs(self, mb: dict) -> dict:
        return {**mb, "output_index": head_positions(_mask(mb))}

    def loss_and_stats(self, logits, mb, layout, backend):
        labels = _at_outputs(mb, "labels")
        mask = labels != IGNORE_INDEX  # all True but for the stand-in row of an empty selection
        if self.temperature != 1.0:
            logits = logits / self.temperature
        group = None
        if layout.tp_size > 1:
            group = layout.tp_group
            record_vocab_parallel_loss(layout, labels.numel(), with_entropy=True)
        logprobs, entropy = kernels.token_logprobs(logits[None], labels.clamp(min=0), group=group,
                                                   return_entropy=True, backend=backend)
        weights = _at_outputs(mb, "token_weights") if self.weighted else None
        policy_weights = weights
        if self.rollout_is:  # a correction of the policy gradient's sampling distribution: on that loss only
            is_weights = _at_outputs(mb, "rollout_is_weights")
            policy_weights = is_weights if weights is None else weights * is_weights
        old_logprobs = _at_outputs(mb, "old_logprobs")
        sequence_log_ratio = (_sequence_log_ratio(logprobs, old_logprobs, mask, mb, layout) if self.mode == "gspo"
                              else None)
        loss, stats = ppo_policy_loss(logprobs, old_logprobs, _at_outputs(mb, "advantages"), mask,
                                      self.clip_eps, reduction="sum", clip_eps_high=self.clip_eps_high,
                                      dual_clip=self.dual_clip, weights=policy_weights, mode=self.mode,
                                      sequence_log_ratio=sequence_log_ratio)
        entropy_sum = torch.where(mask, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
        out = [stats["clipfrac"], stats["approx_kl"], entropy_sum.detach().sum()]
        if self.entropy_coef > 0:  # a bonus: higher entropy lowers the loss (keeps the policy exploring)
            loss = loss - self.entropy_coef * (entropy_sum * (1.0 if weights is None else weights)).sum()
        if self.kl_coef > 0:
            ref_logprobs = _at_outputs(mb, "ref_logprobs")
            if weights is not None:  # the loss term aggregated like the policy loss; the stat stays per token
                loss = loss + self.kl_coef * kl_penalty(logprobs, ref_logprobs, mask, self.kl_kind, reduction="sum",
                                                        weights=weights)
                with torch.no_grad():
                    ref_kl = kl_penalty(logprobs, ref_logprobs, mask, self.kl_kind, reduction="sum")
            else:
                ref_kl = kl_penalty(logprobs, ref_logprobs, mask, self.kl_kind, reduction="sum")
                loss = loss + self.kl_coef * ref_kl
            out.append(ref_kl.detach())
        if self.dual_clip > 0:
            out.append(stats["dual_clipfrac"])
        return loss, out


@dataclass(frozen=True)
class ValueObjective:
    """Clipped value loss of the critic, summed over response tokens (``core.value_loss``). Output: the
    scalar head's values ``[b, S]``."""

    clip_eps: float = 0.2
    name = "value"
    batch_keys = ("input_ids", "attention_mask", "labels", "old_values", "returns")
    optional_keys = ("position_ids", "segment_ids")
    rows_per_sample = 1
    stat_names = ("vf_clipfrac",)
    context_parallel = True  # a per-token sum (the value of the state before each response token)

    def normalizer(self, batch: dict) -> int:
        return _tokens(batch)

    def model_inputs(self, mb: dict) -> dict:
        return mb

    def loss_and_stats(self, values, mb, layout, backend):
        loss, stats = value_loss(values, mb["old_values"], mb["returns"], _mask(mb), self.clip_eps, reduction="sum")
        return loss, [stats["vf_clipfrac"]]


__all__ = ["PolicyObjective", "ValueObjective"]
