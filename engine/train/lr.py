"""Learning-rate schedule: linear warm-up, then cosine (or linear) decay to a floor.

    step < warmup:             lr = max_lr * (step + 1) / warmup
    warmup <= step < decay:    q = (step - warmup) / (decay - warmup)
                               cosine: lr = min_lr + (max_lr - min_lr) * (1 + cos(pi q)) / 2
                               linear: lr = max_lr - (max_lr - min_lr) q
    step >= decay:             lr = min_lr
``step`` counts optimizer steps from 0; ``decay_steps`` is where decay ends (None: the run's length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

STYLES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LRConfig:
    """Learning-rate schedule of a training run."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 3e-5
    """Floor the decay ends at."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps."""
    decay_steps: Optional[int] = None
    """Step at which the decay reaches min_lr (None: the number of training steps)."""
    style: str = "cosine"
    """Decay shape: cosine, linear or constant (no decay, warm-up still applies)."""

    def validate(self, train_steps: Optional[int] = None) -> "LRConfig":
        """ValueError naming every problem; ``train_steps`` is the run length (the default decay end)."""
        problems = []
        if train_steps is not None and train_steps < 0:
            problems.append(f"train_steps={train_steps} must be >= 0")
        if not self.lr >= 0 or not self.min_lr >= 0:
            problems.append(f"lr={self.lr} and min_lr={self.min_lr} must be >= 0")
        elif self.min_lr > self.lr:
            problems.append(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        if self.style not in STYLES:
            problems.append(f"style={self.style!r} must be one of {STYLES}")
        # an explicit decay end must follow warm-up; a run shorter than warm-up is fine (smoke tests)
        if self.decay_steps is not None and isinstance(self.warmup_steps, int) and self.decay_steps < self.warmup_steps:
            problems.append(f"decay_steps={self.decay_steps} is before the end of warm-up ({self.warmup_steps})")
        if problems:
            raise ValueError("invalid learning-rate schedule: " + "; ".join(problems))
        return self


class LRSchedule:
    """``schedule(step) -> lr`` for an ``LRConfig`` and the run length."""

    def __init__(self, config: LRConfig, train_steps: Optional[int] = None):
        self.config = config.validate(train_steps)
        self.decay_steps = config.decay_steps if config.decay_steps is not None else train_steps

    def __call__(self, step: int) -> float:
        c = self.config
        if step < 0:
            raise ValueError(f"learning-rate step {step} is negative")
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.style == "constant" or self.decay_steps is None:
            return c.lr
        if step >= self.decay_steps:
            return c.min_lr
        q = (step - c.warmup_steps) / max(1, self.decay_steps - c.warmup_steps)
        if c.style == "linear":
            return c.lr - (c.lr - c.min_lr) * q
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))
