"""Pipeline parallelism: stage partitioning, model chunks, and point-to-point activation exchange.

Virtual stages. With ``pp`` stages and ``vpp`` model chunks per stage there are ``K = pp * vpp``
virtual stages; chunk ``c`` of stage ``r`` is virtual stage ``k = c * pp + r`` (Megatron's
interleaved assignment), and virtual stage ``k`` holds the ``k``-th contiguous block of layers.
So with pp=2, vpp=2 and 8 layers: stage 0 holds layers [0, 1] and [4, 5], stage 1 [2, 3] and [6, 7].
Activations flow k -> k+1 (stage r -> r+1, and stage pp-1 -> stage 0 between chunks); gradients
flow back k+1 -> k.

Point-to-point rule (no deadlock, no mismatched messages, on gloo and on in-order backends):

1. every send is non-blocking (``isend``), posted right after the compute that produced it, in the
   sender's action order, and only waited for at the end of the schedule;
2. a receive is posted lazily, when the receiver needs it, but always in the SENDER's send order:
   each rank can compute every other rank's action list (``schedules``), so before posting the
   receive it needs, it posts every earlier message that peer sends it (into fresh buffers);
3. a rank only ever blocks in ``wait()`` on a receive it needs for its next action.

Rule 2 makes the n-th receive a rank posts from a peer match the n-th send that peer posts to it
(gloo and NCCL both match point-to-point messages between a pair in posting order; with pp=2 the
same pair carries activations and gradients, so this matters). Rules 1 and 3 exclude deadlock: sends
never block, and a wait is for an action that precedes it in the schedule's dependency order.

Shapes are known in advance: ``[micro_batch, seq / tp (sequence parallel) or seq, hidden]``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM, check_context_parallel_positions, default_positions
from engine.model.spec import KernelPlan
from engine.parallel import comm


# ---- partitioning ------------------------------------------------------------------------------
def stage_layer_indices(num_layers: int, pp: int, vpp: int = 1,
                        explicit_layers_per_stage: Optional[Sequence[int]] = None) -> list[list[list[int]]]:
    """Global layer indices per ``[pp_rank][chunk]``.

    ``explicit_layers_per_stage`` gives the number of layers of each VIRTUAL stage, in virtual-stage
    order (``pp * vpp`` entries, ``k = chunk * pp + pp_rank``); by default layers are split evenly,
    which needs ``num_layers % (pp * vpp) == 0``.
    """
    for name, v in (("num_layers", num_layers), ("pp", pp), ("vpp", vpp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"stage_layer_indices: {name}={v!r} must be a positive integer")
    if vpp > 1 and pp == 1:
        raise ValueError(f"stage_layer_indices: vpp={vpp} (virtual pipeline) needs pp > 1")
    chunks = pp * vpp
    if explicit_layers_per_stage is None:
        if num_layers % chunks != 0:
            raise ValueError(f"num_layers={num_layers} is not divisible by pp={pp} x vpp={vpp} = {chunks}; "
                             "pass explicit layers per stage")
        counts = [num_layers // chunks] * chunks
    else:
        counts = list(explicit_layers_per_stage)
        if len(counts) != chunks:
            raise ValueError(f"layers_per_stage={counts} has {len(counts)} entries, expected pp={pp} x vpp={vpp} "
                             f"= {chunks} (one per virtual stage)")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
            raise ValueError(f"layers_per_stage={counts} must hold non-negative integers")
        if sum(counts) != num_layers:
            raise ValueError(f"layers_per_stage={counts} sums to {sum(counts)}, not num_layers={num_layers}")
    starts = [sum(counts[:k]) for k in range(chunks)]
    return [[list(range(starts[c * pp + r], starts[c * pp + r] + counts[c * pp + r])) for c in range(vpp)]
            for r in range(pp)]


def virtual_stage(pp_rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + pp_rank


def stage_of(virtual: int, pp: int) -> tuple[int, int]:
    """(pp_rank, chunk) of a virtual stage."""
    return virtual % pp, virtual // pp


# ---- model chunks ------------------------------------------------------------------------------
def build_model_chunks(config: GLMConfig, layout, model_cls=GLMForCausalLM, sequence_parallel: bool = False,
                       kernels: KernelPlan = KernelPlan(), layers_per_stage: Optional[Sequence[int]] = None,
                       seed: Optional[int] = 0) -> list[nn.Module]:
    """This rank's model chunks (one per virtual stage it owns), tensor-parallel per ``layout``.

    Chunk c gets the embedding when it is virtual stage 0 (``pre_process``) and the final norm and
    output layer when it is the last virtual stage (``post_process``). Weights are initialised
    layout-independently from ``seed`` (``sharding.init_parallel_weights_``): every layout starts
    from the same full model.
    """
    from engine.parallel.tensor_parallel import build_parallel_model
    pp, vpp = layout.pp_size, layout.vpp_size
    layers = stage_layer_indices(config.num_layers, pp, vpp, layers_per_stage)[layout.pp_rank]
    last = pp * vpp - 1
    chunks = []
    for c in range(vpp):
        k = virtual_stage(layout.pp_rank, c, pp)
        chunks.append(build_parallel_model(model_cls, config, layout, sequence_parallel, kernels, seed,
                                           layer_indices=layers[c], pre_process=k == 0, post_process=k == last))
    return chunks


def chunk_named_parameters(chunks: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` over every chunk (names are global: layers keep their global index)."""
    return [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]


def chunk_forward(chunk: nn.Module, input_ids: torch.Tensor, hidden: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor] = None,
                  position_ids: Optional[torch.Tensor] = None,
                  segment_ids: Optional[torch.Tensor] = None,
                  output_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One pipeline chunk: ``[b, s] ids`` (first chunk) or ``hidden [b, s(/tp), h]`` -> hidden, or the
    model's head output on the last chunk (``chunk.head``: logits ``[b, s, v(/tp)]`` of a causal LM,
    values ``[b, s]`` of a scalar-head model; with ``output_index``, flat positions of ``[b, s]`` from
    ``glm.head_positions``, only there: ``[n, v(/tp)]`` / ``[n]``). Every chunk sees the ids to derive
    rotary positions, and the packed-sequence ``segment_ids`` its attention needs."""
    check_context_parallel_positions(chunk.spec, position_ids)
    if position_ids is None:
        position_ids = default_positions(input_ids, attention_mask)
    if chunk.pre_process:
        hidden = chunk.embedding(input_ids)
    elif hidden is None:
        raise ValueError("chunk_forward: a chunk without the embedding needs the previous stage's hidden states")
    hidden = chunk.run_layers(hidden, position_ids, attention_mask, segment_ids=segment_ids)
    if not chunk.post_process:
        return hidden
    return chunk.head(chunk.final_norm(hidden), index=output_index)


def activation_shape(micro_batch_size: int, seq_length: int, hidden_size: int, tp: int,
                     sequence_parallel: bool) -> tuple[int, int, int]:
    """Shape of the tensor sent between stages: ``[b, s/tp, h]`` under sequence parallel, else ``[b, s, h]``."""
    if sequence_parallel and tp > 1:
        if seq_length % tp != 0:
            raise ValueError(f"sequence parallel needs seq_length={seq_length} divisible by tp={tp}")
        return micro_batch_size, seq_length // tp, hidden_size
    return micro_batch_size, seq_length, hidden_size


# ---- point-to-point ----------------------------------------------------------------------------
class PipelineP2P:
    """Activation/gradient exchange of one schedule run (see the module docstring for the rule).

    ``expected[src]``: the ordered messages ``(kind, virtual_stage, micro_batch)`` that ``src`` sends
    to this rank, ``kind`` "act" (to virtual stage k, from k-1) or "grad" (to k, from k+1).
    """

    def __init__(self, layout, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 orders: dict[int, list], forward_only: bool):
        self.layout, self.shape, self.dtype, self.device = layout, tuple(shape), dtype, device
        self.pp, self.vpp = layout.pp_size, layout.vpp_size
        self.num_virtual = self.pp * self.vpp
        self.expected: dict[int, list] = defaultdict(list)  # src pp rank -> messages in send order
        for src, actions in orders.items():
            for kind, chunk, mb in actions:
                k = virtual_stage(src, chunk, self.pp)
                if kind == "F" and k < self.num_virtual - 1 and stage_of(k + 1, self.pp)[0] == layout.pp_rank:
                    self.expected[src].append(("act", k + 1, mb))
                if kind == "B" and not forward_only and k > 0 and stage_of(k - 1, self.pp)[0] == layout.pp_rank:
                    self.expected[src].append(("grad", k - 1, mb))
        self.posted: dict[int, int] = defaultdict(int)
        self.pending: dict[tuple, tuple] = {}   # message -> (buffer, work)
        self.sends: list = []                   # (tensor, work): kept alive until finish()

    def _post_until(self, src: int, message: tuple) -> None:
        queue = self.expected[src]
        if message not in self.pending:
            try:
                target = queue.index(message, self.posted[src])
            except ValueError:
                raise RuntimeError(f"pipeline rank {self.layout.pp_rank}: message {message} is not sent by stage "
                                   f"{src} in its schedule") from None
            for i in range(self.posted[src], target + 1):
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                work = comm.recv(buffer, self.layout.pp_ranks[src], self.layout.pp_group, self.layout.ledger, "pp",
                                 async_op=True)
                self.pending[queue[i]] = (buffer, work)
            self.posted[src] = target + 1

    def recv(self, kind: str, virtual: int, mb: int) -> torch.Tensor:
        """Block until message (kind, virtual, mb) arrives; return its buffer."""
        src_virtual = virtual - 1 if kind == "act" else virtual + 1
        src = stage_of(src_virtual, self.pp)[0]
        message = (kind, virtual, mb)
        self._post_until(src, message)
        buffer, work = self.pending.pop(message)
        work.wait()
        return buffer

    def send(self, kind: str, virtual: int, mb: int, tensor: torch.Tensor) -> None:
        """Post the send of ``tensor`` to virtual stage ``virtual`` (an "act" for k or a "grad" for k)."""
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"pipeline send: tensor shape {tuple(tensor.shape)} != the agreed {self.shape} "
                             "(micro_batch, seq(/tp), hidden)")
        dst = self.layout.pp_ranks[stage_of(virtual, self.pp)[0]]
        t = tensor.detach().to(self.dtype).contiguous()
        self.sends.append((t, comm.send(t, dst, self.layout.pp_group, self.layout.ledger, "pp", async_op=True)))

    def finish(self) -> None:
        """Wait for every send; every expected receive must have been consumed."""
        for _, work in self.sends:
            work.wait()
        self.sends.clear()
        left = {src: len(q) - self.posted[src] for src, q in self.expected.items() if len(q) > self.posted[src]}
        if left or self.pending:
            raise RuntimeError(f"pipeline rank {self.layout.pp_rank}: unconsumed messages {left or list(self.pending)}")


def detached_output(output: torch.Tensor, microbatch: dict) -> torch.Tensor:
    """Default forward-only output function: the last stage's output, detached."""
    return output.detach()


LossFn = Callable[[torch.Tensor, dict], torch.Tensor]
