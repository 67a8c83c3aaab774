"""Parallel degrees and process groups, as explicit objects (no module-level parallel state).

``ParallelDims`` is pure arithmetic: degrees, validation and the rank <-> (tp, cp, dp, pp) map.
``ParallelLayout`` adds this rank's process groups; several layouts can coexist (the training and
the generation layout of the RLHF actor), each with its own groups and byte ledger.

Rank order is Megatron's: tp fastest, then cp (context parallel), then dp, then pp::

    rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so a tensor-parallel group is tp consecutive ranks (one node, fast links), the cp ranks that split
one sequence come next, and a pipeline stage is a contiguous block of dp * cp * tp ranks. Context
parallel ranks hold the same weights and see the same samples (different parts of each sequence):
for the gradients and the distributed optimizer they are data-parallel replicas, so
``ParallelLayout.gradient_layout`` folds them into one data-parallel group of dp * cp ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch.distributed as dist

from engine.config import GLMConfig
from engine.parallel.comm import CommLedger


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class ParallelDims:
    """Tensor, pipeline, data, virtual-pipeline and context-parallel degrees of one layout."""

    tp: int = 1
    """Tensor-parallel degree (heads, FFN columns and vocabulary split over tp ranks)."""
    pp: int = 1
    """Pipeline stages."""
    dp: Optional[int] = 1
    """Data-parallel replicas; None derives it as world_size / (tp * pp)."""
    vpp: int = 1
    """Virtual pipeline chunks per stage (interleaved schedule); needs pp > 1."""
    world_size: Optional[int] = None
    """Total ranks; None means tp * pp * dp * cp."""
    cp: int = 1
    """Context-parallel degree: each sequence split over cp ranks (2 cp load-balanced chunks)."""

    # ---- validation --------------------------------------------------------------------------
    def validate(self, world_size: Optional[int] = None, config: Optional[GLMConfig] = None,
                 global_batch_size: Optional[int] = None, micro_batch_size: Optional[int] = None,
                 layers_per_stage: Optional[Sequence[int]] = None) -> "ParallelDims":
        """Raise ValueError listing every inconsistency (naming each factor and its value);
        return the dims with ``dp`` and ``world_size`` filled in. Touches no process group."""
        problems: list[str] = []
        for f in ("tp", "pp", "vpp", "cp"):
            if not _positive_int(getattr(self, f)):
                problems.append(f"{f}={getattr(self, f)!r} must be a positive integer")
        if self.dp is not None and not _positive_int(self.dp):
            problems.append(f"dp={self.dp!r} must be a positive integer or None (derived)")
        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))
        tp, pp, vpp, cp = self.tp, self.pp, self.vpp, self.cp

        if world_size is None:
            world_size = self.world_size
        if self.world_size is not None and world_size != self.world_size:
            problems.append(f"world_size={world_size} differs from ParallelDims.world_size={self.world_size}")
        if world_size is None:
            if self.dp is None:
                raise ValueError(f"invalid parallel layout: dp=None needs a world size to derive it from "
                                 f"(tp={tp}, pp={pp}, cp={cp})")
            world_size = tp * pp * cp * self.dp
        if not _positive_int(world_size):
            raise ValueError(f"invalid parallel layout: world_size={world_size!r} must be a positive integer")

        dp, model = self.dp, tp * pp * cp
        if world_size % model != 0:
            problems.append(f"world_size={world_size} is not divisible by tp={tp} x pp={pp} x cp={cp} = {model}")
            dp = dp or 1
        elif dp is None:
            dp = world_size // model
        elif model * dp != world_size:
            problems.append(f"tp={tp} x pp={pp} x cp={cp} x dp={dp} = {model * dp} != world_size={world_size}")

        if vpp > 1 and pp == 1:
            problems.append(f"vpp={vpp} (virtual pipeline) needs pp > 1, got pp={pp}")

        if config is not None:
            heads, groups = config.num_attention_heads, config.num_kv_groups
            if heads % tp != 0:
                problems.append(f"num_attention_heads={heads} is not divisible by tp={tp}")
            if groups % tp != 0 and tp % groups != 0:
                problems.append(f"num_kv_groups={groups} neither divides nor is divisible by tp={tp} "
                                "(KV heads can be split or replicated over TP ranks, not both)")
            if config.ffn_hidden_size % tp != 0:
                problems.append(f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by tp={tp}")
            if config.vocab_size % tp != 0:
                problems.append(f"vocab_size={config.vocab_size} is not divisible by tp={tp} "
                                "(pad the vocabulary for a vocab-parallel embedding/output layer)")
        chunks = pp * vpp
        if layers_per_stage is not None:
            layers = list(layers_per_stage)
            if len(layers) != chunks:
                problems.append(f"layers_per_stage has {len(layers)} entries, expected pp={pp} x vpp={vpp} = {chunks}")
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in layers):
                problems.append(f"layers_per_stage={layers} must hold non-negative integers")
            elif config is not None and sum(layers) != config.num_layers:
                problems.append(f"layers_per_stage={layers} sums to {sum(layers)}, "
                                f"not num_layers={config.num_layers}")
        elif config is not None and config.num_layers % chunks != 0:
            problems.append(f"num_layers={config.num_layers} is not divisible by pp={pp} x vpp={vpp} = {chunks}")

        if global_batch_size is not None or micro_batch_size is not None:
            gbs, mbs = global_batch_size, micro_batch_size if micro_batch_size is not None else 1
            if gbs is not None and not _positive_int(gbs):
                problems.append(f"global_batch_size={gbs!r} must be a positive integer")
            elif not _positive_int(mbs):
                problems.append(f"micro_batch_size={mbs!r} must be a positive integer")
            elif gbs is not None and gbs % (mbs * dp) != 0:
                problems.append(f"global_batch_size={gbs} is not divisible by micro_batch_size={mbs} x dp={dp} "
                                f"= {mbs * dp}")

        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))
        return replace(self, dp=dp, world_size=world_size)

    # ---- rank arithmetic (pure) -------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        if self.dp is not None:
            return self.dp
        if self.world_size is None:
            raise ValueError("dp is None and world_size is unknown: call validate(world_size) first")
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp_size

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside [0, tp={self.tp} x pp={self.pp} x cp={self.cp} "
                             f"x dp={self.dp_size})")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank (``cp_coord`` gives its context-parallel rank)."""
        self._check_rank(rank)
        tp, cp, dp = self.tp, self.cp, self.dp_size
        return rank % tp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp)

    def cp_coord(self, rank: int) -> int:
        """Context-parallel rank of a global rank."""
        self._check_rank(rank)
        return (rank // self.tp) % self.cp

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        if not (0 <= tp_rank < self.tp and 0 <= dp_rank < self.dp_size and 0 <= pp_rank < self.pp
                and 0 <= cp_rank < self.cp):
            raise ValueError(f"coords (tp={tp_rank}, dp={dp_rank}, pp={pp_rank}, cp={cp_rank}) outside "
                             f"tp={self.tp} x dp={self.dp_size} x pp={self.pp} x cp={self.cp}")
        return ((pp_rank * self.dp_size + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def _all_coords(self, rank: int) -> tuple[int, int, int, int]:
        return self.coords(rank) + (self.cp_coord(rank),)

    def tp_group_ranks(self, rank: int) -> list[int]:
        _, d, p, c = self._all_coords(rank)
        return [self.rank_of(t, d, p, c) for t in range(self.tp)]

    def dp_group_ranks(self, rank: int) -> list[int]:
        t, _, p, c = self._all_coords(rank)
        return [self.rank_of(t, d, p, c) for d in range(self.dp_size)]

    def pp_group_ranks(self, rank: int) -> list[int]:
        t, d, _, c = self._all_coords(rank)
        return [self.rank_of(t, d, p, c) for p in range(self.pp)]

    def cp_group_ranks(self, rank: int) -> list[int]:
        """The cp ranks splitting the same sequences (same tp, dp and pp rank), in rank order."""
        t, d, p, _ = self._all_coords(rank)
        return [self.rank_of(t, d, p, c) for c in range(self.cp)]

    def mp_group_ranks(self, rank: int) -> list[int]:
        """The tp x pp ranks holding one model replica (same dp and cp rank), in rank order."""
        _, d, _, c = self._all_coords(rank)
        return [self.rank_of(t, d, p, c) for p in range(self.pp) for t in range(self.tp)]

    def gradient_dims(self) -> "ParallelDims":
        """These dims with the cp ranks folded into data parallelism (dp * cp replicas, cp = 1): the same
        rank order, so its dp groups are the dp x cp groups gradients are averaged over."""
        return replace(self, dp=self.dp_size * self.cp, cp=1, world_size=self.size)

    def tp_subgroup_ranks(self, rank: int, size: int) -> list[int]:
        """The ``size`` consecutive TP ranks containing ``rank`` (``size`` divides tp): e.g. the ranks
        that share one replicated KV head when tp > num_kv_groups."""
        if not _positive_int(size) or self.tp % size != 0:
            raise ValueError(f"TP subgroup size {size} must divide tp={self.tp}")
        ranks = self.tp_group_ranks(rank)
        t = self.coords(rank)[0]
        return ranks[(t // size) * size:(t // size + 1) * size]


def _proper_divisors(n: int) -> list[int]:
    return [k for k in range(2, n) if n % k == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in a layout and its process groups. Build with ``ParallelLayout.build``.

    Groups are ``None`` in ``ParallelLayout.single()`` (one process, no torch.distributed); the
    wrappers in ``engine.parallel.comm`` treat ``None`` and size-one groups as no-ops.
    """

    dims: ParallelDims
    rank: int
    world_size: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: object
    dp_group: object
    pp_group: object
    mp_group: object
    """tp x pp ranks of one model replica (grad-norm reduction, weight gathering)."""
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    mp_ranks: tuple[int, ...]
    name: str = "train"
    ledger: CommLedger = field(default_factory=CommLedger, compare=False)
    tp_subgroups: dict = field(default_factory=dict, compare=False)
    """size -> (group, ranks) of the ``size`` consecutive TP ranks around this rank, for every proper
    divisor of tp (replicated KV heads use size tp / num_kv_groups)."""
    cp_rank: int = 0
    cp_group: object = None
    """The cp ranks splitting this rank's sequences (None when cp = 1)."""
    cp_ranks: tuple[int, ...] = ()
    """Global ranks of the cp group, in rank order (empty when cp = 1)."""
    gradients: Optional["ParallelLayout"] = field(default=None, compare=False)
    """The layout gradients are averaged and optimizer state is sharded over (``gradient_layout``);
    None when cp = 1 (this layout itself)."""

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, dims: ParallelDims, rank: Optional[int] = None, world_size: Optional[int] = None,
              name: str = "train") -> "ParallelLayout":
        """Validate ``dims`` against the world size, then create every group (collective: all
        ranks call this with the same arguments, in the same order as other layouts)."""
        if world_size is None:
            if dims.world_size is not None:
                world_size = dims.world_size
            elif dist.is_initialized():
                world_size = dist.get_world_size()
            else:
                world_size = dims.tp * dims.pp * dims.cp * (dims.dp or 1)
        dims = dims.validate(world_size)
        if not dist.is_initialized():
            if world_size != 1:
                raise RuntimeError(f"ParallelLayout.build: world_size={world_size} needs an initialised "
                                   "torch.distributed process group")
            return cls.single(name=name)
        if dist.get_world_size() != world_size:
            raise ValueError(f"ParallelLayout.build: world_size={world_size} but torch.distributed has "
                             f"{dist.get_world_size()} ranks")
        rank = dist.get_rank() if rank is None else rank
        layout = cls._build_groups(dims, rank, world_size, name, CommLedger())
        if dims.cp == 1:
            return layout
        # Gradients and ZeRO shards span the dp x cp ranks: the same layout with cp folded into dp. Only its
        # dp groups are new; tp, pp, mp and the TP subgroups are the same rank sets, so they are shared.
        grad_dims = dims.gradient_dims()
        dp_group = None
        for p in range(dims.pp):
            for t in range(dims.tp):
                ranks = [grad_dims.rank_of(t, d, p) for d in range(grad_dims.dp_size)]
                group = dist.new_group(ranks)
                if rank in ranks:
                    dp_group = group
        gradients = replace(layout, dims=grad_dims, dp_rank=grad_dims.coords(rank)[1], dp_group=dp_group,
                            dp_ranks=tuple(grad_dims.dp_group_ranks(rank)), cp_rank=0, cp_group=None, cp_ranks=(),
                            name=f"{name}-gradients")
        return replace(layout, gradients=gradients)

    @classmethod
    def _build_groups(cls, dims: ParallelDims, rank: int, world_size: int, name: str,
                      ledger: CommLedger) -> "ParallelLayout":
        tp, dp, pp, cp = dims.tp, dims.dp_size, dims.pp, dims.cp
        # Every rank creates every group, in one fixed order (torch.distributed requires it).
        mine: dict = {}

        def make(kind: str, ranks: list[int]) -> None:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group

        for p in range(pp):
            for d in range(dp):
                for c in range(cp):
                    make("tp", [dims.rank_of(t, d, p, c) for t in range(tp)])
        for p in range(pp):
            for c in range(cp):
                for t in range(tp):
                    make("dp", [dims.rank_of(t, d, p, c) for d in range(dp)])
        for d in range(dp):
            for c in range(cp):
                for t in range(tp):
                    make("pp", [dims.rank_of(t, d, p, c) for p in range(pp)])
        for d in range(dp):
            for c in range(cp):
                make("mp", [dims.rank_of(t, d, p, c) for p in range(pp) for t in range(tp)])
        if cp > 1:
            for p in range(pp):
                for d in range(dp):
                    for t in range(tp):
                        make("cp", [dims.rank_of(t, d, p, c) for c in range(cp)])
        subgroups = {}
        for size in _proper_divisors(tp):
            for p in range(pp):
                for d in range(dp):
                    for c in range(cp):
                        for start in range(0, tp, size):
                            ranks = [dims.rank_of(t, d, p, c) for t in range(start, start + size)]
                            group = dist.new_group(ranks)
                            if rank in ranks:
                                subgroups[size] = (group, tuple(ranks))

        t, d, p = dims.coords(rank)
        return cls(dims=dims, rank=rank, world_size=world_size, tp_rank=t, dp_rank=d, pp_rank=p,
                   tp_group=mine["tp"], dp_group=mine["dp"], pp_group=mine["pp"], mp_group=mine["mp"],
                   tp_ranks=tuple(dims.tp_group_ranks(rank)), dp_ranks=tuple(dims.dp_group_ranks(rank)),
                   pp_ranks=tuple(dims.pp_group_ranks(rank)), mp_ranks=tuple(dims.mp_group_ranks(rank)),
                   name=name, ledger=ledger, tp_subgroups=subgroups, cp_rank=dims.cp_coord(rank),
                   cp_group=mine.get("cp"), cp_ranks=tuple(dims.cp_group_ranks(rank)) if cp > 1 else ())

    @classmethod
    def single(cls, name: str = "single") -> "ParallelLayout":
        """One process, no torch.distributed: every group is None and every size 1."""
        return cls(dims=ParallelDims(1, 1, 1, 1, 1), rank=0, world_size=1, tp_rank=0, dp_rank=0, pp_rank=0,
                   tp_group=None, dp_group=None, pp_group=None, mp_group=None,
                   tp_ranks=(0,), dp_ranks=(0,), pp_ranks=(0,), mp_ranks=(0,), name=name)

    # ---- sizes and neighbours --------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    @property
    def vpp_size(self) -> int:
        return self.dims.vpp

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def gradient_layout(self) -> "ParallelLayout":
        """The layout whose dp group is every replica of this rank's parameters: the dp x cp ranks under
        context parallelism (Megatron's dp_cp group), else this layout. The optimizer averages gradients
        and shards its state over it; checkpoints split their writes over it."""
        return self.gradients if self.gradients is not None else self

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_next_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around, as interleaved schedules need)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def pp_prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    def tp_subgroup(self, size: int) -> tuple[object, tuple[int, ...]]:
        """(group, global ranks) of the ``size`` consecutive TP ranks containing this rank."""
        if size == 1:
            return None, (self.rank,)
        if size == self.tp_size:
            return self.tp_group, self.tp_ranks
        if size not in self.tp_subgroups:
            raise ValueError(f"no TP subgroup of size {size} in a layout with tp={self.tp_size} "
                             f"(sizes must divide tp)")
        return self.tp_subgroups[size]

    # ---- the RLHF generation layout ---------------------------------------------------------
    @classmethod
    def for_generation(cls, train: "ParallelLayout", tp: int) -> "ParallelLayout":
        """The layout the actor samples on: tensor parallel degree ``tp`` (dividing the training tp),
        no pipeline (every layer on every rank), and ``world / tp`` generation replicas. Collective:
        every rank calls it once, with the same arguments, after ``train`` was built.

        Ranks are grouped so that resharding moves the fewest bytes (``sharding.reshard_for_generation``):
        with f = tp_train / tp, training TP rank t becomes generation TP rank t // f and needs exactly
        the shards of the f consecutive training ranks around it (its training TP subgroup of size f)
        of every pipeline stage (its training PP group). So each generation TP group is strided: the
        ranks of one training TP group (one stage) with equal t % f (tp_train 4 -> 2: groups {0, 2} and
        {1, 3}). Generation replica (d f + o) pp + p is training replica d's o-th offset on stage p, so
        a training replica's rows are split over its f pp generation replicas in an order that an
        all-gather over its PP group, then over its TP subgroup, puts back. This order is not
        Megatron's, so use this layout's fields (tp_rank, dp_rank, groups), not ``dims.coords``: its
        ``dims`` only carry the degrees (tp, dp = world / tp, pp = 1) for validation.
        """
        if not _positive_int(tp) or train.tp_size % tp != 0:
            raise ValueError(f"generation tp={tp} must be a positive divisor of the training tp={train.tp_size}")
        if train.cp_size > 1:
            raise ValueError(f"the RLHF generation layout decodes whole sequences (training cp={train.cp_size}): build it "
                             "from the training layout's gradient_layout, whose dp x cp ranks are the sampling replicas "
                             "(as PPOLoop does)")
        if tp == train.tp_size and train.pp_size == 1:
            return train
        f, pp, world = train.tp_size // tp, train.pp_size, train.world_size
        # PPOLoop puts sampled rows back in order with all-gathers over the PP group, then the TP subgroup:
        # group-rank order (sorted global ranks) must be stage order and TP order, as Megatron's rank_of gives
        subgroup = train.tp_subgroup(f)[1]
        if list(train.pp_ranks) != sorted(train.pp_ranks) or list(subgroup) != sorted(subgroup):
            raise RuntimeError(f"for_generation: PP ranks {train.pp_ranks} or TP subgroup {subgroup} are not in "
                               "ascending global-rank order; the generation layout's row order assumes they are")
        dims = ParallelDims(tp=tp, dp=world // tp, pp=1)

        def member(d: int, offset: int, p: int, j: int) -> int:  # training replica d, offset t % f, stage p
            return train.dims.rank_of(offset + f * j, d, p)

        t = train.tp_rank
        my_d, my_offset, my_p, my_j = train.dp_rank, t % f, train.pp_rank, t // f
        # generation DP order: (d, o, p) lexicographic
        replicas = [(d, o, p) for d in range(train.dp_size) for o in range(f) for p in range(pp)]
        tp_ranks = tuple(member(my_d, my_offset, my_p, j) for j in range(tp))
        dp_ranks = tuple(member(d, o, p, my_j) for d, o, p in replicas)
        if tp == 1:  # one whole model per rank: no TP groups to create
            tp_group, subgroups = None, {}
        else:
            mine: dict = {}
            for d, o, p in replicas:  # every rank creates every group, in one order
                ranks = [member(d, o, p, j) for j in range(tp)]
                group = dist.new_group(ranks)
                if train.rank in ranks:
                    tp_group = group
                for size in _proper_divisors(tp):  # replicated KV heads use consecutive generation ranks
                    for start in range(0, tp, size):
                        sub = ranks[start:start + size]
                        sub_group = dist.new_group(sub)
                        if train.rank in sub:
                            mine[size] = (sub_group, tuple(sub))
            subgroups = mine
        dp_group = None
        for j in range(tp):  # f pp >= 2 replicas share each generation TP rank
            ranks = [member(d, o, p, j) for d, o, p in replicas]
            group = dist.new_group(ranks)
            if train.rank in ranks:
                dp_group = group
        return cls(dims=dims, rank=train.rank, world_size=world, tp_rank=my_j,
                   dp_rank=replicas.index((my_d, my_offset, my_p)), pp_rank=0, tp_group=tp_group,
                   dp_group=dp_group, pp_group=None, mp_group=tp_group, tp_ranks=tp_ranks, dp_ranks=dp_ranks,
                   pp_ranks=(train.rank,), mp_ranks=tp_ranks, name=f"{train.name}-generation",
                   ledger=train.ledger, tp_subgroups=subgroups)
