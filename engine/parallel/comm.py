"""Every collective and point-to-point op of the engine, with a byte ledger.

Accounting convention (bytes THIS rank sends; ``n`` = group size, ``B`` = tensor bytes):

    all_reduce       B_in                 sends 2 (n-1)/n B_in      (ring: reduce-scatter + all-gather)
    all_gather       B_out = n * B_in     sends   (n-1)/n B_out     (= (n-1) B_in)
    reduce_scatter   B_in  = n * B_out    sends   (n-1)/n B_in      (= (n-1) B_out)
    broadcast        B                    the source sends B, the other ranks 0
    send             B                    B;    recv: 0 sent, B received

Received bytes are recorded as well (ring collectives receive what they send; ``broadcast``: the
non-source ranks receive B). A group of size one (or ``group=None``, which here means "no
process group at all", as in ``ParallelLayout.single()``) is a no-op: nothing is communicated and
nothing is recorded, so a call count in the ledger is a count of real communication.

These are the formulas the analytic accounting (``engine.parallel.accounting``) must use; values
are floats because 2 (n-1)/n B need not be an integer.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the flat-tensor collectives; keep working on torch >= 2.4.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class _Entry:
    sent: float = 0.0
    received: float = 0.0
    calls: int = 0


@dataclass
class CommLedger:
    """Bytes sent / received and number of calls, per group name ("tp", "pp", "dp", ...) and op."""

    entries: dict = field(default_factory=lambda: defaultdict(_Entry))  # (name, op) -> _Entry

    def record(self, name: str, op: str, sent: float, received: float) -> None:
        e = self.entries[(name, op)]
        e.sent += sent
        e.received += received
        e.calls += 1

    def reset(self) -> None:
        self.entries.clear()

    def bytes(self, name: str, op: Optional[str] = None) -> float:
        """Bytes this rank sent over group ``name`` (only through ``op`` when given)."""
        return sum(e.sent for (n, o), e in self.entries.items() if n == name and (op is None or o == op))

    def received(self, name: str, op: Optional[str] = None) -> float:
        return sum(e.received for (n, o), e in self.entries.items() if n == name and (op is None or o == op))

    def calls(self, name: str, op: Optional[str] = None) -> int:
        return sum(e.calls for (n, o), e in self.entries.items() if n == name and (op is None or o == op))

    def snapshot(self) -> dict:
        """``{name: {"bytes": sent, "received": ..., "calls": ..., "ops": {op: {same keys}}}}``."""
        out: dict = {}
        for (name, op), e in sorted(self.entries.items()):
            g = out.setdefault(name, {"bytes": 0.0, "received": 0.0, "calls": 0, "ops": {}})
            g["bytes"] += e.sent
            g["received"] += e.received
            g["calls"] += e.calls
            g["ops"][op] = {"bytes": e.sent, "received": e.received, "calls": e.calls}
        return out


def group_size(group) -> int:
    """Size of ``group``; ``None`` means no process group (one process)."""
    return 1 if group is None else dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(ledger: Optional[CommLedger], name: str, op: str, sent: float, received: float) -> None:
    if ledger is not None:
        ledger.record(name, op, sent, received)


def all_reduce(t: torch.Tensor, group, ledger: Optional[CommLedger], name: str, op=dist.ReduceOp.SUM,
               async_op: bool = False):
    """In-place all-reduce of ``t`` (contiguous) over ``group``; returns ``t`` (or the Work when async)."""
    n = group_size(group)
    if n == 1:
        return None if async_op else t
    traffic = 2.0 * (n - 1) / n * _nbytes(t)
    _record(ledger, name, "all_reduce", traffic, traffic)
    work = dist.all_reduce(t, op=op, group=group, async_op=async_op)
    return work if async_op else t


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group, ledger: Optional[CommLedger], name: str,
                    async_op: bool = False):
    """Gather ``t`` from every rank into ``out`` (``n * t.numel()`` elements, rank order, along dim 0)."""
    n = group_size(group)
    if out.numel() != n * t.numel():
        raise ValueError(f"all_gather_into: output has {out.numel()} elements, expected group size {n} x "
                         f"input {t.numel()}")
    if n == 1:
        out.copy_(t.reshape(out.shape))
        return None if async_op else out
    traffic = (n - 1) / n * _nbytes(out)
    _record(ledger, name, "all_gather", traffic, traffic)
    work = _all_gather_flat(out, t.contiguous(), group=group, async_op=async_op)
    return work if async_op else out


def all_gather(t: torch.Tensor, dim: int, group, ledger: Optional[CommLedger], name: str) -> torch.Tensor:
    """Concatenate ``t`` from every rank of ``group`` (in rank order) along ``dim``."""
    n = group_size(group)
    if n == 1:
        return t
    dim = dim % t.dim()
    src = t.movedim(dim, 0).contiguous()
    out = torch.empty((n * src.shape[0],) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    all_gather_into(out, src, group, ledger, name)
    return out.movedim(0, dim)


def reduce_scatter(t: torch.Tensor, dim: int, group, ledger: Optional[CommLedger], name: str,
                   op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum ``t`` over ``group`` and return this rank's 1/n chunk along ``dim`` (rank order)."""
    n = group_size(group)
    if n == 1:
        return t
    dim = dim % t.dim()
    if t.shape[dim] % n != 0:
        raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(t.shape)} is not divisible by group size {n}")
    src = t.movedim(dim, 0).contiguous()
    out = torch.empty((src.shape[0] // n,) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    reduce_scatter_into(out, src, group, ledger, name, op=op)
    return out.movedim(0, dim)


def reduce_scatter_into(out: torch.Tensor, t: torch.Tensor, group, ledger: Optional[CommLedger], name: str,
                        op=dist.ReduceOp.SUM, async_op: bool = False):
    """Flat reduce-scatter: ``out`` receives this rank's chunk (along dim 0) of the sum of ``t``."""
    n = group_size(group)
    if t.numel() != n * out.numel():
        raise ValueError(f"reduce_scatter_into: input has {t.numel()} elements, expected group size {n} x "
                         f"output {out.numel()}")
    if n == 1:
        out.copy_(t.reshape(out.shape))
        return None if async_op else out
    traffic = (n - 1) / n * _nbytes(t)
    _record(ledger, name, "reduce_scatter", traffic, traffic)
    work = _reduce_scatter_flat(out, t.contiguous(), op=op, group=group, async_op=async_op)
    return work if async_op else out


def broadcast(t: torch.Tensor, src: int, group, ledger: Optional[CommLedger], name: str) -> torch.Tensor:
    """In-place broadcast of ``t`` from global rank ``src`` to every rank of ``group``."""
    n = group_size(group)
    if n == 1:
        return t
    is_src = dist.get_rank() == src
    _record(ledger, name, "broadcast", _nbytes(t) if is_src else 0.0, 0.0 if is_src else _nbytes(t))
    dist.broadcast(t, src=src, group=group)
    return t


def send(t: torch.Tensor, dst: int, group, ledger: Optional[CommLedger], name: str, async_op: bool = False):
    """Send ``t`` to global rank ``dst`` (a member of ``group``); returns the Work when ``async_op``."""
    _record(ledger, name, "send", _nbytes(t), 0.0)
    t = t.contiguous()
    if async_op:
        return dist.isend(t, dst=dst, group=group)
    dist.send(t, dst=dst, group=group)
    return None


def recv(t: torch.Tensor, src: int, group, ledger: Optional[CommLedger], name: str, async_op: bool = False):
    """Receive into ``t`` (contiguous) from global rank ``src``; returns the Work when ``async_op``."""
    if not t.is_contiguous():
        raise ValueError("recv: the receive buffer must be contiguous")
    _record(ledger, name, "recv", 0.0, _nbytes(t))
    if async_op:
        return dist.irecv(t, src=src, group=group)
    dist.recv(t, src=src, group=group)
    return None


def batch_send_recv(sends: list, recvs: list, group, ledger: Optional[CommLedger], name: str) -> list:
    """Post ``sends`` [(tensor, dst)] and ``recvs`` [(buffer, src)] together (no ordering deadlock);
    returns the Works to wait on. Ranks are global."""
    ops = []
    for t, dst in sends:
        _record(ledger, name, "send", _nbytes(t), 0.0)
        ops.append(dist.P2POp(dist.isend, t.contiguous(), dst, group))
    for t, src in recvs:
        if not t.is_contiguous():
            raise ValueError("batch_send_recv: receive buffers must be contiguous")
        _record(ledger, name, "recv", 0.0, _nbytes(t))
        ops.append(dist.P2POp(dist.irecv, t, src, group))
    return dist.batch_isend_irecv(ops) if ops else []
