"""Parallel layouts, communication, tensor-parallel layers and state-dict sharding.

Nothing here is global: build a ``ParallelLayout`` and pass it to whatever needs groups.
"""
from engine.parallel.comm import CommLedger
from engine.parallel.dims import ParallelDims, ParallelLayout

__all__ = ["CommLedger", "ParallelDims", "ParallelLayout"]
