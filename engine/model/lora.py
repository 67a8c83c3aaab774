"""LoRA adapters on the GLM block's projections (Hu et al. 2021): ``y = x W^T + (alpha / r) x A^T B^T``.

``add_lora(model, LoRAConfig(rank=8))`` freezes every weight of the model and gives each targeted
projection (``qkv``, ``dense``, ``gate_up``, ``down``) a trainable ``lora`` adapter: ``A [r, in]``
(uniform in +-1/sqrt(in), as PEFT's kaiming init) and ``B [out, r]`` (zeros, so the adapted model starts
equal to the base model). Parameter names: ``layers.i.attention.qkv.lora.A`` / ``.lora.B``.

Tensor parallelism adds no communication to the forward and backward passes. An adapter is the low-rank
factorisation of its projection's local shard, so ``B @ A`` always has the local weight's shape:

    column-parallel (qkv, gate_up)  A [r, in] whole on every TP rank, B [out/tp, r] sharded like W's rows
                                    (per KV group for qkv, per half for gate_up)
    row-parallel (dense, down)      A [r, in/tp] sharded like W's columns, B [out, r] whole; the low-rank
                                    product joins the partial product before the TP reduction

The factor held whole on every TP rank gets only a partial gradient on each (column: its output rows'
share; row: its input columns' share): it is marked ``sequence_parallel`` so the optimizer all-reduces
its gradient over TP with the sequence-parallel ones (``tensor_parallel.mark_lora``), once per step: r x
(in + out) values per projection, next to nothing.

Because the reference model of DPO or PPO is the base model, ``lora_disabled(model)`` runs the model
without its adapters: no second copy of the weights. ``merge_lora_(model)`` folds ``scale * B @ A`` into
each weight (shard by shard, no communication) and removes the adapters, e.g. before sampling or export.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import GLMConfig

# target -> the projection's module path inside a layer; the column-parallel ones hold whole inputs
LORA_TARGETS = {"qkv": "attention.qkv", "dense": "attention.dense", "gate_up": "mlp.gate_up", "down": "mlp.down"}
COLUMN_TARGETS = ("qkv", "gate_up")


@dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their rank and scale."""

    rank: int = 0
    """Adapter rank r; 0: no adapters (full fine-tuning)."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank."""
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    """Projections that get an adapter: any of qkv, dense, gate_up, down."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            problems.append(f"rank={self.rank!r} must be a non-negative integer (0: no adapters)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"alpha={self.alpha!r} must be a positive number")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
            problems.append(f"targets={targets!r} must be a non-empty list of {list(LORA_TARGETS)}")
        else:
            unknown = [t for t in targets if t not in LORA_TARGETS]
            if unknown or len(set(targets)) != len(targets):
                problems.append(f"targets={list(targets)} must name each of {list(LORA_TARGETS)} at most once")
        if problems:
            raise ValueError("invalid lora config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    def check_flags(self, alpha_given: bool, targets_given: bool) -> None:
        """ValueError when a launcher's --lora-alpha / --lora-targets were given but no adapters are trained."""
        if (alpha_given or targets_given) and not self.enabled:
            raise ValueError("--lora-alpha / --lora-targets shape LoRA adapters, but lora.rank is 0 (no adapters): "
                             "add --lora-rank R")

    @classmethod
    def from_dict(cls, raw: Optional[dict]) -> "LoRAConfig":
        """From a run YAML's ``lora:`` section (or a checkpoint's record of it); unknown keys are errors."""
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"lora: expected a mapping of rank, alpha, targets, got {type(raw).__name__}")
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"rank", "alpha", "targets"})
        if unknown:
            raise ValueError(f"unknown lora keys {unknown}: expected rank, alpha, targets")
        if isinstance(raw.get("targets"), list):
            raw["targets"] = tuple(raw["targets"])
        return cls(**raw).validate()


class LoRAAdapter(nn.Module):
    """``x [..., in] -> scale * (x A^T) B^T`` ``[..., out]``: the low-rank update of one projection (shard)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale
        self.enabled = True  # lora_disabled() turns it off: the base model's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, in={self.A.shape[1]}, out={self.B.shape[0]}, scale={self.scale:g}"


def folded(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale * B @ A`` (``[out, in]``: a weight, or its shard with the factors' shards), summed in
    fp32 and rounded once to the weight's dtype: a new tensor."""
    return (weight.float() + scale * (B.float() @ A.float())).to(weight.dtype)


def lora_shapes(config: GLMConfig, lora: LoRAConfig) -> dict[str, tuple[int, int]]:
    """Full (unsharded) shapes of every adapter factor of a model, by parameter name."""
    h, f, r = config.hidden_size, config.ffn_hidden_size, lora.rank
    sizes = {"qkv": (h, config.qkv_size), "dense": (config.num_attention_heads * config.kv_channels, h),
             "gate_up": (h, 2 * f), "down": (f, h)}  # (in, out)
    shapes = {}
    for i in range(config.num_layers):
        for target in lora.targets:
            fan_in, fan_out = sizes[target]
            name = f"layers.{i}.{LORA_TARGETS[target]}.lora."
            shapes[name + "A"], shapes[name + "B"] = (r, fan_in), (fan_out, r)
    return shapes


def full_lora_init(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The full fp32 initial value of an adapter factor, drawn from a generator seeded by (seed, name) so
    every layout starts from the same adapters: ``A`` uniform in +-1/sqrt(in), ``B`` zeros."""
    if name.endswith(".B"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def _chunks(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]


def _target(name: str, targets) -> Optional[str]:
    """The LoRA target a module name (``layers.i.attention.qkv``) is, if it is one of ``targets``."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "layers":
        return None
    path = ".".join(parts[2:])
    return next((t for t in targets if LORA_TARGETS[t] == path), None)


@torch.no_grad()
def add_lora(model, lora: LoRAConfig, layout=None, seed: int = 0, keep_trainable: tuple[str, ...] = ()
             ) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` (a model or this rank's pipeline chunks) but those whose names
    start with ``keep_trainable`` (e.g. ``("value_head.",)``: a reward model's or critic's fresh head) and
    give each targeted projection an adapter, initialised layout-independently from ``seed``
    (``full_lora_init``; ``layout``: the model's ``ParallelLayout``, None for a single-process model).
    Returns the trainable parameters. Call after ``mark_parameters`` (build_parallel_model /
    build_model_chunks)."""
    from engine.parallel.sharding import tp_slice
    from engine.parallel.tensor_parallel import mark_lora
    lora.validate()
    if not lora.enabled:
        raise ValueError("add_lora needs lora.rank > 0")
    tp, tp_rank = (layout.tp_size, layout.tp_rank) if layout is not None else (1, 0)
    trainable = []
    for chunk in _chunks(model):
        if any(isinstance(m, LoRAAdapter) for m in chunk.modules()):
            raise ValueError("the model already has LoRA adapters")
        for name, p in chunk.named_parameters():
            p.requires_grad_(name.startswith(keep_trainable))
            if p.requires_grad:
                trainable.append(p)
        shapes = lora_shapes(chunk.config, lora)
        for name, module in list(chunk.named_modules()):
            target = _target(name, lora.targets)
            if target is None:
                continue
            if not hasattr(module, "lora"):
                raise TypeError(f"{name} ({type(module).__name__}) cannot hold a LoRA adapter")
            out_features, in_features = module.weight.shape  # this rank's shard
            adapter = LoRAAdapter(in_features, out_features, lora.rank, lora.scale).to(module.weight.device,
                                                                                         module.weight.dtype)
            for factor in ("A", "B"):
                full = full_lora_init(f"{name}.lora.{factor}", shapes[f"{name}.lora.{factor}"], seed)
                getattr(adapter, factor).copy_(tp_slice(f"{name}.lora.{factor}", full, chunk.config, tp, tp_rank))
            if hasattr(module.weight, "tensor_parallel"):  # a tensor-parallel layer
                mark_lora(module, adapter, column=target in COLUMN_TARGETS)
            module.lora = adapter
            trainable += [adapter.A, adapter.B]
    if not any(isinstance(m, LoRAAdapter) for chunk in _chunks(model) for m in chunk.modules()):
        raise ValueError(f"no projection of the model matches lora targets {list(lora.targets)}")
    return trainable


def attach_adapters(model: nn.Module, record: dict) -> None:
    """Give ``model``'s projections named by ``record`` (``lora_record``: rank, scale, targets) empty adapters
    (uninitialised, unmarked) for ``load_state_dict`` to fill: e.g. a generation copy built on the meta
    device from resharded tensors. Call under the device the model was built on."""
    for name, module in list(model.named_modules()):
        if _target(name, record["targets"]) is not None:
            out_features, in_features = module.weight.shape
            module.lora = LoRAAdapter(in_features, out_features, record["rank"], record["scale"])


def adapters(model) -> list[LoRAAdapter]:
    return [m for chunk in _chunks(model) for m in chunk.modules() if isinstance(m, LoRAAdapter)]


def has_lora(model) -> bool:
    return bool(adapters(model))


def lora_record(model) -> Optional[dict]:
    """What a checkpoint records of ``model``'s adapters (None without any): ``{"rank", "scale",
    "targets"}``, checked when a run resumes and used to merge them when another run starts from it."""
    found = {}
    for chunk in _chunks(model):
        for name, module in chunk.named_modules():
            if isinstance(module, LoRAAdapter):
                found[_target(name[:-len(".lora")], LORA_TARGETS)] = (module.A.shape[0], module.scale)
    if not found:
        return None
    (rank, scale), = set(found.values())
    return {"rank": rank, "scale": scale, "targets": sorted(found)}


@contextlib.contextmanager
def lora_disabled(model) -> Iterator[None]:
    """Run ``model`` as its base model (adapters skipped): the frozen reference of DPO / PPO."""
    found = adapters(model)
    before = [a.enabled for a in found]  # nested uses restore what they found
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a, enabled in zip(found, before):
            a.enabled = enabled


def merge_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict with its adapter factors folded into the weights they adapt
    (``W + scale * B @ A`` in fp32, rounded once to W's dtype) and removed: what ``merge_lora_`` gives
    a model, for a state dict (exporting a LoRA checkpoint)."""
    out = {k: v for k, v in state.items() if ".lora." not in k}
    for name in sorted(k for k in state if k.endswith(".lora.A")):
        projection = name[:-len(".lora.A")]
        if projection + ".lora.B" not in state or projection + ".weight" not in state:
            raise ValueError(f"{name}: the state dict lacks {projection}.lora.B or {projection}.weight")
        out[projection + ".weight"] = folded(state[projection + ".weight"], state[name], state[projection + ".lora.B"],
                                             scale)
    if any(k.endswith(".lora.B") and k[:-1] + "A" not in state for k in state):
        raise ValueError("the state dict holds a lora.B factor without its lora.A")
    return out


@torch.no_grad()
def merge_lora_(model) -> nn.Module:
    """Fold every adapter into its weight (``W += scale * B @ A``, in fp32, rounded once to W's dtype) and
    remove the adapters; the model computes the same function with plain projections. Returns ``model``."""
    for chunk in _chunks(model):
        for module in chunk.modules():
            adapter = getattr(module, "lora", None)
            if isinstance(adapter, LoRAAdapter):
                module.weight.copy_(folded(module.weight, adapter.A, adapter.B, adapter.scale))
                module.lora = None
    return model


__all__ = ["COLUMN_TARGETS", "LORA_TARGETS", "LoRAAdapter", "LoRAConfig", "add_lora", "adapters", "attach_adapters",
           "folded", "full_lora_init", "has_lora", "lora_disabled", "lora_record", "lora_shapes", "merge_lora_",
           "merge_state_dict"]
