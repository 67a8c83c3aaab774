"""Plot a run's curves: ``python -m launch.plot RUN_DIR [--out DIR]``.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON record per step, ``engine.train.metrics.MetricsWriter``)
and writes one PNG per known key present (loss, lr, grad norm, throughput, and RLHF/RM keys such as
reward, kl, win rate, accuracy) into ``--out`` (default RUN_DIR/plots).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# known keys -> (file stem, y label); the first key of a group that is present is used per plot
PLOTS = {
    "loss": ("loss", "loss"),
    "eval_loss": ("eval_loss", "eval loss"),
    "lr": ("lr", "learning rate"),
    "grad_norm": ("grad_norm", "grad norm"),
    "tokens_per_s": ("throughput", "tokens / s"),
    "mfu": ("mfu", "MFU"),
    "reward": ("reward", "reward"),
    "reward_vs_reference": ("reward_vs_reference", "reward - reference answer's reward"),
    "eval_reward": ("eval_reward", "held-out reward"),
    "eval_win_rate": ("eval_win_rate", "held-out win rate vs the reference (by the reward)"),
    "eval_best_reward": ("eval_best_reward", "held-out best-of-k reward"),
    "kl": ("kl", "KL"),
    "response_length": ("response_length", "response tokens"),
    "value_loss": ("value_loss", "critic value loss"),
    "win_rate": ("win_rate", "win rate"),
    "accuracy": ("accuracy", "preference accuracy"),
    "eval_accuracy": ("eval_accuracy", "held-out accuracy"),
    "margin": ("margin", "reward margin (chosen - rejected)"),
    "eval_margin": ("eval_margin", "held-out reward margin"),
}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory that holds metrics.jsonl")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not JSON ({e})") from None
    if not records:
        raise ValueError(f"{path} is empty: no step records to plot")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", i))
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write the PNGs; returns their paths. ValueError if no known key has a numeric value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    written = []
    for key, (stem, label) in PLOTS.items():
        xs, ys = _series(records, key)
        if not ys:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="." if len(ys) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{run_dir.name}: {label}")
        ax.grid(alpha=0.3)
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if not written:
        keys = sorted({k for r in records for k in r})
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no known numeric key; known: {sorted(PLOTS)}; "
                         f"found: {keys}")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
