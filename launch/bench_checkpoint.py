"""Checkpoint saves: how long training is blocked by a synchronous save vs an asynchronous one.

    python -m launch.bench checkpoint [--config tiny] [--saves 6] [--dtype fp32] [--dir DIR]
                                      [--distributed-optimizer] [--json FILE]

One process builds the model and its optimizer (fp32 master weights and both moments) and saves
``--saves`` times each way into ``--dir`` (default: a temp dir, removed after): ``save_checkpoint``
(training waits for the whole write, fsync and commit) and ``AsyncCheckpointer.save`` (training waits
for the copy to host memory; the write runs in a background thread, waited for here after each save so
the two never overlap). Reports medians and the bytes of one checkpoint. On a GPU node the background
write overlaps GPU compute on otherwise idle cores; on a CPU-only run it competes with training for
the same cores, so the overlap is not free there.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(config_name: str, saves: int, mixed_precision: str, directory: Path, zero: bool) -> dict:
    from engine.config import GLMConfig
    from engine.model.glm import GLMForCausalLM
    from engine.optim import DistributedOptimizer
    from engine.parallel import ParallelLayout
    from engine.train.checkpoint import AsyncCheckpointer, save_checkpoint
    config = GLMConfig.preset(config_name) if not config_name.endswith(".yaml") else GLMConfig.from_yaml(config_name)
    layout = ParallelLayout.single()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = GLMForCausalLM(config).to(device)
    optimizer = DistributedOptimizer(model.named_parameters(), layout, lr=1e-3, use_distributed_optimizer=zero,
                                     mixed_precision=mixed_precision)
    saver = AsyncCheckpointer(layout)
    sync, blocked, written = [], [], []
    try:
        for step in range(1, saves + 1):
            t0 = time.perf_counter()
            save_checkpoint(directory / "sync", step, model, optimizer, layout, config, keep_last=1)
            sync.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            saver.save(directory / "async", step, model, optimizer, layout, config, keep_last=1)
            blocked.append(time.perf_counter() - t0)
            saver.wait()
            written.append(time.perf_counter() - t0)
    finally:
        saver.close()
    return {"config": config.name, "device": str(device), "mixed_precision": mixed_precision, "saves": saves,
            "checkpoint_bytes": _dir_bytes(directory / "sync" / f"step_{saves:06d}"),
            "sync_s": statistics.median(sync), "async_blocked_s": statistics.median(blocked),
            "async_written_s": statistics.median(written)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="model preset or YAML")
    p.add_argument("--saves", type=int, default=6)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameters (bf16: fp32 master weights)")
    p.add_argument("--dir", help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.saves < 1:
        p.error(f"--saves must be >= 1, got {args.saves}")
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        r = bench(args.config, args.saves, args.dtype, directory, args.distributed_optimizer)
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"{r['config']} ({r['checkpoint_bytes'] / 2**20:.1f} MiB per checkpoint, {r['mixed_precision']}, "
          f"{r['device']}), median of {r['saves']}: sync save blocks {r['sync_s']:.3f} s; async save blocks "
          f"{r['async_blocked_s']:.3f} s ({r['sync_s'] / r['async_blocked_s']:.1f}x less), its background write "
          f"is committed {r['async_written_s']:.3f} s after it starts")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
