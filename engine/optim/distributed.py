"""AdamW over a parallel layout: bucketed DP gradient reduction, optional ZeRO-1 sharding, bf16 params.

Life of one optimizer step (``layout`` gives the TP/PP/DP groups):

    backward (x micro-batches)   each param's grad is added into its fp32 ``main_grad`` (a view of a
                                 flat bucket buffer) by a post-accumulate hook, then freed: gradients
                                 accumulate in fp32 until ``zero_grad()``, whatever the param dtype.
    bucket reduction             per bucket: 1. sequence-parallel params (norm weights under SP):
                                 all-reduce their grads over TP; 2. over DP: grads / dp, then an async
                                 all-reduce (plain DP) or reduce-scatter to this rank's 1/dp shard
                                 (ZeRO-1). With ``overlap_grad_reduce`` and ``prepare_backward(m)``
                                 announced, a bucket is launched from the grad hook as soon as each of
                                 its params has received its m-th (last) gradient of the step, so the
                                 reduction of the last layers runs while the first layers still
                                 compute their backward (Megatron's overlap_grad_reduce).
    finish_grad_sync()           launch the buckets not launched yet, wait for all of them.
    clip_grad_norm(max_norm)     global L2 norm (see ``_norm_segments``), clip, return the norm.
    step(lr=None)                AdamW on fp32 master weights (the whole model, or the DP shard);
                                 copy into the (bf16) params; ZeRO-1 all-gathers the updated shards.

The loss the caller backpropagates should be the mean over its micro-batch divided by the number
of micro-batches; averaging over DP happens here. Replicated KV heads (tp > KV groups) already get
their summed gradient during backward (hook in ``engine.parallel.tensor_parallel``).

Weight decay applies to parameters with 2 or more dims (matrices and embeddings), not to norm
weights and biases. The update is ``kernels.adamw.fused_adamw_step`` (``torch.optim.AdamW``'s math:
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  w = w (1 - lr wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
on fp32 master segments; the kernel also writes the rounded (bf16) params of this rank's range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn

from engine.parallel import comm
from kernels.adamw import fused_adamw_step
from engine.parallel.tensor_parallel import sync_sequence_parallel_grads

MIXED_PRECISION = ("fp32", "bf16")
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class _Bucket:
    params: list                      # nn.Parameters, in buffer order
    offsets: list                     # start of each param in the bucket
    numel: int                        # padded size (divisible by dp)
    grad: Optional[torch.Tensor]      # fp32 [numel] main grads (empty after release_grads)
    param: torch.Tensor               # param dtype [numel]; params are views of it
    shard_lo: int = 0                 # this rank's optimizer range [shard_lo, shard_hi)
    shard_hi: int = 0
    grad_shard: Optional[torch.Tensor] = None   # ZeRO: reduced grads of the shard (fp32)
    master: Optional[torch.Tensor] = None       # fp32 master of [shard_lo, shard_hi)
    exp_avg: Optional[torch.Tensor] = None
    exp_avg_sq: Optional[torch.Tensor] = None
    segments: list = field(default_factory=list)  # (param index in bucket, lo, hi) of the shard, bucket coords

    def shard_grad(self) -> torch.Tensor:
        return self.grad_shard if self.grad_shard is not None else self.grad[self.shard_lo:self.shard_hi]


class DistributedOptimizer:
    """AdamW with DP gradient reduction and optional ZeRO-1 (see module docstring).

    ``params``: the local (TP/PP-sharded) parameters, or ``(name, param)`` pairs. ``layout``: the model's
    layout; "DP" below is its ``gradient_layout`` (dp x cp ranks under context parallelism). With
    ``mixed_precision="bf16"`` the parameters are moved to bf16 storage here (their fp32 values seed
    the master weights). ``max_grad_norm`` (optional) makes ``step`` clip. ``overlap_grad_reduce``:
    reduce each bucket during the backward of the step's last micro-batch (see ``prepare_backward``).
    """

    def __init__(self, params: Iterable, layout, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, use_distributed_optimizer: bool = False,
                 bucket_size_bytes: int = 40 * 2**20, mixed_precision: str = "fp32", backend: str = "auto",
                 max_grad_norm: Optional[float] = None, overlap_grad_reduce: bool = False):
        items = list(params)
        named = [(it if isinstance(it, tuple) else (f"param{i}", it)) for i, it in enumerate(items)]
        seen: set = set()
        named = [(n, p) for n, p in named if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        if not named:
            raise ValueError("DistributedOptimizer got no parameters that require grad")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={mixed_precision!r} must be one of {MIXED_PRECISION}")
        if bucket_size_bytes <= 0:
            raise ValueError(f"bucket_size_bytes={bucket_size_bytes} must be positive")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or eps <= 0 or lr < 0 or weight_decay < 0:
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        _check_marks([p for _, p in named], layout)
        # Every replica of these parameters averages gradients and shares the ZeRO shards: under context
        # parallelism that is the dp x cp ranks (the gradient layout; the layout itself otherwise).
        layout = layout.gradient_layout
        self.layout, self.lr, self.betas, self.eps, self.weight_decay = layout, lr, tuple(betas), eps, weight_decay
        self.distributed = use_distributed_optimizer
        self.mixed_precision, self.backend, self.max_grad_norm = mixed_precision, backend, max_grad_norm
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.param_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        self.step_count = 0
        self._synced = False
        self._grad_norm: Optional[float] = None
        self.buckets = self._build_buckets(bucket_size_bytes)
        self._norm_views = self._norm_segments()
        self.overlap_grad_reduce = overlap_grad_reduce
        self._bucket_of = {id(p): bi for bi, b in enumerate(self.buckets) for p in b.params}
        self._expected_passes: Optional[int] = None  # backward passes announced for this step
        self._passes: dict[int, int] = {}            # id(param) -> gradients received this step
        self._waiting: list[int] = []                # per bucket: params still short of their last gradient
        self._works: list = [None] * len(self.buckets)  # per bucket: False (not launched), Work or None (done)
        self._reset_overlap()
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.params]
        self.grads_released = False  # release_grads() freed the gradient buffers; zero_grad() re-allocates

    # ---- buffers ---------------------------------------------------------------------------
    def _build_buckets(self, bucket_size_bytes: int) -> list[_Bucket]:
        dp = self.layout.dp_size
        groups, current, size = [], [], 0
        for p in reversed(self.params):  # backward order: the last layers' grads are ready first
            current.append(p)
            size += p.numel() * 4
            if size >= bucket_size_bytes:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        buckets = []
        for ps in groups:
            offsets, n = [], 0
            for p in ps:
                offsets.append(n)
                n += p.numel()
            numel = -(-n // dp) * dp  # pad so every DP rank owns the same shard size
            device = ps[0].device
            b = _Bucket(ps, offsets, numel, grad=None, param=torch.zeros(numel, dtype=self.param_dtype, device=device))
            master_full = torch.zeros(numel, dtype=torch.float32, device=device)
            for p, off in zip(ps, offsets):
                master_full[off:off + p.numel()] = p.detach().reshape(-1).float()
                b.param[off:off + p.numel()] = p.detach().reshape(-1).to(self.param_dtype)
            self._view_params(b)
            self._allocate_grads(b)
            if self.distributed:
                shard = numel // dp
                b.shard_lo, b.shard_hi = self.layout.dp_rank * shard, (self.layout.dp_rank + 1) * shard
            else:
                b.shard_lo, b.shard_hi = 0, numel
            if not self.distributed and self.param_dtype == torch.float32:
                b.master = b.param  # fp32 without sharding: the params are the master weights
            else:
                b.master = master_full[b.shard_lo:b.shard_hi].clone()
            b.exp_avg = torch.zeros_like(b.master)
            b.exp_avg_sq = torch.zeros_like(b.master)
            for i, (p, off) in enumerate(zip(ps, offsets)):
                lo, hi = max(off, b.shard_lo), min(off + p.numel(), b.shard_hi)
                if lo < hi:
                    b.segments.append((i, lo, hi))
            buckets.append(b)
        return buckets

    @staticmethod
    def _view_params(b: _Bucket) -> None:
        """The params live in the flat buffer: each becomes a view of its range of ``b.param``."""
        for p, off in zip(b.params, b.offsets):
            p.data = b.param[off:off + p.numel()].view_as(p)

    def _allocate_grads(self, b: _Bucket) -> None:
        """Zeroed fp32 gradient buffers next to the params (and the ZeRO-1 shard's), and the params'
        ``main_grad`` views of them."""
        device = b.param.device
        b.grad = torch.zeros(b.numel, dtype=torch.float32, device=device)
        if self.distributed:
            b.grad_shard = torch.zeros(b.numel // self.layout.dp_size, dtype=torch.float32, device=device)
        for p, off in zip(b.params, b.offsets):
            p.main_grad = b.grad[off:off + p.numel()].view_as(p)
            p.grad = None

    def _accumulate(self, p: torch.Tensor) -> None:
        if self._synced:
            # the buffers already hold DP-reduced (or scattered) gradients: adding would mix the two
            raise RuntimeError("a gradient arrived after finish_grad_sync()/step() without zero_grad(); "
                               "call optimizer.zero_grad() before the next backward")
        if self.grads_released:
            raise RuntimeError(f"a gradient of {self._name(p)} arrived while the gradient buffers are released "
                               "(offloaded): call optimizer.zero_grad() before the backward")
        bi = self._bucket_of[id(p)]
        if self._works[bi] is not False:
            raise RuntimeError(f"a gradient of {self._name(p)} arrived after its bucket's reduction started: "
                               f"prepare_backward({self._expected_passes}) announced fewer backward passes than ran")
        p.main_grad.add_(p.grad)
        p.grad = None
        self._grad_norm = None
        if self._expected_passes is not None:
            seen = self._passes.get(id(p), 0) + 1
            self._passes[id(p)] = seen
            if seen == self._expected_passes:
                self._waiting[bi] -= 1
                if self._waiting[bi] == 0:
                    self._launch(bi)

    def _name(self, p: torch.Tensor) -> str:
        return next((n for n, q in zip(self.names, self.params) if q is p), "a parameter")

    def _reset_overlap(self) -> None:
        self._expected_passes = None
        self._passes = {}
        self._waiting = [len(b.params) for b in self.buckets]
        self._works = [False] * len(self.buckets)

    def prepare_backward(self, num_passes: int) -> None:
        """Announce that every parameter gets ``num_passes`` gradients (backward passes: micro-batches)
        before the next ``finish_grad_sync``; with ``overlap_grad_reduce`` each bucket's reduction then
        starts as soon as all its parameters have their last one. Call after ``zero_grad()``. A
        parameter that gets fewer (unused) holds its bucket back until ``finish_grad_sync``; more
        raises. Every DP and TP rank must announce the same count (the launch order of the bucket
        collectives follows the backward order, identical on all of them)."""
        if not isinstance(num_passes, int) or num_passes < 1:
            raise ValueError(f"num_passes={num_passes!r} must be a positive integer")
        if any(work is not False for work in self._works) or self._passes:
            # buckets already reducing (or reduced) hold this step's gradients: re-arming them would
            # add the next gradients into buffers a collective is still reading
            raise RuntimeError("prepare_backward() after gradients of this step arrived; call zero_grad() first")
        self._reset_overlap()
        if self.overlap_grad_reduce and self.layout.dp_size > 1:
            self._expected_passes = num_passes

    def _launch(self, bi: int) -> None:
        """Start bucket ``bi``'s reduction: SP grads over TP (blocking, a few norm weights), then the
        async DP all-reduce / reduce-scatter of the bucket."""
        b = self.buckets[bi]
        sync_sequence_parallel_grads(b.params, self.layout, grads=[p.main_grad for p in b.params])
        if self.layout.dp_size > 1:
            b.grad.div_(self.layout.dp_size)
        if self.distributed:
            work = comm.reduce_scatter_into(b.grad_shard, b.grad, self.layout.dp_group, self.layout.ledger, "dp",
                                            async_op=True)
        else:
            work = comm.all_reduce(b.grad, self.layout.dp_group, self.layout.ledger, "dp", async_op=True)
        self._works[bi] = work

    # ---- gradients -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the gradient buffers (allocating them again, next to the params, after ``release_grads``)."""
        self._wait_all()  # never zero a buffer a collective is still reading
        if self.grads_released:
            for b in self.buckets:
                self._allocate_grads(b)
            self.grads_released = False
        for b in self.buckets:
            b.grad.zero_()
            if b.grad_shard is not None:
                b.grad_shard.zero_()
        for p in self.params:
            p.grad = None
        self._synced = False
        self._grad_norm = None
        self._reset_overlap()

    def _wait_all(self) -> None:
        for bi, work in enumerate(self._works):
            if work is not None and work is not False:
                work.wait()
                self._works[bi] = None

    def finish_grad_sync(self) -> None:
        """Reduce every bucket not reduced yet (SP grads over TP, then DP) and wait for all of them.
        Idempotent until the next backward."""
        if self._synced:
            return
        if self.grads_released:
            raise RuntimeError("the gradient buffers are released (offloaded): zero_grad(), backward, then step")
        for bi, work in enumerate(self._works):
            if work is False:
                self._launch(bi)
        self._wait_all()
        self._synced = True

    def _norm_segments(self) -> list[tuple[int, int, int]]:
        """(bucket, lo, hi) ranges of reduced grads this rank counts in the global norm, such that
        summing over all ranks counts every element of the full model's gradient exactly once:
        TP-replicated params only on tp rank 0, a replicated KV head only on the first rank of its
        replica group; under ZeRO-1 each DP rank counts its own shard (the sum then runs over DP too),
        under plain DP every DP rank holds the same full gradient (the sum runs over tp x pp only)."""
        out = []
        for bi, b in enumerate(self.buckets):
            for i, lo, hi in b.segments:
                p, off = b.params[i], b.offsets[i]
                if not getattr(p, "tensor_parallel", False) and self.layout.tp_rank != 0:
                    continue
                counted = [(off, off + p.numel())]
                dup = getattr(p, "tp_duplicate_rows", None)
                if dup is not None:
                    row = p[0].numel() if p.dim() > 1 else 1
                    counted = [(off, off + dup[0] * row), (off + dup[1] * row, off + p.numel())]
                for c_lo, c_hi in counted:
                    s_lo, s_hi = max(c_lo, lo), min(c_hi, hi)
                    if s_lo < s_hi:
                        out.append((bi, s_lo - b.shard_lo, s_hi - b.shard_lo))
        return out

    def grad_norm(self) -> float:
        """Global L2 norm of the (synced) gradient over every TP/PP/DP shard of the model."""
        self.finish_grad_sync()
        if self._grad_norm is None:
            grads = [self.buckets[bi].shard_grad() for bi in range(len(self.buckets))]
            device = grads[0].device
            sq = torch.zeros(1, dtype=torch.float64, device=device)
            for bi, lo, hi in self._norm_views:
                sq += grads[bi][lo:hi].double().square().sum()
            comm.all_reduce(sq, self.layout.mp_group, self.layout.ledger, "mp")
            if self.distributed:
                comm.all_reduce(sq, self.layout.dp_group, self.layout.ledger, "dp")
            self._grad_norm = math.sqrt(sq.item())
        return self._grad_norm

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale the gradients so their global norm is at most ``max_norm``; return the norm before."""
        if max_norm <= 0:
            raise ValueError(f"max_norm={max_norm} must be positive")
        norm = self.grad_norm()
        coef = max_norm / (norm + 1e-6)
        if math.isfinite(norm) and coef < 1.0:
            for b in self.buckets:
                b.shard_grad().mul_(coef)
        return norm

    # ---- update ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: Optional[float] = None) -> tuple[float, bool]:
        """Sync, (clip), AdamW-update, publish params. Returns (grad_norm, skipped); the step is
        skipped (nothing changes) when the gradient norm is not finite. Gradients are kept: call
        ``zero_grad()`` before the next accumulation."""
        lr = self.lr if lr is None else lr
        devices = {str(t.device) for b in self.buckets for t in (b.param, b.master, b.exp_avg, b.exp_avg_sq)}
        if len(devices) > 1:  # e.g. an offloaded optimizer state next to resident weights
            raise RuntimeError(f"the optimizer's buffers are on several devices {sorted(devices)}: bring the "
                               "weights and the optimizer state to one device (Offloader.ensure(name, "
                               "name + '.optim')) before step()")
        norm = self.clip_grad_norm(self.max_grad_norm) if self.max_grad_norm else self.grad_norm()
        if not math.isfinite(norm):
            return norm, True
        self.step_count += 1
        beta1, beta2 = self.betas
        separate_master = self.buckets[0].master is not self.buckets[0].param
        for decay in (True, False):
            ps, ws, gs, ms, vs = [], [], [], [], []
            for b in self.buckets:
                grad = b.shard_grad()
                for i, lo, hi in b.segments:
                    if (b.params[i].dim() >= 2) != decay:
                        continue
                    ps.append(b.param[lo:hi])  # this rank's range of the model's (bf16) params
                    lo, hi = lo - b.shard_lo, hi - b.shard_lo
                    ws.append(b.master[lo:hi]), gs.append(grad[lo:hi])
                    ms.append(b.exp_avg[lo:hi]), vs.append(b.exp_avg_sq[lo:hi])
            fused_adamw_step(ps, gs, ms, vs, ws if separate_master else None, lr=lr, beta1=beta1, beta2=beta2,
                             eps=self.eps, weight_decay=self.weight_decay if decay else 0.0, step=self.step_count,
                             backend=self.backend)
        self._publish_params(from_master=False)
        return norm, False

    def _publish_params(self, from_master: bool) -> None:
        """(Master weights ->) this rank's param range; ZeRO-1 then all-gathers every rank's range."""
        for b in self.buckets:
            if b.master is b.param:
                continue
            mine = b.param[b.shard_lo:b.shard_hi]
            if from_master:
                mine.copy_(b.master)
            if self.distributed:
                comm.all_gather_into(b.param, mine.clone(), self.layout.dp_group, self.layout.ledger, "dp")

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's optimizer state (the DP shard under ZeRO-1) plus the metadata to check it."""
        return {
            "step": self.step_count,
            "meta": self._meta(),
            "buckets": [{"master": b.master.clone(), "exp_avg": b.exp_avg.clone(), "exp_avg_sq": b.exp_avg_sq.clone()}
                        for b in self.buckets],
        }

    def _meta(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.params)}
        return {
            "names": list(self.names), "shapes": [tuple(p.shape) for p in self.params],
            "dp_size": self.layout.dp_size, "dp_rank": self.layout.dp_rank,
            "use_distributed_optimizer": self.distributed, "mixed_precision": self.mixed_precision,
            "buckets": [{"numel": b.numel, "shard": (b.shard_lo, b.shard_hi),
                         "params": [(index[id(p)], off) for p, off in zip(b.params, b.offsets)]}
                        for b in self.buckets],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()`` taken with the same layout and parameters; publishes the master
        weights into the params (collective under ZeRO-1)."""
        mine = self._meta()
        theirs = state.get("meta", {})
        diffs = [k for k in mine if k != "mixed_precision" and _plain(theirs.get(k)) != _plain(mine[k])]
        if diffs or len(state.get("buckets", [])) != len(self.buckets):
            raise ValueError(f"optimizer state does not match this optimizer: differing {diffs or ['buckets']}")
        for b, s in zip(self.buckets, state["buckets"]):
            for key in ("master", "exp_avg", "exp_avg_sq"):
                getattr(b, key).copy_(s[key])
        self.step_count = int(state["step"])
        self._publish_params(from_master=True)

    # ---- per-parameter state (checkpointing, resharding) ------------------------------------
    @torch.no_grad()
    def param_states(self, indices: Optional[Iterable[int]] = None) -> dict[int, dict[str, torch.Tensor]]:
        """fp32 ``master`` / ``exp_avg`` / ``exp_avg_sq`` of local parameters, each shaped like its
        parameter: ``{index into self.params: {key: tensor}}`` for ``indices`` (default: all).

        Independent of bucketing and of ZeRO-1, so it moves between layouts. Under ZeRO-1 each bucket's
        shards are all-gathered over DP one bucket at a time (collective: every DP rank calls this,
        each with its own ``indices``), keeping only the requested parameters."""
        wanted = set(range(len(self.params))) if indices is None else set(indices)
        index = {id(p): i for i, p in enumerate(self.params)}
        out: dict[int, dict[str, torch.Tensor]] = {}
        for b in self.buckets:
            full = {}
            for key in STATE_KEYS:
                shard = getattr(b, key)
                if self.distributed:
                    full[key] = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
                    comm.all_gather_into(full[key], shard.contiguous(), self.layout.dp_group, self.layout.ledger, "dp")
                else:
                    full[key] = shard
            for p, off in zip(b.params, b.offsets):
                if index[id(p)] in wanted:
                    out[index[id(p)]] = {k: t[off:off + p.numel()].view(p.shape).float().clone()
                                         for k, t in full.items()}
        return out

    @torch.no_grad()
    def load_param_states(self, states: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        """Inverse of ``param_states``: ``states`` holds every parameter index; each rank keeps its
        ZeRO-1 shard. Sets the step count, clears gradients and publishes the master weights into the
        params (collective under ZeRO-1)."""
        problems = []
        for i, p in enumerate(self.params):
            s = states.get(i)
            if s is None or any(k not in s for k in STATE_KEYS):
                problems.append(f"{self.names[i]}: missing")
            elif any(tuple(s[k].shape) != tuple(p.shape) for k in STATE_KEYS):
                shapes = [tuple(s[k].shape) for k in STATE_KEYS]
                problems.append(f"{self.names[i]}: shapes {shapes} != {tuple(p.shape)}")
        if problems or not isinstance(step, int) or step < 0:
            raise ValueError(f"optimizer state does not fit this optimizer (step={step!r}): {problems[:10]}")
        index = {id(p): i for i, p in enumerate(self.params)}
        for b in self.buckets:
            for i, lo, hi in b.segments:
                p, off = b.params[i], b.offsets[i]
                s = states[index[id(p)]]
                for key in STATE_KEYS:
                    getattr(b, key)[lo - b.shard_lo:hi - b.shard_lo].copy_(s[key].reshape(-1)[lo - off:hi - off])
        self.step_count = step
        self.zero_grad()
        self._publish_params(from_master=True)

    # ---- flat buffers (offloading: ``engine.rlhf.offload`` moves them between device and host) ----
    def param_buffers(self) -> dict[str, torch.Tensor]:
        """The flat buffers the params are views of (and, for fp32 without ZeRO, the master weights)."""
        return {f"bucket{bi}.param": b.param for bi, b in enumerate(self.buckets)}

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The optimizer's own state: fp32 master weights (when separate from the params) and moments."""
        out = {}
        for bi, b in enumerate(self.buckets):
            for key in STATE_KEYS:
                if key == "master" and b.master is b.param:
                    continue
                out[f"bucket{bi}.{key}"] = getattr(b, key)
        return out

    def grad_buffers(self) -> dict[str, torch.Tensor]:
        """The fp32 gradient buffers (the params' ``main_grad`` views; empty after ``release_grads``)."""
        out = {}
        for bi, b in enumerate(self.buckets):
            out[f"bucket{bi}.grad"] = b.grad
            if b.grad_shard is not None:
                out[f"bucket{bi}.grad_shard"] = b.grad_shard
        return out

    @torch.no_grad()
    def set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Replace flat buffers by equal copies (another device), keyed as ``param_buffers`` /
        ``state_buffers`` name them; the params are re-pointed at views of their new buffer, and the
        master weights follow the param buffer they alias."""
        self._wait_all()
        for name, t in buffers.items():
            bucket, key = name.split(".")
            b = self.buckets[int(bucket.removeprefix("bucket"))]
            old = getattr(b, key)
            if t.shape != old.shape or t.dtype != old.dtype:
                raise ValueError(f"set_buffers: {name} {tuple(t.shape)} {t.dtype} does not replace "
                                 f"{tuple(old.shape)} {old.dtype}")
            if key == "param":
                if b.master is b.param:
                    b.master = t
                b.param = t
                self._view_params(b)
            else:
                setattr(b, key, t)

    def release_grads(self) -> None:
        """Free the gradient buffers (nothing reads them between a step and the next ``zero_grad``, which
        allocates them again): the offloaded optimizer holds no device memory for gradients."""
        self._wait_all()
        for b in self.buckets:
            b.grad = torch.empty(0, dtype=torch.float32, device=b.param.device)
            b.grad_shard = None
            for p in b.params:
                p.main_grad = None
                p.grad = None
        self.grads_released = True
        self._synced = False
        self._grad_norm = None

    def close(self) -> None:
        """Remove the gradient hooks (the params keep living in the flat buffers)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _plain(x):
    """Tuples -> lists recursively, so metadata compares equal after a serialisation round trip."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _check_marks(params: list[nn.Parameter], layout) -> None:
    if layout.tp_size > 1 and any(hasattr(p, "tensor_parallel") for p in params):
        unmarked = sum(1 for p in params if not hasattr(p, "tensor_parallel"))
        if unmarked:
            raise ValueError(f"{unmarked} parameters carry no tensor-parallel mark (norm weights?): call "
                             "engine.parallel.tensor_parallel.mark_parameters(model, layout, sequence_parallel) "
                             "after building a tensor-parallel model")
