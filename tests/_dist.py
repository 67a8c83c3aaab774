"""Run a function on N gloo processes on this machine (CPU distributed tests).

Usage::

    def _body(rank, world_size, arg):     # module-level, so it can be pickled
        ...                               # torch.distributed is initialised (gloo) here
        return something_picklable

    results = run_distributed(_body, 4, arg)   # list indexed by rank

Each rank gets OMP_NUM_THREADS=1 (2-core CI machines). An exception in any rank is re-raised in the
caller with that rank's traceback; a rank that hangs is killed after ``timeout`` seconds.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise here with plain pickle (tensors by value): tensors put on a torch.multiprocessing
        # queue travel as shared-memory handles owned by this process, which may have exited by the
        # time the parent unpickles them. The bytes come from our own child process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report any failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
