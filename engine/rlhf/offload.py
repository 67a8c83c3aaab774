"""Offloading for the co-located RLHF models, and a measured ledger of what is resident on the device.

Four models share every rank (actor, critic, reference, reward) but each phase of a PPO iteration
needs only some of them: sampling needs the actor's generation copy and its KV cache, scoring needs
one model at a time, each update needs one model and its optimizer. ``Offloader`` keeps named groups
of tensors either on the compute device or in host memory:

    "<model>"        a model's weights: for a trained model the optimizer's flat param buffers (its
                     params are views of them; with fp32 params and no ZeRO they are also the master
                     weights), plus any parameter outside the optimizer; for a frozen model each
                     parameter
    "<model>.optim"  a trained model's optimizer state (separate fp32 master weights, both moments);
                     offloading also releases its gradient buffers (nothing reads them between a step
                     and the next ``zero_grad``, which allocates them again), so they are never copied

``ensure(*names)`` puts exactly the named groups on the device (a ``.optim`` group brings its model's
weights along: the optimizer's kernels read both): it offloads the others first, so their device
memory is free before anything is brought in (the safe swap order), then onloads. Each group's host
copy is one arena allocated at its first offload and reused, so a round trip costs two copies and no
host allocation. On CUDA the arena is page-locked in place (``cudaHostRegister``, exact size; torch's
pinned allocator would round each allocation up to a power of two and cache it), so copies in both
directions run at PCIe/NVLink-C2C speed. Parameters keep their identity (``p.data`` is re-pointed), so
optimizers, hooks and checkpoint code see the same objects. A trained model's gradient buffers are
released whenever its weights or optimizer state move; ``zero_grad`` allocates them again next to the
weights.

``device_bytes(tensors)`` measures residency from the tensors themselves: the bytes of the distinct
storages among them (views of one flat buffer count once), which is what the device allocator holds
for them. On a CPU device, offloading copies between two CPU tensors: it exercises the mechanism (the
tests), nothing more.
"""
from __future__ import annotations

import mmap
import weakref
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn


def device_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes of the distinct storages on ``device`` among ``tensors`` (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            continue
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _Group:
    """Tensors that move together: ``get() -> {key: tensor}``, ``put({key: tensor})`` re-points their
    owners at new copies, ``after_move()`` runs after either direction; ``measured()``: more tensors
    the group holds wherever they are (gradient buffers: empty once released); ``needs``: the group
    that must be resident with this one."""

    def __init__(self, get, put, after_move=None, measured=None, needs: Optional[str] = None):
        self.get, self.put, self.after_move = get, put, after_move
        self.measured = measured or dict
        self.needs = needs
        self.on_device = True


_ALIGN = 256  # bytes: every tensor in a host arena starts at a multiple (vectorised copies, any dtype)


def _page_aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory starting on a page boundary, with the rest of its last page its own:
    two arenas never share a page, so registering one never overlaps another (which CUDA refuses)."""
    page = mmap.PAGESIZE
    size = -(-nbytes // page) * page
    raw = torch.empty(size + page, dtype=torch.uint8, device="cpu")
    start = -raw.data_ptr() % page
    return raw[start:start + nbytes]


def _page_locked(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory, page-locked in place on CUDA (its pages, not a power-of-two block)."""
    arena = _page_aligned(nbytes)
    cudart = torch.cuda.cudart()
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    torch.cuda.check_error(cudart.cudaHostRegister(arena.data_ptr(), size, 0))
    weakref.finalize(arena, cudart.cudaHostUnregister, arena.data_ptr())
    return arena


def _parameter_group(params: dict[str, nn.Parameter]) -> _Group:
    def put(tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            params[key].data = t
    return _Group(lambda: {k: p.data for k, p in params.items()}, put)


class Offloader:
    """Named groups of tensors moved between ``device`` and host memory (module docstring). With
    ``enabled=False`` nothing moves and every group stays resident; ``resident_tensors`` still tells
    what is there, so the ledger compares both modes."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = torch.device(device), enabled
        self.pin = self.device.type == "cuda"
        self.groups: dict[str, _Group] = {}
        self._host: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # group -> (arena, views)

    def add_model(self, name: str, chunks: Sequence[nn.Module], optimizer=None) -> None:
        """Register a model's weights as group ``name`` and, given its ``DistributedOptimizer``, the
        optimizer state as ``name.optim``."""
        if name in self.groups:
            raise ValueError(f"Offloader: a group named {name!r} exists already")
        managed = {id(p) for p in optimizer.params} if optimizer is not None else set()
        loose: dict[str, nn.Parameter] = {}
        seen: set = set()
        for c, chunk in enumerate(chunks):
            for key, p in chunk.named_parameters():
                if id(p) not in managed and id(p) not in seen:
                    seen.add(id(p))
                    loose[f"chunk{c}.{key}"] = p
        if optimizer is None:
            self.groups[name] = _parameter_group(loose)
            return
        params = _parameter_group(loose)

        def get_params() -> dict[str, torch.Tensor]:
            return {**optimizer.param_buffers(), **params.get()}

        def put_params(tensors: dict[str, torch.Tensor]) -> None:
            optimizer.set_buffers({k: t for k, t in tensors.items() if k.startswith("bucket")})
            params.put({k: t for k, t in tensors.items() if not k.startswith("bucket")})

        self.groups[name] = _Group(get_params, put_params, after_move=optimizer.release_grads)
        self.groups[f"{name}.optim"] = _Group(optimizer.state_buffers, optimizer.set_buffers,
                                              after_move=optimizer.release_grads, measured=optimizer.grad_buffers,
                                              needs=name)

    # ---- moving ------------------------------------------------------------------------------
    def ensure(self, *names: str) -> None:
        """Exactly ``names`` on the device, every other group in host memory (offloads first)."""
        unknown = [n for n in names if n not in self.groups]
        if unknown:
            raise ValueError(f"Offloader: unknown groups {unknown}; registered: {sorted(self.groups)}")
        if not self.enabled:
            return
        names = tuple(dict.fromkeys([*names, *(self.groups[n].needs for n in names if self.groups[n].needs)]))
        for name, group in self.groups.items():
            if name not in names and group.on_device:
                self._offload(name, group)
        for name in names:
            if not self.groups[name].on_device:
                self._onload(name, self.groups[name])

    def ensure_all(self) -> None:
        """Every group on the device (what a run without offloading holds)."""
        self.ensure(*self.groups)

    def _arena(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host views shaped like ``tensors``, in group ``name``'s arena (made at the first offload, or
        again if the group's tensors changed shape or dtype)."""
        cached = self._host.get(name)
        if cached is not None and all(k in cached[1] and cached[1][k].shape == t.shape and
                                      cached[1][k].dtype == t.dtype for k, t in tensors.items()):
            return cached[1]
        offsets, total = {}, 0
        for key, t in tensors.items():
            offsets[key] = total
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        arena = _page_locked(total) if self.pin else torch.empty(total, dtype=torch.uint8, device="cpu")
        views = {key: arena[offsets[key]:offsets[key] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                 for key, t in tensors.items()}
        self._host[name] = (arena, views)
        return views

    @torch.no_grad()
    def _offload(self, name: str, group: _Group) -> None:
        tensors = group.get()
        host = self._arena(name, tensors)
        for key, t in tensors.items():
            host[key].copy_(t)  # synchronous: the device tensor may be freed as soon as it is replaced
        group.put({key: host[key] for key in tensors})
        if group.after_move is not None:
            group.after_move()
        group.on_device = False

    @torch.no_grad()
    def _onload(self, name: str, group: _Group) -> None:
        # copy=True: a new device tensor even when the device is the CPU, so the host copy stays the
        # host copy (a view of it would be overwritten by the next offload)
        group.put({key: t.to(self.device, non_blocking=self.pin, copy=True) for key, t in group.get().items()})
        if group.after_move is not None:
            group.after_move()
        group.on_device = True

    # ---- measuring ---------------------------------------------------------------------------
    def resident_tensors(self) -> list[torch.Tensor]:
        """The tensors of every group on the device, and every group's gradient buffers (``device_bytes``
        skips those in host memory and the released, empty ones)."""
        out = [t for g in self.groups.values() if g.on_device or not self.enabled for t in g.get().values()]
        return out + [t for g in self.groups.values() for t in g.measured().values()]

    def resident_bytes(self, extra: Iterable[torch.Tensor] = ()) -> int:
        """Device bytes of the resident groups plus ``extra`` tensors (e.g. a generation copy), each
        storage once."""
        return device_bytes([*self.resident_tensors(), *extra], self.device)

    def host_bytes(self) -> int:
        """Host memory held for offloaded copies (the arenas: allocated once, reused)."""
        return sum(arena.numel() for arena, _ in self._host.values())

    def where(self) -> dict[str, str]:
        """``{group: "device" | "host"}``."""
        return {n: ("device" if g.on_device or not self.enabled else "host") for n, g in self.groups.items()}


__all__ = ["Offloader", "device_bytes"]
