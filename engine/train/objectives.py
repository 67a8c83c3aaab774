"""Training objectives: what the Trainer's last pipeline stage computes from the model's head output.

An objective says which tensors a global batch holds, turns a micro-batch into model inputs, names
the count N the loss is averaged over (tokens that take loss for a language model, preference
pairs for a reward model), and returns, for one micro-batch, the SUM of the per-unit losses plus
summed statistics. The Trainer backpropagates ``sum * dp / N``; the DistributedOptimizer averages
gradients over DP, so the synced gradient is dL/dw of the single-process full-batch mean loss for
every objective, whatever the micro-batch split, DP degree or pipeline schedule.

    LanguageModelObjective  pretraining and SFT: token cross entropy (vocab-parallel under TP)
    RewardObjective         reward model: pairwise ranking loss + L2 penalty on the scores
    DPOObjective            direct preference optimization against a frozen reference's log-probs
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

import kernels
from engine.model.glm import head_positions

IGNORE_INDEX = -100
STAT_BYTES = 4  # the vocab-parallel loss reduces fp32 per-row statistics


class Objective(Protocol):
    name: str
    batch_keys: tuple[str, ...]
    """Tensors every global batch must hold, each ``[global_batch_size, seq_length]``."""
    optional_keys: tuple[str, ...]
    """Tensors passed through when present (same shape)."""
    rows_per_sample: int
    """Model rows per batch row (2 for a reward model: chosen and rejected in one forward)."""
    context_parallel: bool
    """Whether the loss is a sum over tokens each cp rank can take on its own chunks."""
    stat_names: tuple[str, ...]
    """Statistics reported besides the loss, each a sum over units divided by N."""

    def normalizer(self, batch: dict) -> int: ...

    def model_inputs(self, mb: dict) -> dict: ...

    def loss_and_stats(self, output: torch.Tensor, mb: dict, layout, backend: str
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


def record_vocab_parallel_loss(layout, rows: int, with_entropy: bool = False) -> None:
    """Record the traffic of ``kernels.cross_entropy`` / ``token_logprobs(..., group=tp)``, which call
    torch.distributed directly (kernels do not depend on ``engine.parallel``): an all-reduce (max) of
    the [rows] row maxima and one of the packed [2, rows] (sum of exponentials, label logit; [3, rows]
    with the entropy's weighted sum), fp32 (kernel module doc). The backward is local."""
    for numel in (rows, (3 if with_entropy else 2) * rows):
        traffic = 2.0 * (layout.tp_size - 1) / layout.tp_size * numel * STAT_BYTES
        layout.ledger.record("tp", "all_reduce", traffic, traffic)


@dataclass(frozen=True)
class LanguageModelObjective:
    """Mean next-token cross entropy over the labels that are not ``ignore_index`` (pretraining: every
    token; SFT: assistant turns only). Output: logits ``[n, v(/tp)]`` at those positions only
    (``output_index``: the output layer skips the rest); under TP they stay vocab-sharded and the
    kernel exchanges per-row statistics, never the logits."""

    ignore_index: int = IGNORE_INDEX
    name = "lm"
    batch_keys = ("input_ids", "labels")
    optional_keys = ("attention_mask", "position_ids", "segment_ids")  # the last two: packed sequences
    rows_per_sample = 1
    stat_names = ()
    context_parallel = True  # per-token loss: each cp rank sums its own tokens

    def normalizer(self, batch: dict) -> int:
        n = int((batch["labels"] != self.ignore_index).sum())
        if n == 0:
            raise ValueError("the global batch has no token that takes loss (every label is ignore_index)")
        return n

    def model_inputs(self, mb: dict) -> dict:
        return {**mb, "output_index": head_positions(mb["labels"] != self.ignore_index)}

    def loss_and_stats(self, logits, mb, layout, backend):
        labels = mb["labels"].reshape(-1)[mb["output_index"]]
        if layout.tp_size == 1:
            return kernels.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum",
                                         backend=backend), []
        loss = kernels.cross_entropy(logits, labels, ignore_index=self.ignore_index, group=layout.tp_group,
                                     reduction="sum", backend=backend)
        record_vocab_parallel_loss(layout, labels.numel())
        return loss, []


# ---- reward model (ChatGLM-RLHF recipe, arXiv 2404.00934) -------------------------------------------

def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} rewards must both be "
                         "[b] with the same b")
    if chosen.numel() == 0:
        raise ValueError("empty batch of reward pairs")


def pairwise_ranking_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss ``mean_i -log sigmoid(r_c[i] - r_r[i])``.

    chosen_rewards, rejected_rewards: ``[b]``. Returns a scalar (fp32 math; logsigmoid is stable
    for large margins)."""
    _check_pair(chosen_rewards, rejected_rewards)
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def reward_l2_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """L2 penalty on the scores: ``coef * mean_i(r_c[i]^2 + r_r[i]^2)``.

    chosen_rewards, rejected_rewards: ``[b]``; coef >= 0. Returns a scalar. Gradient w.r.t. r_c[i]
    is ``2 * coef * r_c[i] / b``. A zero-mean Gaussian prior on the scores: the ranking loss only
    sees differences, so without it the scores drift and PPO rewards change scale between RM runs."""
    _check_pair(chosen_rewards, rejected_rewards)
    if not coef >= 0:
        raise ValueError(f"reward L2 penalty coef must be >= 0, got {coef}")
    return coef * (chosen_rewards.float().pow(2) + rejected_rewards.float().pow(2)).mean()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``r_c > r_r`` (ties count as wrong). ``[b], [b] -> scalar``."""
    _check_pair(chosen_rewards, rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean()


PAIR_KEYS = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")


@dataclass(frozen=True)
class RewardObjective:
    """Pairwise ranking loss plus ``l2_coef`` times the L2 penalty on the scores, averaged over the pairs
    of the global batch. Chosen and rejected rows of a micro-batch go through ONE forward
    (concatenated along the batch: ``[2b, s]``, or with ``pack`` their sequences packed into as few rows
    as hold them, ``batches.pack_padded_rows``); the head computes the scalar values at each sequence's
    last real token only (``output_index``): ``[2b]``, chosen then rejected, full on every TP rank.

    Stats (means over pairs): ranking_loss, l2_penalty, accuracy, margin (r_c - r_r), chosen_reward,
    rejected_reward."""

    l2_coef: float = 1e-3
    """Coefficient of the L2 penalty on reward scores."""
    pack: bool = False
    """Pack each micro-batch's 2b sequences into as few rows as hold them (segment ids: no attention
    across sequences; positions restart per sequence): the same scores for less padding compute. The
    row count then varies per micro-batch, so pipeline stages (fixed-shape messages) need pack off."""
    name = "reward"
    batch_keys = PAIR_KEYS
    optional_keys = ()
    rows_per_sample = 2
    context_parallel = False  # reads each row's last token, wherever it falls
    stat_names = ("ranking_loss", "l2_penalty", "accuracy", "margin", "chosen_reward", "rejected_reward")

    def __post_init__(self):
        if not self.l2_coef >= 0:
            raise ValueError(f"reward.l2_coef={self.l2_coef} must be >= 0")
        if not isinstance(self.pack, bool):
            raise ValueError(f"reward.pack={self.pack!r} must be true or false")

    def normalizer(self, batch: dict) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def model_inputs(self, mb: dict) -> dict:
        from engine.model.glm import last_token_index
        from engine.train.batches import pack_padded_rows
        ids = torch.cat([mb["chosen_input_ids"], mb["rejected_input_ids"]])
        mask = torch.cat([mb["chosen_attention_mask"], mb["rejected_attention_mask"]])
        n, s = ids.shape
        empty = (mask.sum(1) == 0).nonzero()
        if empty.numel():
            i = int(empty[0])
            raise ValueError(f"preference pair {i % (n // 2)}: its {'chosen' if i < n // 2 else 'rejected'} sequence "
                             "has no token (attention_mask all 0)")
        last = last_token_index(ids, mask)
        if not self.pack:
            return {**mb, "input_ids": ids, "attention_mask": mask,
                    "output_index": torch.arange(n, device=ids.device) * s + last}
        # each sequence's index at its last token travels with the tokens; its packed flat position is read back
        marker = torch.full_like(ids, -1)
        marker[torch.arange(n, device=ids.device), last] = torch.arange(n, device=ids.device)
        packed = pack_padded_rows({"input_ids": ids, "attention_mask": mask, "marker": marker}, fill={"marker": -1})
        flat = packed.pop("marker").reshape(-1)
        at = (flat >= 0).nonzero().squeeze(1)
        return {**mb, **packed, "output_index": at[flat[at].argsort()]}

    def rewards(self, values: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Head outputs ``[2b]`` at the sequences' last tokens -> (chosen ``[b]``, rejected ``[b]``) rewards."""
        b = mb["chosen_input_ids"].shape[0]
        return values[:b], values[b:]

    def loss_and_stats(self, values, mb, layout, backend):
        rc, rr = self.rewards(values, mb)
        b = rc.shape[0]
        ranking = pairwise_ranking_loss(rc, rr) * b
        penalty = reward_l2_penalty(rc, rr, self.l2_coef) * b
        rc, rr = rc.detach().float(), rr.detach().float()
        stats = [ranking.detach(), penalty.detach(), preference_accuracy(rc, rr) * b, (rc - rr).sum(), rc.sum(),
                 rr.sum()]
        return ranking + penalty, stats


# ---- direct preference optimization (Rafailov et al. 2023) -------------------------------------------

DPO_KEYS = PAIR_KEYS + ("chosen_labels", "rejected_labels")
DPO_REFERENCE_KEYS = ("ref_chosen_logprobs", "ref_rejected_logprobs")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
PREFERENCE_LOSSES = DPO_LOSSES + ("simpo",)  # DPOObjective.loss_type


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss per pair of DPO or a sibling, on the pair's log-ratio margin ``h = (log pi - log pi_ref)(y_c)
    - (log pi - log pi_ref)(y_r)``, with the implicit rewards ``r = beta (log pi(y|x) - log pi_ref(y|x))``:

        sigmoid  DPO (Rafailov 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                 (eps = ``label_smoothing``: the conservative DPO of Mitchell 2023 for noisy labels)
        ipo      IPO (Azar 2023): (h - 1 / (2 beta))^2, which pulls the margin toward 1 / (2 beta) (from
                 either side) instead of driving it to infinity on deterministic preferences
        hinge    SLiC-HF's calibration loss (Zhao 2023): max(0, 1 - beta h)

    chosen, rejected: ``[b]`` log-ratios ``log pi - log pi_ref`` summed over the chosen / rejected answer's
    tokens (carrying the policy's gradient; IPO too takes sums, as in its paper, where TRL averages per
    token). Returns ``(loss [b], r_c [b], r_r [b])``, fp32, the rewards detached."""
    _check_pair(chosen, rejected)
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo loss_type={loss_type!r} must be one of {DPO_LOSSES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} is conservative DPO, for loss_type sigmoid only "
                         f"(got {loss_type!r})")
    rc = beta * chosen.float()
    rr = beta * rejected.float()
    margin = rc - rr
    if loss_type == "ipo":
        loss = (margin / beta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - margin)
    else:
        loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, rc.detach(), rr.detach()


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO's loss per pair (Meng 2024): no reference model; the implicit reward is the policy's average
    log-probability per answer token, ``r = beta / |y| log pi(y|x)``, and the chosen answer must win by the
    target margin ``gamma``:

        loss = -log sigmoid(r_c - r_r - gamma)

    chosen, rejected: ``[b]`` mean log-probs of the chosen / rejected answers' tokens (carrying the policy's
    gradient). Returns ``(loss [b], r_c [b], r_r [b])``, fp32, the rewards detached."""
    _check_pair(chosen, rejected)
    rc = beta * chosen.float()
    rr = beta * rejected.float()
    return -F.logsigmoid(rc - rr - gamma), rc.detach(), rr.detach()


@dataclass(frozen=True)
class DPOObjective:
    """DPO (``dpo_loss``) summed over the pairs of a micro-batch. Chosen and rejected rows go through ONE
    forward (``[2b, s]``); the head computes logits only at the positions whose next token is part of an
    answer (``chosen_labels`` / ``rejected_labels`` != -100: the prompt is not scored), vocab-parallel
    under TP. The batch carries the frozen reference's log-probs of the same tokens at the same positions
    (``ref_chosen_logprobs`` / ``ref_rejected_logprobs`` ``[B, S]``, 0 elsewhere: ``launch.train`` computes
    them with the reference model before each step), except under ``loss_type="simpo"`` (``simpo_loss``),
    which needs no reference model.

    Stats (means over pairs): accuracy (r_c > r_r), margin (r_c - r_r), chosen_reward, rejected_reward."""

    beta: float = 0.1
    """Strength of the KL constraint to the reference (larger: stay closer); for simpo the scale of the mean
    log-prob rewards, which must be far larger than DPO's (about 2: at 0.1 the loss stays near log 2)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO, loss_type sigmoid); 0: plain DPO."""
    loss_type: str = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` or ``hinge`` (SLiC): ``dpo_loss``; ``simpo``: ``simpo_loss``, reference-free."""
    gamma: float = 0.0
    """simpo: the target reward margin (in reward units, like beta x a mean log-prob; tuned with beta)."""
    offload_reference: bool = False
    """``launch.train``: keep the frozen reference in host memory between its forwards (brought in for each
    batch's log-probs, then sent back: a copy of its weights each way per step for one model less on the
    device while the policy trains)."""
    name = "dpo"
    optional_keys = ()
    rows_per_sample = 2
    context_parallel = False  # sums over each answer's tokens
    stat_names = ("accuracy", "margin", "chosen_reward", "rejected_reward")

    def __post_init__(self):
        if not 0 < self.beta < float("inf"):
            raise ValueError(f"dpo.beta={self.beta} must be > 0 and finite")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"dpo.loss_type={self.loss_type!r} must be one of {PREFERENCE_LOSSES}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} is conservative DPO: it needs loss_type "
                             f"sigmoid, not {self.loss_type!r}")
        if not isinstance(self.offload_reference, bool) or (self.offload_reference and not self.uses_reference):
            raise ValueError(f"dpo.offload_reference={self.offload_reference!r} must be true or false, and needs a "
                             f"reference (loss_type {self.loss_type!r})")
        if not 0 <= self.gamma < float("inf") or (self.gamma and self.loss_type != "simpo"):
            raise ValueError(f"dpo.gamma={self.gamma} is SimPO's target margin: >= 0 and finite, with loss_type "
                             f"simpo (got {self.loss_type!r})")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a frozen reference model (all but SimPO)."""
        return self.loss_type != "simpo"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return DPO_KEYS + DPO_REFERENCE_KEYS * self.uses_reference

    def normalizer(self, batch: dict) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def model_inputs(self, mb: dict) -> dict:
        ids = torch.cat([mb["chosen_input_ids"], mb["rejected_input_ids"]])
        labels = torch.cat([mb["chosen_labels"], mb["rejected_labels"]])
        answered = (labels != IGNORE_INDEX).any(1)
        if not bool(answered.all()):
            i = int((~answered).nonzero()[0])
            b = ids.shape[0] // 2
            raise ValueError(f"preference pair {i % b}: its {'chosen' if i < b else 'rejected'} answer has no token "
                             "to score (empty, or cut off by seq_length)")
        out = {**mb, "input_ids": ids, "labels": labels,
               "attention_mask": torch.cat([mb["chosen_attention_mask"], mb["rejected_attention_mask"]]),
               "output_index": head_positions(labels != IGNORE_INDEX)}
        if self.uses_reference:
            out["ref_logprobs"] = torch.cat([mb["ref_chosen_logprobs"], mb["ref_rejected_logprobs"]])
        return out

    @staticmethod
    def token_logprobs(logits: torch.Tensor, mb: dict, layout, backend: str) -> torch.Tensor:
        """Log-probs ``[n]`` fp32 of the answer tokens from the head's logits ``[n, v(/tp)]`` at ``output_index``
        (vocab-parallel under TP)."""
        labels = mb["labels"].reshape(-1)[mb["output_index"]]
        group = None
        if layout.tp_size > 1:
            group = layout.tp_group
            record_vocab_parallel_loss(layout, labels.numel())
        return kernels.token_logprobs(logits[None], labels[None], group=group, backend=backend)[0].float()

    def reference_logprobs(self, trainer, reference, batch: dict) -> dict:
        """``{"ref_chosen_logprobs", "ref_rejected_logprobs"}`` ``[B, S]`` of a global DPO ``batch`` (``DPO_KEYS``)
        under the frozen ``reference`` chunks, built for the trainer's layout: its per-token log-probs of the
        answer tokens at the positions that predict them, 0 elsewhere (``Trainer.forward_outputs``:
        forward-only, the same on every rank)."""
        B, S = batch["chosen_input_ids"].shape
        zeros = torch.zeros(B, S)
        prepared = {**batch, "ref_chosen_logprobs": zeros, "ref_rejected_logprobs": zeros}
        backend = reference[-1].spec.kernels.cross_entropy

        def per_token(logits: torch.Tensor, mb: dict) -> torch.Tensor:
            rows = mb["labels"].shape[0]
            out = torch.zeros(rows * S, dtype=torch.float32, device=logits.device)
            out[mb["output_index"]] = self.token_logprobs(logits, mb, trainer.layout, backend)
            return out.view(2, rows // 2, S).transpose(0, 1)  # [b, 2, S]: chosen and rejected of each pair

        out = trainer.forward_outputs(reference, prepared, per_token, (2, S))
        return {"ref_chosen_logprobs": out[:, 0].cpu(), "ref_rejected_logprobs": out[:, 1].cpu()}

    def loss_and_stats(self, logits, mb, layout, backend):
        index = mb["output_index"]
        rows = index // mb["labels"].shape[1]
        per_token = self.token_logprobs(logits, mb, layout, backend)
        if self.uses_reference:
            # log pi - log pi_ref per token, then summed per answer: identical forwards give margins of exactly 0
            per_token = per_token - mb["ref_logprobs"].reshape(-1)[index].float()
        sums = torch.zeros(mb["labels"].shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows,
                                                                                                       per_token)
        b = sums.shape[0] // 2
        if self.uses_reference:
            loss, rc, rr = dpo_loss(sums[:b], sums[b:], self.beta, self.label_smoothing, self.loss_type)
        else:  # SimPO: the mean log-prob of each answer's tokens
            means = sums / (mb["labels"] != IGNORE_INDEX).sum(1).clamp(min=1)
            loss, rc, rr = simpo_loss(means[:b], means[b:], self.beta, self.gamma)
        stats = [preference_accuracy(rc, rr) * b, (rc - rr).sum(), rc.sum(), rr.sum()]
        return loss.sum(), stats


__all__ = ["DPO_KEYS", "dpo_loss", "DPO_LOSSES", "DPO_REFERENCE_KEYS", "DPOObjective", "LanguageModelObjective",
           "Objective", "PAIR_KEYS", "pairwise_ranking_loss", "preference_accuracy", "PREFERENCE_LOSSES",
           "record_vocab_parallel_loss", "reward_l2_penalty", "RewardObjective", "simpo_loss"]
