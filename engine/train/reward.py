"""Reward-model training (ChatGLM-RLHF recipe, arXiv 2404.00934): pairwise ranking loss plus an L2
penalty on the reward scores, trained on ``PreferenceDataset`` batches.

Loss of a global batch of G pairs (r_c, r_r: the scalar rewards ``[G]`` of chosen / rejected):

    L = mean_i( -log sigmoid(r_c[i] - r_r[i]) ) + coef * mean_i( r_c[i]^2 + r_r[i]^2 )

The penalty is a zero-mean Gaussian prior on the scores: it keeps them from drifting (the ranking
loss only sees differences), so rewards stay on a comparable scale across RM checkpoints for PPO.

Chosen and rejected rows go through ONE forward (concatenated along the batch). Each micro-batch
backpropagates ``L_mb_mean * rows_mb * dp / G`` so that, after the ``DistributedOptimizer``'s DP
average, the gradient equals dL/dw of the single-process full-batch loss. Under TP every TP rank
holds the full [b] rewards (the trunk's row-parallel outputs are all-reduced), so every rank
computes the same loss. Pipeline parallelism is not supported here: the engine's pipeline
schedules end in the Trainer's token-level cross entropy and offer no pluggable loss yet.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.parallel import comm


# ---- pure functions -------------------------------------------------------------------------------

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
    is ``2 * coef * r_c[i] / b``."""
    _check_pair(chosen_rewards, rejected_rewards)
    if not coef >= 0:
        raise ValueError(f"reward L2 penalty coef must be >= 0, got {coef}")
    return coef * (chosen_rewards.float().pow(2) + rejected_rewards.float().pow(2)).mean()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``r_c > r_r`` (ties count as wrong). ``[b], [b] -> scalar``."""
    _check_pair(chosen_rewards, rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean()


# ---- trainer --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardConfig:
    """Batch shape and loss options of a reward-model run."""

    global_batch_size: int = 8
    """Preference pairs per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Pairs per forward/backward pass on one rank (2x rows: chosen + rejected)."""
    l2_coef: float = 1e-3
    """Coefficient of the L2 penalty on reward scores."""
    train_steps: int = 100
    eval_interval: int = 0
    """Evaluate every this many steps (0: never, inside ``fit``)."""

    def validate(self, dp: int) -> "RewardConfig":
        problems = []
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            problems.append(f"global_batch_size={self.global_batch_size} and micro_batch_size="
                            f"{self.micro_batch_size} must be >= 1")
        elif self.global_batch_size % (self.micro_batch_size * dp):
            problems.append(f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size="
                            f"{self.micro_batch_size} x dp={dp}")
        if not self.l2_coef >= 0:
            problems.append(f"l2_coef={self.l2_coef} must be >= 0")
        if problems:
            raise ValueError("invalid reward-model run: " + "; ".join(problems))
        return self


PAIR_KEYS = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")


class RewardModelTrainer:
    """Trains a ``GLMForScalarHead`` (single process, or TP x DP via ``build_parallel_model``).

    ``optimizer``: a ``DistributedOptimizer`` over the model (``step.build_optimizer([model], ...)``);
    ``lr``: step -> learning rate (``lr.LRSchedule``). Every rank passes the same global batch
    (collated ``PreferenceDataset`` items, ``[G, s]`` tensors for the ``PAIR_KEYS``).
    """

    def __init__(self, model, optimizer, layout, config: RewardConfig, lr: Callable[[int], float]):
        if getattr(layout, "pp_size", 1) != 1:
            raise ValueError(f"RewardModelTrainer supports pp=1 only, got pp={layout.pp_size}")
        self.model, self.optimizer, self.layout = model, optimizer, layout
        self.config = config.validate(layout.dp_size)
        self.lr = lr
        self.steps_done = 0
        self.device = next(model.parameters()).device

    def microbatches(self, batch: dict) -> list[dict]:
        """This DP rank's micro-batches of the global batch."""
        G = self.config.global_batch_size
        for k in PAIR_KEYS:
            if k not in batch:
                raise ValueError(f"preference batch lacks {k!r} (has {sorted(batch)})")
            if batch[k].shape[0] != G:
                raise ValueError(f"{k} has {batch[k].shape[0]} rows, expected global_batch_size={G}")
        rows = G // self.layout.dp_size
        lo = self.layout.dp_rank * rows
        mine = {k: torch.as_tensor(batch[k])[lo:lo + rows].to(self.device) for k in PAIR_KEYS}
        m = self.config.micro_batch_size
        return [{k: v[i:i + m] for k, v in mine.items()} for i in range(0, rows, m)]

    def rewards(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of chosen and rejected rows concatenated: ``([b], [b])`` rewards."""
        ids = torch.cat([mb["chosen_input_ids"], mb["rejected_input_ids"]])
        mask = torch.cat([mb["chosen_attention_mask"], mb["rejected_attention_mask"]])
        r = self.model.reward(ids, mask)
        b = mb["chosen_input_ids"].shape[0]
        return r[:b], r[b:]

    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        comm.all_reduce(t, self.layout.dp_group, self.layout.ledger, "metrics")
        return t.tolist()

    def train_step(self, batch: dict) -> dict:
        """One optimizer step; returns loss, ranking_loss, l2_penalty, accuracy (global means),
        grad_norm, lr, seconds."""
        t0 = time.perf_counter()
        G, dp, coef = self.config.global_batch_size, self.layout.dp_size, self.config.l2_coef
        self.model.train()
        self.optimizer.zero_grad()
        sums = [0.0, 0.0, 0.0]  # ranking, penalty, correct: sums over this rank's pairs
        for mb in self.microbatches(batch):
            rc, rr = self.rewards(mb)
            b = rc.shape[0]
            rank_loss = pairwise_ranking_loss(rc, rr)
            penalty = reward_l2_penalty(rc, rr, coef)
            ((rank_loss + penalty) * (b * dp / G)).backward()
            sums[0] += rank_loss.item() * b
            sums[1] += penalty.item() * b
            sums[2] += preference_accuracy(rc.detach(), rr.detach()).item() * b
        self.optimizer.finish_grad_sync()
        lr = float(self.lr(self.steps_done))
        grad_norm, skipped = self.optimizer.step(lr=lr)
        ranking, penalty, correct = (v / G for v in self._reduce(sums))
        self.steps_done += 1
        return {"step": self.steps_done - 1, "loss": ranking + penalty, "ranking_loss": ranking,
                "l2_penalty": penalty, "accuracy": correct, "grad_norm": float(grad_norm), "lr": lr,
                "skipped": bool(skipped), "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Held-out ranking loss, accuracy and mean reward margin of a global batch (no update)."""
        self.model.eval()
        sums = [0.0, 0.0, 0.0]
        for mb in self.microbatches(batch):
            rc, rr = self.rewards(mb)
            b = rc.shape[0]
            sums[0] += pairwise_ranking_loss(rc, rr).item() * b
            sums[1] += preference_accuracy(rc, rr).item() * b
            sums[2] += (rc - rr).float().mean().item() * b
        G = self.config.global_batch_size
        loss, acc, margin = (v / G for v in self._reduce(sums))
        self.model.train()
        return {"eval_ranking_loss": loss, "eval_accuracy": acc, "eval_margin": margin}

    def fit(self, batches, eval_batch: Optional[dict] = None, log: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Run ``train_steps`` steps over an iterable of global batches, evaluating on ``eval_batch``
        every ``eval_interval`` steps and after the last one. Returns every step's record."""
        records = []
        it = iter(batches)
        for _ in range(self.config.train_steps):
            rec = self.train_step(next(it))
            k = self.config.eval_interval
            last = self.steps_done == self.config.train_steps
            if eval_batch is not None and ((k and self.steps_done % k == 0) or last):
                rec.update(self.evaluate(eval_batch))
            if log is not None:
                log(rec)
            records.append(rec)
        return records


__all__ = ["RewardConfig", "RewardModelTrainer", "load_reward_run", "pairwise_ranking_loss", "preference_accuracy", "reward_l2_penalty"]


def load_reward_run(path):
    """Parse an RM run YAML (model, reward, optim, lr, log_dir) into
    ``(GLMConfig, RewardConfig, OptimizerConfig, LRConfig, log_dir)``."""
    from engine.train.lr import LRConfig
    from engine.config import config_section, model_from_spec
    from engine.train.sft import read_run_yaml
    from engine.train.step import OptimizerConfig
    raw = read_run_yaml(path, {"model", "reward", "optim", "lr", "log_dir", "data"})
    reward = config_section(RewardConfig, raw.get("reward"), "reward")
    lr = config_section(LRConfig, raw.get("lr"), "lr").validate(reward.train_steps)
    return (model_from_spec(raw.get("model", "tiny")), reward, config_section(OptimizerConfig, raw.get("optim"), "optim"),
            lr, raw.get("log_dir"))
