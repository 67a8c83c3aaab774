"""Vocab-parallel cross entropy / token log-probs (+ entropy) on 2 and 4 gloo processes.

Each rank holds the contiguous vocab slice [r * V/tp, (r + 1) * V/tp) of the logits and the global
labels. The loss (identical on every rank) and the gradient of each shard, concatenated in rank
order, must match the unsharded single-process result: judged against an fp64 reference by the rule
in _tolerance.py (at most 2x the error of the single-process torch backend + a floor of 8 fp32 ulps).
All cases for one world size run in a single launch (process start-up dominates the runtime).
The Triton backend runs under the interpreter in the children: TRITON_INTERPRET=1 is set by
tests/conftest.py in os.environ, which spawned processes inherit.
"""
import io
import os

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from _tolerance import assert_within_torch_error

VOCAB = 1000  # divisible by 2 and 4: shards of 500 (two 256-chunks under the interpreter) and 250
TOKENS = (2, 13)
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["torch", "triton"]

# gloo runs the ranks on CPU tensors, so the Triton backend needs the interpreter there; a GPU run of
# tests/kernels (TRITON_INTERPRET=0) would only repeat the torch-backend cases at a process-spawn cost.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="CPU gloo test: its Triton backend runs under the interpreter")


def _inputs(dtype):
    g = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(*TOKENS, VOCAB, generator=g) + 2).to(dtype)
    # a padded vocabulary: the last 260 entries masked in a few rows, so with tp=4 the last rank's
    # whole shard is -inf there (its local max is -inf and it must contribute exactly nothing)
    logits[1, :4, VOCAB - 260:] = float("-inf")
    labels = torch.randint(0, VOCAB - 260, TOKENS, generator=g)
    labels[0, 1:] = torch.randint(0, VOCAB, (TOKENS[1] - 1,), generator=g)  # labels on every shard
    ce_labels = labels.clone()
    ce_labels.view(-1)[::4] = IGNORE
    up = torch.randn(TOKENS, generator=g)
    up_h = torch.randn(TOKENS, generator=g)
    return logits, labels, ce_labels, up, up_h


def _run_cases(logits, labels, ce_labels, up, up_h, group, backend):
    """Returns {case: [outputs..., dlogits]}; logits is the (local shard of the) vocab."""
    from kernels import cross_entropy, token_logprobs

    results = {}
    for reduction in ("none", "mean"):
        z = logits.detach().clone().requires_grad_()
        loss = cross_entropy(z, ce_labels, ignore_index=IGNORE, group=group, reduction=reduction, backend=backend)
        (dz,) = torch.autograd.grad(loss, z, up if reduction == "none" else None)
        results[f"cross_entropy_{reduction}"] = [loss.detach(), dz]
    z = logits.detach().clone().requires_grad_()
    lp, ent = token_logprobs(z, labels, group=group, return_entropy=True, backend=backend)
    (dz,) = torch.autograd.grad([lp, ent], z, [up, up_h])
    results["token_logprobs_entropy"] = [lp.detach(), ent.detach(), dz]
    z = logits.detach().clone().requires_grad_()
    lp = token_logprobs(z, labels, group=group, backend=backend)
    (dz,) = torch.autograd.grad(lp, z, up)
    results["token_logprobs"] = [lp.detach(), dz]
    return results


def _rank_body(rank, world_size):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("TRITON_INTERPRET=1 did not reach the spawned rank")
    group = dist.new_group(list(range(world_size)))  # a (sub)group object, as the engine passes
    shard = VOCAB // world_size
    out = {}
    for dtype in DTYPES:
        logits, labels, ce_labels, up, up_h = _inputs(dtype)
        local = logits[..., rank * shard:(rank + 1) * shard]
        for backend in BACKENDS:
            out[(str(dtype), backend)] = _run_cases(local, labels, ce_labels, up, up_h, group, backend)
    # Serialised to bytes: tensors put on a torch.multiprocessing queue travel as shared-memory handles
    # served by this process, which may already have exited when the parent unpickles them.
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def _fp64_reference(logits, labels, ce_labels, up, up_h):
    results = {}
    valid = ce_labels != IGNORE
    for reduction in ("none", "mean"):
        z = logits.double().requires_grad_()
        logp = torch.log_softmax(z, -1)
        nll = -logp.gather(-1, ce_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
        loss = nll if reduction == "none" else nll.sum() / valid.sum()
        (dz,) = torch.autograd.grad(loss, z, up.double() if reduction == "none" else None)
        results[f"cross_entropy_{reduction}"] = [loss.detach(), dz]
    for entropy in (True, False):
        z = logits.double().requires_grad_()
        logp = torch.log_softmax(z, -1)
        outs = [logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)]
        if entropy:
            outs.append(-(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1))
        (dz,) = torch.autograd.grad(outs, z, [up.double(), up_h.double()][: len(outs)])
        results["token_logprobs_entropy" if entropy else "token_logprobs"] = [o.detach() for o in outs] + [dz]
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"tp{w}")
def sharded(request):
    per_rank = run_distributed(_rank_body, request.param)
    return request.param, [torch.load(io.BytesIO(b), weights_only=True) for b in per_rank]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_matches_single_process(sharded, dtype, backend):
    world_size, per_rank = sharded
    inputs = _inputs(dtype)
    truth = _fp64_reference(*inputs)
    single = _run_cases(*inputs, group=None, backend="torch")  # unsharded plain-PyTorch results
    for case, want in truth.items():
        ranks = [r[(str(dtype), backend)][case] for r in per_rank]
        *outputs, _ = ranks[0]
        for r, got in enumerate(ranks[1:], start=1):
            for o0, o in zip(outputs, got[:-1]):
                assert torch.equal(o0, o), f"{case}: rank {r}'s output differs from rank 0's (must be replicated)"
        dz = torch.cat([got[-1] for got in ranks], dim=-1)  # shards in rank order = the full vocab
        names = [f"out{i}" for i in range(len(outputs))] + ["dlogits"]
        for name, o, ref, t in zip(names, outputs + [dz], single[case], want):
            assert_within_torch_error(f"tp{world_size} {backend} {dtype} {case} {name}", o, ref, t)
        assert (dz[torch.isneginf(inputs[0])] == 0).all(), f"{case}: masked (-inf) logits must get zero gradient"
