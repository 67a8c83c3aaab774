"""Benchmarks: ``python -m launch.bench {model,kernels,static,gpu,train,data,rlhf,checkpoint} [options]``.

Each suite lives in its own module (``launch/bench_<suite>.py``) with a ``main(argv)``; this file only
dispatches, so suites can be read and run on their own.
"""
from __future__ import annotations

import importlib
import sys

SUITES = {
    "model": "launch.bench_model",      # engine vs transformers forward / generate (CPU or GPU)
    "kernels": "launch.bench_kernels",  # per-op fwd/bwd time, bandwidth, FLOP/s vs torch, compile, Liger
    "static": "launch.bench_static",    # registers, spills, shared memory, occupancy per kernel (no GPU needed)
    "gpu": "launch.bench_gpu",          # lent GPU: build csrc, kernel tests on CUDA, kernel benchmarks; one JSON
    "train": "launch.bench_train",      # tokens/s and MFU per parallel layout, vs transformers step
    "data": "launch.bench_data",        # preprocessing throughput, sample-index build C++ vs Python
    "rlhf": "launch.bench_rlhf",        # PPO iteration phases (generate, score, update) per TP x DP layout
    "checkpoint": "launch.bench_checkpoint",  # training blocked by a synchronous vs an asynchronous save
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(__doc__.strip())
        print("suites: " + ", ".join(SUITES))
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    suite = argv.pop(0)
    module = importlib.import_module(SUITES[suite])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
