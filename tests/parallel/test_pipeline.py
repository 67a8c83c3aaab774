"""Pipeline parallelism: partitioning, schedule orders, and 1F1B / interleaved runs on gloo.

Pure tests check the layer assignment (Megatron's interleaved rule, explicit lists, bad inputs) and
the action orders (every micro-batch forward and backward once per chunk, warm-up depths, no
deadlock, analytic bubble reproduced by the replay with equal stage costs).

Two gloo launches (world size 2 and 4) run pp=2 and pp=4 with 1F1B and interleaved (vpp=2):

- parity: the summed micro-batch losses and every parameter's gradient (gathered over stages) equal
  the single-process model's on the whole batch. fp32; only summation order differs (gradients
  accumulate over micro-batches), so 1e-5 of each tensor's max (observed ~1e-7) and 1e-6 relative
  on the loss; a missing or duplicated micro-batch, or a mismatched message, is off by O(1).
- forward-only: last-stage logits equal the reference logits; ``Trainer.evaluate`` equals the loss.
- timeline: every forward starts (wall clock, one host) after its producer on the previous stage
  finished, every backward after its consumer's backward: the messages carry the right data at the
  right time.
- bubble: a layer-dominated model (vocab 256, 4 layers per stage, so 2 per chunk interleaved, 128
  tokens per micro-batch). The replayed bubble (measured per-action CPU costs, ``schedules`` module
  doc) must be within 0.06 of the analytic (p-1)/(v m+p-1): stage costs are not exactly equal
  (embedding on the first stage, output layer and loss on the last, ~10% of a layer) and CPU costs
  jitter on the shared 2-core machine, where four processes share two cores at pp=4. With 8 layers
  at pp=4 (one layer per interleaved chunk, so the imbalance weighs twice as much) the interleaved
  deviation was +0.02 to +0.035 on an idle machine and +0.064 once in CI; with 16 it was +0.007 to
  +0.026 over 6 runs. Interleaving must lower it by at least a quarter of the analytic gap.
  The wall-clock bubble is not asserted against the formula: with 4 processes on 2 shared cores a stage that waits lets another one run, so wall
  clocks measure the machine's load as much as the schedule.
"""
import math

import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.accounting import analytic_bubble
from engine.parallel.pipeline import activation_shape, build_model_chunks, stage_layer_indices
from engine.parallel.schedules import (action_order, interleaved_order, measure_bubble, one_f_one_b_order,
                                       replay_makespan, run_schedule)
from engine.parallel.sharding import gather_full_state_dict, load_full_into
from engine.train import LRConfig, LRSchedule, OptimizerConfig, TrainConfig, Trainer, build_optimizer
from tests._dist import run_distributed


# ---- partitioning ------------------------------------------------------------------------------
def test_even_partition_and_interleaved_assignment():
    assert stage_layer_indices(8, 1) == [[list(range(8))]]
    assert stage_layer_indices(8, 4) == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    # chunk c of stage r is virtual stage c * pp + r: stage 0 holds blocks 0 and 2 of 4
    assert stage_layer_indices(8, 2, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert stage_layer_indices(8, 4, 2) == [[[0], [4]], [[1], [5]], [[2], [6]], [[3], [7]]]


def test_explicit_layers_per_stage():
    # virtual-stage order: k = c * pp + r
    assert stage_layer_indices(7, 2, 1, [3, 4]) == [[[0, 1, 2]], [[3, 4, 5, 6]]]
    assert stage_layer_indices(6, 2, 2, [1, 2, 2, 1]) == [[[0], [3, 4]], [[1, 2], [5]]]
    assert stage_layer_indices(3, 2, 1, [0, 3]) == [[[]], [[0, 1, 2]]]


@pytest.mark.parametrize("args,match", [
    ((7, 2, 1, None), "not divisible by pp=2 x vpp=1"),
    ((8, 1, 2, None), "needs pp > 1"),
    ((8, 2, 1, [4, 3]), "sums to 7"),
    ((8, 2, 1, [8]), "expected pp=2 x vpp=1 = 2"),
    ((8, 2, 1, [9, -1]), "non-negative"),
    ((0, 2, 1, None), "num_layers=0"),
    ((8, 0, 1, None), "pp=0"),
])
def test_bad_partitions(args, match):
    with pytest.raises(ValueError, match=match):
        stage_layer_indices(*args)


# ---- schedule orders (pure) ---------------------------------------------------------------------
def _uniform_costs(orders, vpp):
    return {r: [(1.0 if kind == "F" else 2.0) / vpp for kind, _, _ in acts] for r, acts in orders.items()}


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 1), (2, 1, 4), (4, 1, 3), (4, 1, 8), (2, 2, 2), (2, 2, 4),
                                      (4, 2, 4), (4, 2, 8), (3, 3, 6), (8, 2, 16)])
def test_orders_complete_and_bubble_matches_formula(pp, vpp, m):
    name = "1f1b" if vpp == 1 else "interleaved"
    orders = {r: action_order(name, pp, vpp, r, m) for r in range(pp)}
    for acts in orders.values():
        assert sorted(acts) == sorted((k, c, i) for k in "FB" for c in range(vpp) for i in range(m))
        for kind, c, i in acts:  # a backward never precedes its own forward on the stage
            if kind == "B":
                assert acts.index(("F", c, i)) < acts.index(("B", c, i))
    makespan, busy = replay_makespan(orders, _uniform_costs(orders, vpp), pp)
    bubble = sum(1 - busy[r] / makespan for r in range(pp)) / pp
    assert math.isclose(bubble, analytic_bubble(pp, m, vpp), rel_tol=1e-12)


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 3), (4, 1, 8), (2, 2, 3), (4, 2, 8), (4, 2, 6)])
def test_forward_only_order_is_complete_and_deadlock_free(pp, vpp, m):
    orders = {r: action_order("forward_only", pp, vpp, r, m) for r in range(pp)}
    for acts in orders.values():
        assert sorted(acts) == sorted(("F", c, i) for c in range(vpp) for i in range(m))
    makespan, _ = replay_makespan(orders, _uniform_costs(orders, vpp), pp, forward_only=True)
    if vpp == 1 or m % pp == 0:  # equal costs: the pipeline fills in p - 1 chunk-forwards, then streams
        assert math.isclose(makespan, (vpp * m + pp - 1) / vpp)


def test_warmup_depths():
    assert one_f_one_b_order(4, 0, 8)[:4] == [("F", 0, 0), ("F", 0, 1), ("F", 0, 2), ("F", 0, 3)]
    assert one_f_one_b_order(4, 0, 8)[4] == ("B", 0, 0)
    assert one_f_one_b_order(4, 3, 8)[:2] == [("F", 0, 0), ("B", 0, 0)]
    # interleaved, stage 0 of pp=2, vpp=2, m=4: (p-r-1)*2 + (v-1)*p = 4 forwards, chunk 0 then chunk 1
    order = interleaved_order(2, 2, 0, 4)
    assert order[:5] == [("F", 0, 0), ("F", 0, 1), ("F", 1, 0), ("F", 1, 1), ("F", 0, 2)]
    assert order[5] == ("B", 1, 0)  # backwards start on the last chunk


def test_interleaved_needs_microbatches_multiple_of_pp():
    with pytest.raises(ValueError, match=r"multiple of pp=4"):
        action_order("interleaved", 4, 2, 0, 6)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        action_order("gpipe", 2, 1, 0, 4)
    with pytest.raises(ValueError, match="vpp=2"):
        action_order("1f1b", 2, 2, 0, 4)


def test_replay_detects_inconsistent_orders():
    # stage 1 wants micro-batch 1 first, stage 0 sends it only after a backward it cannot get
    orders = {0: [("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1)],
              1: [("F", 0, 1), ("B", 0, 1), ("F", 0, 0), ("B", 0, 0)]}
    with pytest.raises(RuntimeError, match="deadlocked"):
        replay_makespan(orders, _uniform_costs(orders, 1), 2)


# ---- distributed runs ---------------------------------------------------------------------------
S_PARITY, M_PARITY = 8, 8   # micro-batches of 1 sequence


def _parity_config(layers):
    return GLMConfig.preset("tiny").replace(num_layers=layers)


def _parity_data(config):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, config.vocab_size, (M_PARITY, S_PARITY + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[1, :5] = -100  # uneven ignored tokens: the normalisation must use the whole batch's count
    return ids[:, :-1].contiguous(), labels


def _parity_reference(config):
    torch.manual_seed(0)
    model = GLMForCausalLM(config)
    ids, labels = _parity_data(config)
    logits = model(ids)
    loss = kernels.cross_entropy(logits, labels)
    loss.backward()
    return (model.state_dict(), loss.item(), {n: p.grad for n, p in model.named_parameters()},
            logits.detach())


def _parity_case(layout, config, reference):
    state, ref_loss, ref_grads, ref_logits = reference
    chunks = build_model_chunks(config, layout)
    for chunk in chunks:
        load_full_into(chunk, state, layout)
    ids, labels = _parity_data(config)
    n_tokens = int((labels != -100).sum())
    mbs = [{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1]} for i in range(M_PARITY)]
    shape = activation_shape(1, S_PARITY, config.hidden_size, 1, False)

    def loss_fn(logits, mb):
        return kernels.cross_entropy(logits, mb["labels"], reduction="sum") / n_tokens

    result = run_schedule(chunks, layout, mbs, shape, loss_fn)
    loss = torch.tensor([sum(float(l) for l in result.losses)], dtype=torch.float64)
    torch.distributed.all_reduce(loss, group=layout.pp_group)  # only the last stage holds losses
    grads = gather_full_state_dict({n: p.grad for c in chunks for n, p in c.named_parameters()}, config, layout)
    grad_err = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items())
    assert set(grads) == set(ref_grads)

    out = run_schedule(chunks, layout, mbs, shape, forward_only=True)
    logits_err = None
    if layout.is_last_stage:
        logits = torch.cat(out.outputs)
        logits_err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    timeline = [(a.kind, a.chunk, a.micro_batch, a.start, a.end) for a in result.timeline]

    # the Trainer's forward-only evaluation of the same batch (8 micro-batches of 1)
    train = TrainConfig(global_batch_size=M_PARITY, micro_batch_size=1, seq_length=S_PARITY)
    trainer = Trainer(chunks, build_optimizer(chunks, layout, OptimizerConfig(), 1e-3), layout, config, train,
                      LRSchedule(LRConfig(lr=1e-3), 1))
    evaluated = trainer.evaluate({"input_ids": ids, "labels": labels})["loss"]
    return {"loss": loss.item(), "ref_loss": ref_loss, "grad_err": grad_err, "logits_err": logits_err,
            "timeline": timeline, "evaluated": evaluated, "schedule": result.schedule}


BUBBLE_M = {2: 4, 4: 8}


def _bubble_case(layout, m):
    """Layer-dominated model; returns the measured bubbles of this stage's run."""
    config = GLMConfig.preset("tiny").replace(vocab_size=256, num_layers=4 * layout.pp_size)
    chunks = build_model_chunks(config, layout)
    g = torch.Generator().manual_seed(3)
    s = 128
    ids = torch.randint(0, 256, (m, s), generator=g)
    mbs = [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(m)]
    shape = activation_shape(1, s, config.hidden_size, 1, False)

    def loss_fn(logits, mb):
        return kernels.cross_entropy(logits, mb["labels"])

    run_schedule(chunks, layout, mbs, shape, loss_fn)  # warm-up (allocator, first-call overheads)
    result = run_schedule(chunks, layout, mbs, shape, loss_fn)
    stats = measure_bubble(result, layout, m)
    return {"cpu": stats.cpu, "wall": stats.wall, "busy": stats.busy_s, "idle": stats.idle_s}


def _world(rank, world_size):
    pp = world_size
    out = {}
    for vpp in (1, 2):
        layout = ParallelLayout.build(ParallelDims(pp=pp, vpp=vpp), name=f"pp{pp}vpp{vpp}")
        config = _parity_config(pp * vpp)
        out[("parity", vpp)] = _parity_case(layout, config, _parity_reference(config))
        out[("bubble", vpp)] = _bubble_case(layout, BUBBLE_M[pp])
    return out


_RESULTS: dict = {}


def _results(world_size):
    if world_size not in _RESULTS:
        _RESULTS[world_size] = run_distributed(_world, world_size)
    return _RESULTS[world_size]


@pytest.mark.parametrize("pp,vpp", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_schedule_matches_single_process(pp, vpp):
    results = _results(pp)
    for rank, res in enumerate(results):
        r = res[("parity", vpp)]
        assert r["schedule"] == ("1f1b" if vpp == 1 else "interleaved")
        assert math.isclose(r["loss"], r["ref_loss"], rel_tol=1e-6), (rank, r["loss"], r["ref_loss"])
        assert r["grad_err"] <= 1e-5, (rank, r["grad_err"])
        assert math.isclose(r["evaluated"], r["ref_loss"], rel_tol=1e-6), (rank, r["evaluated"], r["ref_loss"])
    assert results[-1][("parity", vpp)]["logits_err"] <= 1e-5  # forward-only outputs, last stage


@pytest.mark.parametrize("pp,vpp", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_timeline_respects_dependencies(pp, vpp):
    ends = {}  # (kind, virtual stage, micro-batch) -> (start, end)
    for rank, res in enumerate(_results(pp)):
        for kind, c, mb, start, end in res[("parity", vpp)]["timeline"]:
            ends[(kind, c * pp + rank, mb)] = (start, end)
    last = pp * vpp - 1
    assert len(ends) == 2 * (last + 1) * M_PARITY
    for (kind, k, mb), (start, _) in ends.items():
        producer = ("F", k - 1, mb) if kind == "F" else (("B", k + 1, mb) if k < last else ("F", k, mb))
        if producer in ends:
            assert start >= ends[producer][1], (kind, k, mb)


@pytest.mark.parametrize("pp", [2, 4])
def test_measured_bubble_close_to_analytic_and_interleaving_lowers_it(pp):
    res = _results(pp)[0]
    m = BUBBLE_M[pp]
    plain, interleaved = res[("bubble", 1)], res[("bubble", 2)]
    a_plain, a_inter = analytic_bubble(pp, m), analytic_bubble(pp, m, 2)
    assert abs(plain["cpu"] - a_plain) <= 0.06, (plain, a_plain)
    assert abs(interleaved["cpu"] - a_inter) <= 0.06, (interleaved, a_inter)
    # the replay uses measured per-action CPU costs, which jitter on a shared 2-core machine (seen:
    # 0.166 -> 0.124 for pp=2, analytic 0.200 -> 0.111): require a quarter of the analytic drop
    assert interleaved["cpu"] <= plain["cpu"] - 0.25 * (a_plain - a_inter), (plain, interleaved)
    for stats in (plain, interleaved):
        assert stats["busy"] > 0 and stats["idle"] >= 0 and 0 <= stats["wall"] < 1
