"""Data parallelism and the distributed optimizer against single-process torch.optim.AdamW.

One 4-process gloo launch: DP=2 (x TP=2) with plain all-reduce and with the distributed optimizer
(ZeRO-1: fp32 master + moments sharded over DP), gradient accumulation, sequence parallel,
clipping, bf16 params with fp32 master weights, DP=4, and the replicated-KV grad norm under TP=4.
The global batch (8 sequences) is split over DP; the reference trains on all of it at once.

Tolerances: fp32 runs differ from the reference only by summation order (TP partial sums, DP
averaging, micro-batch accumulation), ~1e-7 relative per gradient element; losses and grad norms
over 3 AdamW steps must agree to 1e-5 relative (observed ~1e-7). A missing DP average shows in the
grad norm (AdamW itself is almost scale invariant), a wrong shard or update in the loss (>1e-3).
bf16 params/activations round each value to 2^-9 ~ 2e-3 relative; errors average out over the
4096-way softmax and 64 tokens, so the loss must stay within 5e-3 relative (observed ~6e-4).
"""
import math

import pytest
import torch
import torch.distributed as dist

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.optim import DistributedOptimizer
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.mappings import gather_from_tp
from engine.parallel.sharding import load_full_into
from engine.parallel.tensor_parallel import mark_parameters, tensor_parallel_spec
from tests._dist import run_distributed

GLOBAL_BATCH, S, STEPS = 8, 8, 3
HYPER = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP = 0.5  # below the initial grad norm (~1.9), so clipping is active


def _config() -> GLMConfig:
    return GLMConfig.preset("tiny").replace(num_layers=2)


def _data(config):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, S), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _vocab_sharded_loss(logits, labels, layout):
    """Mean cross entropy of vocab-sharded logits (gathered over TP; switch to
    ``kernels.cross_entropy(logits, labels, group=layout.tp_group)`` once that kernel lands)."""
    return kernels.cross_entropy(gather_from_tp(logits, layout), labels)


def _init_model(config) -> GLMForCausalLM:
    torch.manual_seed(0)
    return GLMForCausalLM(config)


def _reference(clip):
    """Single process, full global batch, torch.optim.AdamW: losses L0..L3 and grad norms."""
    config = _config()
    ids, labels = _data(config)
    model = _init_model(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], foreach=False, **HYPER)
    losses, norms = [], []
    for step in range(STEPS + 1):
        loss = kernels.cross_entropy(model(ids), labels)
        losses.append(loss.item())
        if step == STEPS:
            break
        opt.zero_grad()
        loss.backward()
        # fp64 norm: torch's fp32 clip_grad_norm_ accumulates ~3e-5 relative error on these tensors
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt().item()
        if clip is not None and clip / (norm + 1e-6) < 1.0:  # torch.nn.utils.clip_grad_norm_'s rule
            for p in model.parameters():
                p.grad.mul_(clip / (norm + 1e-6))
        norms.append(norm)
        opt.step()
    return losses, norms


def _train(config, layout, *, distributed, mixed_precision="fp32", sp=False, micro_batches=1, clip=None,
           steps=STEPS, model=None, optimizer=None, overlap=False, launched=None):
    """Train ``steps`` AdamW steps on this DP rank's slice of the global batch; the loss before each
    step and after the last is averaged over DP. ``overlap``: announce the micro-batches so buckets
    reduce during the last backward; ``launched`` (a list) collects, per step, whether each bucket's
    reduction had started before ``step()``."""
    ids, labels = _data(config)
    per_rank = GLOBAL_BATCH // layout.dp_size
    ids = ids[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    labels = labels[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    if model is None:
        model = GLMForCausalLM(config, tensor_parallel_spec(config, layout, sp))
        mark_parameters(model, layout, sp)
        load_full_into(model, _init_model(config).state_dict(), layout)
    if optimizer is None:
        optimizer = DistributedOptimizer(model.named_parameters(), layout, use_distributed_optimizer=distributed,
                                         bucket_size_bytes=256 * 1024,  # several buckets on the tiny model
                                         mixed_precision=mixed_precision, max_grad_norm=clip,
                                         overlap_grad_reduce=overlap, **HYPER)
    losses, norms = [], []
    optimizer.prepare_backward(micro_batches)
    layout.ledger.reset()
    for step in range(steps + 1):
        total = 0.0
        for mb_ids, mb_labels in zip(ids.chunk(micro_batches), labels.chunk(micro_batches)):
            with torch.set_grad_enabled(step < steps):
                loss = _vocab_sharded_loss(model(mb_ids), mb_labels, layout) / micro_batches
                if step < steps:
                    loss.backward()
            total += loss.item()
        t = torch.tensor([total / layout.dp_size], dtype=torch.float64)
        if layout.dp_size > 1:
            dist.all_reduce(t, group=layout.dp_group)
        losses.append(t.item())
        if step < steps:
            if launched is not None:
                launched.append([w is not False for w in optimizer._works])
            norm, skipped = optimizer.step()
            assert not skipped
            norms.append(norm)
            optimizer.zero_grad()
            optimizer.prepare_backward(micro_batches)
    return losses, norms, model, optimizer


def _resume_case(config, layout):
    """state_dict after 2 steps, loaded into a fresh model + optimizer, continues identically."""
    _, _, model, opt = _train(config, layout, distributed=True, steps=2)
    state = opt.state_dict()
    cont, _, _, _ = _train(config, layout, distributed=True, steps=1, model=model, optimizer=opt)
    fresh = GLMForCausalLM(config, tensor_parallel_spec(config, layout))
    mark_parameters(fresh, layout, False)
    fresh_opt = DistributedOptimizer(fresh.named_parameters(), layout, use_distributed_optimizer=True,
                                     bucket_size_bytes=256 * 1024, **HYPER)
    fresh_opt.load_state_dict(state)  # publishes the master weights into the fresh params
    resumed, _, _, _ = _train(config, layout, distributed=True, steps=1, model=fresh, optimizer=fresh_opt)
    return cont, resumed


def _world4(rank, world_size):
    config = _config()
    tp2dp2 = ParallelLayout.build(ParallelDims(tp=2, dp=2), name="tp2dp2")
    dp4 = ParallelLayout.build(ParallelDims(dp=4), name="dp4")
    tp4 = ParallelLayout.build(ParallelDims(tp=4), name="tp4")
    out = {}
    out["plain"] = _train(config, tp2dp2, distributed=False)[:2]
    out["zero"] = _train(config, tp2dp2, distributed=True)[:2]
    out["zero_sp_accum_clip"] = _train(config, tp2dp2, distributed=True, sp=True, micro_batches=2, clip=CLIP)[:2]
    out["dp4_plain_accum"] = _train(config, dp4, distributed=False, micro_batches=2)[:2]
    losses, norms, model, opt = _train(config, dp4, distributed=True, mixed_precision="bf16")
    out["dp4_zero_bf16"] = (losses, norms)
    out["bf16_dtypes"] = ({p.dtype for p in model.parameters()}, {b.master.dtype for b in opt.buckets},
                          {b.exp_avg.dtype for b in opt.buckets})
    out["tp4_replicated_kv_clip"] = _train(config, tp4, distributed=True, sp=True, clip=CLIP)[:2]
    for distributed in (False, True):  # DP traffic of 3 steps, for the analytic check
        _, _, _, opt = _train(config, tp2dp2, distributed=distributed)
        out[("dp_ledger", distributed)] = (tp2dp2.ledger.snapshot()["dp"], [b.numel for b in opt.buckets])
    out["resume"] = _resume_case(config, tp2dp2)
    for case, layout, kwargs in (("zero_sp_accum_clip", tp2dp2, dict(distributed=True, sp=True, micro_batches=2,
                                                                    clip=CLIP)),
                                 ("dp4_plain_accum", dp4, dict(distributed=False, micro_batches=2))):
        launched = []
        out[case + "_overlap"] = _train(config, layout, overlap=True, launched=launched, **kwargs)[:2] + (launched,)
    out["overlap_error"] = _too_many_passes(config, dp4)
    return out


def _too_many_passes(config, layout) -> str:
    """A third backward after prepare_backward(2) announced two: the hook refuses it."""
    model = GLMForCausalLM(config)
    opt = DistributedOptimizer(model.named_parameters(), layout, bucket_size_bytes=256 * 1024,
                               overlap_grad_reduce=True, **HYPER)
    ids, labels = _data(config)
    opt.prepare_backward(2)
    try:
        for _ in range(3):
            kernels.cross_entropy(model(ids[:1]), labels[:1]).backward()
    except RuntimeError as e:
        return str(e)
    finally:
        opt.zero_grad()  # waits for the launched reductions
    return "no error"


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4, 4)


@pytest.fixture(scope="module")
def reference():
    return _reference(None)


@pytest.fixture(scope="module")
def reference_clipped():
    return _reference(CLIP)


def _close(a, b, rel):
    return all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("case", ["plain", "zero", "dp4_plain_accum"])
def test_dp_matches_single_process(world4, reference, case):
    ref_losses, ref_norms = reference
    assert ref_losses[-1] < ref_losses[0] - 0.05  # the steps do change the model
    for rank, res in enumerate(world4):
        losses, norms = res[case]
        assert _close(losses, ref_losses, 1e-5), (rank, losses, ref_losses)
        assert _close(norms, ref_norms, 1e-5), (rank, norms, ref_norms)


@pytest.mark.parametrize("case", ["zero_sp_accum_clip", "tp4_replicated_kv_clip"])
def test_clipped_grad_norm_over_tp_dp_matches(world4, reference_clipped, case):
    ref_losses, ref_norms = reference_clipped
    assert ref_norms[0] > CLIP
    for rank, res in enumerate(world4):
        losses, norms = res[case]
        assert _close(norms, ref_norms, 1e-5), (rank, norms, ref_norms)
        assert _close(losses, ref_losses, 1e-5), (rank, losses, ref_losses)


@pytest.mark.parametrize("case", ["zero_sp_accum_clip", "dp4_plain_accum"])
def test_overlapped_grad_reduction_is_identical(world4, case):
    """Reducing each bucket from the grad hook during the last micro-batch's backward gives bitwise the
    same losses and norms as reducing after the backward (same buckets, same collectives), and every
    bucket had started before step()."""
    for rank, res in enumerate(world4):
        losses, norms, launched = res[case + "_overlap"]
        assert (losses, norms) == res[case], rank
        assert launched and all(all(step) for step in launched), (rank, launched)
        assert "announced fewer backward passes than ran" in res["overlap_error"], res["overlap_error"]


def test_bf16_params_fp32_master(world4, reference):
    ref_losses, _ = reference
    for rank, res in enumerate(world4):
        assert res["bf16_dtypes"] == ({torch.bfloat16}, {torch.float32}, {torch.float32})
        losses, _ = res["dp4_zero_bf16"]
        assert _close(losses, ref_losses, 5e-3), (rank, losses, ref_losses)
        assert losses[-1] < losses[0] - 0.05, (rank, losses)


def test_optimizer_state_resume_is_exact(world4):
    for res in world4:
        cont, resumed = res["resume"]
        assert cont == resumed


@pytest.mark.parametrize("distributed", [False, True])
def test_dp_ledger_matches_analytic_bytes(world4, distributed):
    n = 2
    for res in world4:
        snap, bucket_numels = res[("dp_ledger", distributed)]
        grads = sum(bucket_numels) * 4  # fp32 gradient buffers, padded to a multiple of dp
        if distributed:  # per step: reduce-scatter grads, all-gather fp32 params, all-reduce the fp64 norm
            expected = STEPS * ((n - 1) / n * grads * 2 + 2 * (n - 1) / n * 8)
            calls = {"reduce_scatter": STEPS * len(bucket_numels), "all_gather": STEPS * len(bucket_numels),
                     "all_reduce": STEPS}
        else:            # per step: all-reduce every gradient bucket
            expected = STEPS * 2 * (n - 1) / n * grads
            calls = {"all_reduce": STEPS * len(bucket_numels)}
        assert len(bucket_numels) > 1 and all(m % n == 0 for m in bucket_numels)
        assert math.isclose(snap["bytes"], expected, rel_tol=1e-12), (snap, expected)
        assert {op: v["calls"] for op, v in snap["ops"].items()} == calls


def test_single_process_optimizer_matches_torch_adamw_and_guards_accumulation():
    """No process group: ParallelLayout.single(); params equal torch.optim.AdamW's after 2 steps."""
    config = _config().replace(num_layers=1)
    ids, labels = _data(config)
    ours, theirs = _init_model(config), _init_model(config)
    opt = DistributedOptimizer(ours.named_parameters(), ParallelLayout.single(), bucket_size_bytes=2**20, **HYPER)
    ref_opt = torch.optim.AdamW([{"params": [p for p in theirs.parameters() if p.dim() >= 2]},
                                 {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                foreach=False, **HYPER)
    for _ in range(2):
        kernels.cross_entropy(ours(ids), labels).backward()
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        kernels.cross_entropy(theirs(ids), labels).backward()
        ref_opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        # same fp32 math on the same grads; only AdamW's own rounding may differ (elementwise ops)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    kernels.cross_entropy(ours(ids), labels).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        kernels.cross_entropy(ours(ids), labels).backward()
    with pytest.raises(RuntimeError, match="prepare_backward.*call zero_grad"):
        opt.prepare_backward(1)  # this step's buckets are reduced: re-arming them needs zero_grad first
