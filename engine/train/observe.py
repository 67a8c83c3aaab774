"""Watching a run: a rank-0 progress bar, a TensorBoard writer that degrades to a warning, and MFU.

FLOPs per token of a GLM decoder (Megatron's counting: 2 FLOPs per multiply-add; h hidden, d head
dim, hq query heads, hkv KV groups, f FFN width, V vocab, s sequence length, L layers):

    weights per layer    2 * (h*(hq + 2*hkv)*d      fused QKV
                              + hq*d*h               attention output
                              + 3*h*f)               SwiGLU: gate, up (h x 2f) and down (f x h)
    attention per layer  2 * 2 * s * hq * d          QK^T and PV, every query against s keys
    forward              L * (weights + attention) + 2*h*V   (LM head)
    training             3 x forward (backward = 2 x forward)
                         + recompute: "full" re-runs the L layers' forward (+1 x layers),
                           "selective" re-runs the attention core (+1 x attention)

Choice: the attention term counts the full s x s score matrix, as Megatron's MFU formula does; pass
``causal=True`` to halve it (the work a causal kernel that skips masked blocks actually does).
Biases, norms, rotary and softmax are ignored (< 1% at GLM sizes). Peak memory comes from
``engine.train.metrics.peak_memory`` (CUDA only).
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

from engine.config import GLMConfig

RECOMPUTE = ("none", "full", "selective")


def flops_per_token(config: GLMConfig, seq_length: int, recompute: str = "none", causal: bool = False,
                    training: bool = True, lm_head: bool = True, lora=None) -> float:
    """Model FLOPs per token of one training step (or one forward when ``training=False``);
    ``lm_head=False`` for a scalar-head model (reward model / critic: an [h, 1] head instead of [h, V]).
    ``lora`` (a ``LoRAConfig`` with rank > 0): the weights are frozen, so a step computes their forward and
    input gradient but no weight gradient (2x instead of 3x; a scalar head still trains), plus the adapters'
    own matmuls (3x)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} must be one of {RECOMPUTE}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    h, f, V, L = config.hidden_size, config.ffn_hidden_size, config.vocab_size, config.num_layers
    hq, hkv = config.num_attention_heads, config.num_kv_groups
    d = config.head_dim if config.head_dim is not None else h // hq
    weights = 2 * (h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * f)
    attention = 2 * 2 * seq_length * hq * d * (0.5 if causal else 1.0)
    head = 2 * h * (V if lm_head else 1)
    adapters = 0
    if lora is not None and lora.enabled:  # 2 r (in + out) per adapted projection
        sizes = {"qkv": h + (hq + 2 * hkv) * d, "dense": hq * d + h, "gate_up": h + 2 * f, "down": f + h}
        adapters = 2 * lora.rank * sum(sizes[t] for t in lora.targets)
    if not training:
        return float(L * (weights + adapters + attention) + head)
    if adapters:  # a scalar head (reward model, critic) trains beside its adapters; an LM's output layer is frozen
        total = 2 * L * weights + (2 if lm_head else 3) * head + 3 * L * (adapters + attention)
    else:
        total = 3 * (L * (weights + attention) + head)
    if recompute == "full":
        total += L * (weights + adapters + attention)
    elif recompute == "selective":
        total += L * attention
    return float(total)


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak FLOP/s."""
    if not peak_flops_per_device > 0 or num_devices < 1:
        raise ValueError(f"peak_flops_per_device={peak_flops_per_device} must be > 0 and num_devices="
                         f"{num_devices} >= 1")
    return tokens_per_s * flops_per_token_ / (peak_flops_per_device * num_devices)


class ProgressBar:
    """tqdm bar over training steps showing loss and tokens/s (tqdm gives the ETA). Enabled only on
    rank 0 and when stderr is a terminal (``force`` overrides the tty check, never the rank)."""

    def __init__(self, total_steps: int, rank: int = 0, force: Optional[bool] = None, stream=None):
        stream = sys.stderr if stream is None else stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = rank == 0 and (tty if force is None else bool(force))
        self._bar = None
        if self.enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, file=stream, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self._bar is None:
            return
        post = {}
        if "loss" in record:
            post["loss"] = f"{record['loss']:.4f}"
        if "tokens_per_s" in record:
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_TB_WARNED = False


class TensorBoardLogger:
    """Scalars of step records to TensorBoard on rank 0. Without the ``tensorboard`` package it
    warns once and does nothing (training must not crash for want of a dashboard)."""

    def __init__(self, log_dir, rank: int = 0):
        global _TB_WARNED
        self.writer = None
        if rank != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # ImportError, or a broken tensorboard install
            if not _TB_WARNED:
                warnings.warn(f"TensorBoard logging disabled ({e}); pip install tensorboard to enable it")
                _TB_WARNED = True
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict, step: Optional[int] = None) -> None:
        if self.writer is None:
            return
        step = int(record.get("step", 0) if step is None else step)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["ProgressBar", "TensorBoardLogger", "flops_per_token", "mfu"]
