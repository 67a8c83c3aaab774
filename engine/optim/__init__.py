"""Optimizers over a parallel layout."""
from engine.optim.distributed import DistributedOptimizer

__all__ = ["DistributedOptimizer"]
