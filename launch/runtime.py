"""What every entry point shares: the process group and device under torchrun, rank-0-first cache
building, and the one-line error exit.

    with Processes() as procs:          # torchrun: NCCL on CUDA, else gloo; a plain `python -m`: none
        layout = ParallelLayout.build(dims) if procs.distributed else ParallelLayout.single()
        tokenizer = procs.rank0_first(layout.rank, default_tokenizer)
        ...
        procs.done()                    # a clean end: every rank meets before the teardown
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def exit_process(code: int) -> None:
    """End a CLI process with ``code``. Under torchrun: flush the output and ``os._exit``, skipping the
    interpreter's finalization. The ProcessGroupGloo objects stay referenced past
    ``destroy_process_group`` (layouts, and tensor-parallel specs captured in the models), so
    their C++ destructors would otherwise run during finalization. That has been seen to abort a rank
    with "terminate called without an active exception" (SIGABRT) after a clean run: seen twice here in
    a few dozen 2-4 process gloo launches. pytorch/pytorch#179291 discusses this teardown."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def error(prog: str, message: str) -> int:
    """Print ``prog: error: message`` once (rank 0) and return the CLI's exit code 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


class Processes:
    """The process group of a torchrun launch (none for a single process) and this rank's device."""

    def __init__(self):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
        cuda = torch.cuda.is_available()
        self.device = torch.device("cpu")
        if self.distributed:
            if cuda:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo")
        elif cuda:
            self.device = torch.device("cuda", 0)

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.distributed else "single process"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def rank0_first(self, rank: int, build: Callable[[], T]) -> T:
        """``build()`` on rank 0, then on the others: rank 0 creates a shared cache (tokenizer, built-in
        dataset) that the others then only read."""
        if rank == 0:
            value = build()
        self.barrier()
        if rank != 0:
            value = build()
        return value

    def tokenizer(self, rank: int, path, cache_dir, vocab_size: int):
        """A run's tokenizer: ``path`` (a ChatGLM ``tokenizer.model`` or a directory holding one, e.g. the model's
        own directory), read by every rank (so a bad file stops every rank alike), or when None the built-in
        one (``default_tokenizer``: rank 0 trains and caches it first). A tokenizer with more ids than the
        model's ``vocab_size`` rows is refused, on every rank."""
        from engine.data.tokenizer import GLMTokenizer, default_tokenizer
        if path is not None:
            tokenizer = GLMTokenizer.from_file(path)
        else:
            tokenizer = self.rank0_first(rank, lambda: default_tokenizer(cache_dir))
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer ({path or 'built-in'}) has {tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size={vocab_size}")
        return tokenizer

    def done(self) -> None:
        """A clean end: no rank tears its connections down while a peer still has traffic in flight."""
        self.barrier()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def close_after_error(close: Callable[[], object], prog: str) -> None:
    """Run ``close`` (e.g. waiting for a checkpoint save in flight) while another error is propagating:
    its own failure is printed, not raised, so the original error stays the one reported."""
    try:
        close()
    except Exception as e:
        print(f"{prog}: while handling an error, closing also failed: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)


def check_tokenizer(tokenizer: Optional[str], init_from: Optional[str], flag: str) -> None:
    """ValueError for a ``--tokenizer`` path that does not exist, or for a run that starts from a released model
    directory with the built-in tokenizer (which belongs to the tiny model)."""
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"--tokenizer {tokenizer}: no such file or directory")
    from engine.model.hf_adapter import model_dir_type
    if tokenizer is None and init_from and model_dir_type(init_from) is not None:
        raise ValueError(f"{flag} {init_from} is a released model directory: pass its tokenizer with --tokenizer "
                         "(its tokenizer.model, or the directory); the built-in tokenizer belongs to the tiny model")
