"""Full <-> tensor/pipeline-parallel state dicts, by engine name (see engine/model/hf_adapter.py).

Tensor-parallel rules (tp ranks, rank r; hq query heads, g KV groups, d head dim, f ffn, v vocab):

    embedding.weight, output_layer.weight   rows [r v/tp, (r+1) v/tp)                       (vocab parallel)
    layers.i.attention.qkv.weight / .bias   rows [q_r | k_r | v_r] of the fused [q | k | v]:
                                            q_r = query heads [r hq/tp, (r+1) hq/tp);
                                            tp <= g: KV heads [r g/tp, (r+1) g/tp);
                                            tp >  g: the ONE KV head r // (tp/g), replicated on
                                                     the tp/g consecutive ranks sharing it
    layers.i.attention.dense.weight         columns [r hq d/tp, (r+1) hq d/tp)
    layers.i.mlp.gate_up.weight             rows [gate_r | up_r], each [r f/tp, (r+1) f/tp) of its half
    layers.i.mlp.down.weight                columns [r f/tp, (r+1) f/tp)
    *norm.weight, value_head.*              replicated
    <qkv|gate_up>.lora.A, <dense|down>.lora.B   replicated (LoRA factors, engine/model/lora.py)
    <qkv|gate_up>.lora.B                    rows, as the projection's weight
    <dense|down>.lora.A                     columns, as the projection's weight

Pipeline: a stage holds ``layers.i.*`` for its layer indices, ``embedding.*`` on the first chunk,
``final_norm.*`` / ``output_layer.*`` / ``value_head.*`` on the last.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import GLMConfig
from engine.parallel import comm

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_VOCAB_ROWS = ("embedding.weight", "output_layer.weight")
_PRE = ("embedding.",)
_POST = ("final_norm.", "output_layer.", "value_head.")


# ---- QKV row arithmetic (shared with the QKV column-parallel layer) -------------------------------
def kv_heads_of_rank(config: GLMConfig, tp: int, tp_rank: int) -> range:
    """Global KV head indices held by ``tp_rank``."""
    g = config.num_kv_groups
    if tp <= g:
        per = g // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank // (tp // g)
    return range(head, head + 1)


def kv_replication(config: GLMConfig, tp: int) -> int:
    """How many TP ranks hold each KV head (1 when tp <= num_kv_groups)."""
    return max(1, tp // config.num_kv_groups)


def qkv_local_rows(config: GLMConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """Row indices (into the full fused [q | k | v] projection) held by ``tp_rank``, in local order."""
    d, hq, g = config.kv_channels, config.num_attention_heads, config.num_kv_groups
    per_q = hq // tp
    q = torch.arange(tp_rank * per_q * d, (tp_rank + 1) * per_q * d)
    heads = kv_heads_of_rank(config, tp, tp_rank)
    kv = torch.arange(heads.start * d, heads.stop * d)
    return torch.cat([q, hq * d + kv, (hq + g) * d + kv])


def _role(name: str) -> str:
    m = _LAYER_RE.match(name)
    rest = m.group(2) if m else name
    if name in _VOCAB_ROWS:
        return "vocab"
    if ".lora." in rest:  # an adapter factor: B shares its projection's output rows, A its input columns
        projection, factor = rest.rsplit(".lora.", 1)
        column = {"attention.qkv": "qkv", "mlp.gate_up": "gate_up"}.get(projection)
        if projection not in ("attention.qkv", "mlp.gate_up", "attention.dense", "mlp.down") or factor not in ("A", "B"):
            raise ValueError(f"no tensor-parallel rule for state-dict entry {name!r}")
        if factor == "A":
            return "replicated" if column else "columns"
        return column or "replicated"
    if rest.startswith("attention.qkv."):
        return "qkv"
    if rest == "attention.dense.weight" or rest == "mlp.down.weight":
        return "columns"
    if rest == "mlp.gate_up.weight":
        return "gate_up"
    if rest.endswith("norm.weight") or name.startswith("value_head."):
        return "replicated"
    raise ValueError(f"no tensor-parallel rule for state-dict entry {name!r}")


def _split(t: torch.Tensor, dim: int, tp: int, r: int, name: str) -> torch.Tensor:
    if t.shape[dim] % tp != 0:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(t.shape)} is not divisible by tp={tp}")
    return t.chunk(tp, dim=dim)[r]


def tp_slice(name: str, full: torch.Tensor, config: GLMConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of the full tensor ``name`` (contiguous copy when sliced)."""
    if tp == 1:
        return full
    role = _role(name)
    if role == "replicated":
        return full
    if role == "vocab":
        return _split(full, 0, tp, tp_rank, name).contiguous()
    if role == "columns":
        return _split(full, 1, tp, tp_rank, name).contiguous()
    if role == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([_split(gate, 0, tp, tp_rank, name), _split(up, 0, tp, tp_rank, name)])
    return full.index_select(0, qkv_local_rows(config, tp, tp_rank).to(full.device))


def tp_unslice(name: str, shards: list[torch.Tensor], config: GLMConfig) -> torch.Tensor:
    """Inverse of ``tp_slice``: the full tensor from the shards of every TP rank (rank order).
    Replicated pieces (norms, replicated KV heads) are taken from the first rank holding them."""
    tp = len(shards)
    if tp == 1:
        return shards[0]
    role = _role(name)
    if role == "replicated":
        return shards[0]
    if role == "vocab":
        return torch.cat(shards, dim=0)
    if role == "columns":
        return torch.cat(shards, dim=1)
    if role == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    full = shards[0].new_empty((config.qkv_size,) + tuple(shards[0].shape[1:]))
    for r in reversed(range(tp)):  # reversed: rank 0 of a replica group writes replicated KV rows last
        full[qkv_local_rows(config, tp, r).to(full.device)] = shards[r]
    return full


# ---- which entries a pipeline chunk holds ---------------------------------------------------
def _held(name: str, layer_indices: Optional[set], pre_process: bool, post_process: bool) -> bool:
    m = _LAYER_RE.match(name)
    if m:
        return layer_indices is None or int(m.group(1)) in layer_indices
    if name.startswith(_PRE):
        return pre_process
    if name.startswith(_POST):
        return post_process
    raise ValueError(f"state-dict entry {name!r} belongs to no pipeline stage")


def shard_state_dict(full_sd: dict[str, torch.Tensor], config: GLMConfig, layout,
                     layer_indices: Optional[Iterable[int]] = None, pre_process: Optional[bool] = None,
                     post_process: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """Full engine state dict -> this rank's local tensors.

    ``layer_indices`` (a pipeline chunk's blocks) keeps only those layers; ``pre_process`` /
    ``post_process`` default to "first / last pipeline stage" when ``layer_indices`` is given (pass
    them explicitly for virtual-pipeline chunks), and to True otherwise.
    """
    layers = None if layer_indices is None else set(layer_indices)
    if pre_process is None:
        pre_process = layers is None or layout.is_first_stage
    if post_process is None:
        post_process = layers is None or layout.is_last_stage
    return {k: tp_slice(k, v, config, layout.tp_size, layout.tp_rank)
            for k, v in full_sd.items() if _held(k, layers, pre_process, post_process)}


def gather_full_state_dict(local: Union[nn.Module, dict[str, torch.Tensor]], config: GLMConfig,
                           layout) -> dict[str, torch.Tensor]:
    """Inverse of ``shard_state_dict`` over TP and PP: every rank gets the full state dict.

    ``local`` is a model (its state dict) or any dict of local tensors keyed by engine name (e.g.
    gradients). Collective over the TP and PP groups of ``layout``; with several virtual-pipeline
    chunks per rank, pass one dict holding all of this rank's chunks.
    """
    sd = local.state_dict() if isinstance(local, nn.Module) else dict(local)
    names = sorted(sd)
    # TP: every rank of a TP group holds the same names with the same local shapes.
    tp_full = {}
    for k in names:
        t = sd[k].detach()
        stacked = comm.all_gather(t.contiguous().unsqueeze(0), 0, layout.tp_group, layout.ledger, "tp")
        tp_full[k] = tp_unslice(k, list(stacked.unbind(0)), config)
    return _gather_stages(tp_full, layout, "pp")


def _gather_stages(local: dict[str, torch.Tensor], layout, category: str) -> dict[str, torch.Tensor]:
    """Every stage's tensors on every rank of this rank's PP group (stages hold different names).

    Names, shapes and dtypes are shared first; then each stage broadcasts its tensors packed into one
    flat buffer per dtype, so a stage costs one collective per dtype, not one per tensor (hundreds
    of layers' worth of small launches on NCCL). Received tensors are views of those buffers; this
    rank's own tensors are returned as they are. Bytes received: the other stages' tensors, recorded
    under ``category``. Collective over the PP group; a no-op at pp = 1."""
    if layout.pp_size == 1:
        return dict(local)
    meta = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(local.items())]
    metas: list = [None] * layout.pp_size
    dist.all_gather_object(metas, meta, group=layout.pp_group)
    device = next(iter(local.values())).device if local else torch.device("cpu")
    out = {}
    for stage, stage_meta in enumerate(metas):
        src = layout.pp_ranks[stage]
        for dtype in sorted({d for _, _, d in stage_meta}):
            entries = [(k, shape) for k, shape, d in stage_meta if d == dtype]
            if stage == layout.pp_rank:
                flat = torch.cat([local[k].detach().reshape(-1) for k, _ in entries])
            else:
                flat = torch.empty(sum(math.prod(shape) for _, shape in entries), dtype=getattr(torch, dtype),
                                   device=device)
            flat = comm.broadcast(flat, src, layout.pp_group, layout.ledger, category)
            if stage == layout.pp_rank:
                out.update((k, local[k]) for k, _ in entries)
                continue
            for (k, shape), piece in zip(entries, flat.split([math.prod(shape) for _, shape in entries])):
                out[k] = piece.view(shape)
    return out


@torch.no_grad()
def reshard_tp(local: Union[nn.Module, dict[str, torch.Tensor]], config: GLMConfig, src, dst) -> dict[str, torch.Tensor]:
    """This rank's tensors on layout ``dst`` (tensor parallel degree tp_dst) from its tensors on ``src``
    (tp_src, a multiple of tp_dst; this stage's tensors when pp > 1): ``dst`` is
    ``ParallelLayout.for_generation(src, tp_dst)``, whose TP rank j needs only the shards of src TP ranks [f
    j, f j + f), f = tp_src / tp_dst, i.e. its src TP subgroup of size f. Each tensor is all-gathered over
    that subgroup ((f - 1) x the local bytes received, ledger category "reshard"; a QKV tensor whose KV head
    is replicated over source ranks moves each head it lacks once, ``_gather_replicated_qkv``) and the
    rows/columns of dst's shard are picked from the gathered ones. Which full index each shard holds comes
    from ``tp_slice`` itself (applied to an index probe), so every sharding rule (vocab rows, [gate | up],
    QKV per KV group with replicated KV heads, columns) is handled by the code that defines it. Collective
    over the subgroup."""
    tp_src, tp_dst = src.tp_size, dst.tp_size
    if tp_src % tp_dst != 0:
        raise ValueError(f"reshard_tp: tp {tp_src} -> {tp_dst}: the target degree must divide the source one")
    f = tp_src // tp_dst
    j = src.tp_rank // f
    if dst.tp_rank != j:
        raise ValueError(f"reshard_tp: source TP rank {src.tp_rank} becomes target TP rank {j}, but the target layout "
                         f"says {dst.tp_rank}; build it with ParallelLayout.for_generation")
    group, _ = src.tp_subgroup(f)
    members = range(f * j, f * j + f)  # src TP ranks gathered, in the subgroup's rank order
    sd = local.state_dict() if isinstance(local, nn.Module) else dict(local)
    out = {}
    for name in sorted(sd):
        t = sd[name].detach()
        role = _role(name)
        if f == 1 or role == "replicated":
            out[name] = t
            continue
        dim = 1 if role == "columns" else 0
        full_size = config.qkv_size if role == "qkv" else t.shape[dim] * tp_src
        probe = torch.arange(full_size).unsqueeze(1 - dim)  # [n, 1] or [1, n]: the full index along dim
        rep = kv_replication(config, tp_src)
        if role == "qkv" and rep > 1 and (f % rep == 0 or rep % f == 0):
            gathered, held = _gather_replicated_qkv(t, name, probe, config, src, group, members)
        else:
            gathered = comm.all_gather(t.contiguous().unsqueeze(0), 0, group, src.ledger, "reshard").unbind(0)
            held = torch.cat([tp_slice(name, probe, config, tp_src, r).flatten() for r in members])
        wanted = tp_slice(name, probe, config, tp_dst, j).flatten()
        position = torch.full((full_size,), -1, dtype=torch.long)
        position[held] = torch.arange(held.numel())
        pick = position[wanted]
        if (pick < 0).any():  # cannot happen for the rules above; guards a new rule that breaks the grouping
            raise RuntimeError(f"reshard_tp: {name}: target TP rank {j} of {tp_dst} needs indices that source TP "
                               f"ranks {list(members)} of {tp_src} do not hold")
        out[name] = torch.cat(gathered, dim).index_select(dim, pick.to(t.device))
    return out


def _gather_replicated_qkv(t: torch.Tensor, name: str, probe: torch.Tensor, config: GLMConfig, src, group,
                           members: range) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``reshard_tp``'s gather for a QKV tensor whose KV head is replicated over r = tp_src / groups
    consecutive source ranks, when the subgroup's f ranks and the heads' blocks of r ranks align (r a
    multiple of f, or f of r; other cases all-gather, duplicates included): only what the target shard
    lacks moves. The query rows are all-gathered over the subgroup. When r is a multiple of f the whole
    subgroup holds one head, the rank's own; when f is a multiple of r it holds f / r whole blocks, and
    each rank receives each other head once, from the rank holding it at its own offset in that head's
    block (pairwise exchange). Returns (pieces, the full row index of their concatenation)."""
    tp_src = src.tp_size
    r = kv_replication(config, tp_src)
    q_rows = config.num_attention_heads // tp_src * config.kv_channels
    q, kv = t[:q_rows], t[q_rows:]  # this rank's query heads; its one KV head's [k | v] rows
    pieces = list(comm.all_gather(q.contiguous().unsqueeze(0), 0, group, src.ledger, "reshard").unbind(0))
    rows = {m: tp_slice(name, probe, config, tp_src, m).flatten() for m in members}
    held = [rows[m][:q_rows] for m in members]
    mine = kv_heads_of_rank(config, tp_src, src.tp_rank).start
    holder = {kv_heads_of_rank(config, tp_src, m).start: m for m in members}  # a subgroup rank holding each head
    heads = sorted(holder)
    received, sends, recvs = {mine: kv}, [], []
    for h in heads:  # head h is held by source TP ranks [h r, (h + 1) r)
        if h != mine:
            peer = src.tp_ranks[h * r + src.tp_rank % r]
            received[h] = torch.empty_like(kv)
            sends.append((kv, peer))
            recvs.append((received[h], peer))
    for work in comm.batch_send_recv(sends, recvs, group, src.ledger, "reshard"):
        work.wait()
    for h in heads:
        pieces.append(received[h])
        held.append(rows[holder[h]][q_rows:])
    return pieces, torch.cat(held)


@torch.no_grad()
def reshard_for_generation(local: Union[nn.Module, Sequence[nn.Module], dict[str, torch.Tensor]], config: GLMConfig,
                           src, dst) -> dict[str, torch.Tensor]:
    """This rank's whole generation shard (every layer, tp_dst slice) from its training shard on ``src``
    (tp_src x pp; ``local``: its model chunks, one model, or their state dict), for ``dst =
    ParallelLayout.for_generation(src, tp_dst)``: ``reshard_tp`` over the TP subgroup of f = tp_src /
    tp_dst ranks (this stage's layers), then the stages' results exchanged over the PP group. Bytes
    received ("reshard"): |generation shard| - |this rank's part of it|, the analytic minimum
    M (1/tp_dst - 1/(tp_src pp)) when every tensor is sharded (replicated norms are not TP-gathered; a KV
    head replicated over TP ranks is received once, or not at all when the rank holds it). Collective over
    both groups."""
    if isinstance(local, nn.Module):
        sd = local.state_dict()
    elif isinstance(local, dict):
        sd = dict(local)
    else:  # pipeline chunks: names are global (layers keep their index), so the dicts merge
        sd = {k: v for chunk in local for k, v in chunk.state_dict().items()}
    return _gather_stages(reshard_tp(sd, config, src, dst), src, "reshard")


@torch.no_grad()
def load_full_into(model: nn.Module, full_sd: dict[str, torch.Tensor], layout, config: Optional[GLMConfig] = None) -> None:
    """Load a full engine state dict into a (tensor/pipeline-parallel) model: each rank takes its shard."""
    config = config or model.config
    local = shard_state_dict(full_sd, config, layout, getattr(model, "layer_indices", None),
                             getattr(model, "pre_process", True), getattr(model, "post_process", True))
    missing, unexpected = model.load_state_dict(local, strict=False)
    if missing or unexpected:
        raise ValueError(f"load_full_into: missing {missing}, unexpected {unexpected}")


# ---- layout-independent initialisation ----------------------------------------------------------
def full_init_tensor(name: str, shape: tuple[int, ...], config: GLMConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of ``name``: ones for norms, zeros for biases, N(0, std) otherwise
    (std = initializer_range; 1/sqrt(h+1) for the value head),
    drawn from a generator seeded by (seed, name), so every layout initialises identically."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    # the scalar head starts small so initial scores are near zero (as GLMForScalarHead does)
    std = (config.hidden_size + 1) ** -0.5 if name == "value_head.weight" else config.initializer_range
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def init_parallel_weights_(model: nn.Module, layout, seed: int = 0, config: Optional[GLMConfig] = None) -> None:
    """Initialise a (parallel) model with the values ``full_init_tensor`` gives the unsharded model,
    so TP/PP/DP layouts start from identical weights (and replicated KV heads agree across ranks).
    Generates one full tensor at a time on CPU."""
    from engine.model.hf_adapter import expected_shapes
    config = config or model.config
    shapes = expected_shapes(config)
    for name, p in model.named_parameters():
        shape = shapes.get(name, None)
        if shape is None:  # e.g. a value head: not tensor-parallel, use its own shape
            shape = tuple(p.shape)
        full = full_init_tensor(name, shape, config, seed)
        p.copy_(tp_slice(name, full, config, layout.tp_size, layout.tp_rank))
