"""Training: the step over a parallel layout, the learning-rate schedule and per-step metrics."""
from engine.train.lr import LRConfig, LRSchedule
from engine.train.metrics import MetricsWriter, StepMetrics
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer

__all__ = ["LRConfig", "LRSchedule", "MetricsWriter", "OptimizerConfig", "StepMetrics", "TrainConfig", "Trainer",
           "build_optimizer"]
