"""Tensor / sequence parallel parity with the single-process model, comm ledger, sharding round trip.

One 4-process gloo launch runs every case (2-core CI machines): TP=2 (x DP=2) and TP=4 (2 KV
groups -> each KV head replicated on 2 ranks), each with and without sequence parallel.

Tolerance: fp32 throughout. The sharded model computes the same sums in another order (partial
matmuls summed across ranks, vocab-parallel softmax); each output/gradient element carries rounding
of order eps_fp32 * sqrt(K) ~ 1e-7 * 26 relative to the largest term (K <= 688 summed terms).
We require max |g - g_ref| <= 1e-5 * max |g_ref| per tensor (observed ~1e-6) and the loss within
1e-5 relative; a wrong shard, a missing reduction or a partial norm grad errs by O(1) relatively.
"""
import math

import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMBlock, GLMForCausalLM, GLMForScalarHead, head_positions
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.mappings import gather_from_tp
from engine.parallel.sharding import (gather_full_state_dict, init_parallel_weights_, load_full_into,
                                      shard_state_dict)
from engine.parallel.tensor_parallel import mark_parameters, sync_sequence_parallel_grads, tensor_parallel_spec
from tests._dist import run_distributed

REL_TOL = 1e-5
B, S = 2, 8  # S divisible by tp=4 for sequence parallel


def _config() -> GLMConfig:
    return GLMConfig.preset("tiny").replace(num_layers=2)


def _data(config):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, config.vocab_size, (B, S), generator=g)
    return ids, labels


def _reference(config, ids, labels):
    torch.manual_seed(0)
    ref = GLMForCausalLM(config)
    logits = ref(ids)
    loss = kernels.cross_entropy(logits, labels)
    loss.backward()
    return ref, logits.detach(), loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _vocab_sharded_loss(logits, labels, layout):
    """Mean cross entropy of vocab-sharded logits ``[b, s, v/tp]``. The logits are gathered over TP
    (gather_from_tp: its backward hands each rank its vocab slice of the gradient). Switch to
    ``kernels.cross_entropy(logits, labels, group=layout.tp_group)`` once the vocab-parallel kernel
    lands (same value, no gather)."""
    return kernels.cross_entropy(gather_from_tp(logits, layout), labels)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _parity_case(config, layout, sp, ref, ref_logits, ref_loss, ref_grads, ids, labels):
    model = GLMForCausalLM(config, tensor_parallel_spec(config, layout, sp))
    mark_parameters(model, layout, sp)
    load_full_into(model, ref.state_dict(), layout)
    logits = model(ids)  # [b, s, v/tp]: vocab-sharded
    assert logits.shape == (B, S, config.vocab_size // layout.tp_size)
    loss = _vocab_sharded_loss(logits, labels, layout)
    loss.backward()
    sync_sequence_parallel_grads(model.parameters(), layout)
    grads = gather_full_state_dict({n: p.grad for n, p in model.named_parameters()}, config, layout)
    out = {"loss": abs(loss.item() - ref_loss) / abs(ref_loss),
           "logits": _rel_err(gather_from_tp(logits.detach(), layout), ref_logits),
           "grad_names": sorted(grads) == sorted(ref_grads),
           "grads": {n: _rel_err(grads[n], ref_grads[n]) for n in ref_grads}}
    # replicated KV heads: every replica must hold the same (summed) gradient
    kv_rows = slice(config.num_attention_heads // layout.tp_size * config.kv_channels, None)
    local = model.layers["0"].attention.qkv.weight.grad[kv_rows].contiguous()
    everyone = [torch.empty_like(local) for _ in range(layout.tp_size)]
    torch.distributed.all_gather(everyone, local, group=layout.tp_group)
    share = max(1, layout.tp_size // config.num_kv_groups)
    out["kv_replicas_equal"] = all(torch.equal(everyone[r], everyone[r - r % share]) for r in range(layout.tp_size))
    return out


def _ledger_case(config, layout, sp):
    """One block forward + backward: recorded TP bytes == analytic ring formulas (comm.py)."""
    block = GLMBlock(config, tensor_parallel_spec(config, layout, sp), 0)
    mark_parameters(block, layout, sp)
    n, h = layout.tp_size, config.hidden_size
    s_local = S // n if sp else S
    x = torch.randn(B, s_local, h, requires_grad=True)
    positions = torch.arange(S).expand(B, S)
    layout.ledger.reset()
    block(x, positions).sum().backward()
    act = B * S * h * 4  # bytes of one full [b, s, h] fp32 activation
    if sp:  # fwd: AG before qkv and gate_up, RS after dense and down; bwd: the conjugates
        expected = 8 * (n - 1) / n * act
        expected_calls = {"all_gather": 4, "reduce_scatter": 4}
    else:   # fwd: AR after dense and down; bwd: AR of the qkv and gate_up input grads
        expected = 4 * 2 * (n - 1) / n * act
        expected_calls = {"all_reduce": 4}
    share = max(1, n // config.num_kv_groups)
    if share > 1:  # replicated-KV gradient hooks: weight [2 d, h] and bias [2 d] rows over `share` ranks
        kv_bytes = 2 * config.kv_channels * (h + 1) * 4
        expected += 2 * (share - 1) / share * kv_bytes
        expected_calls["all_reduce"] = expected_calls.get("all_reduce", 0) + 2
    snap = layout.ledger.snapshot()["tp"]
    return {"bytes": snap["bytes"], "expected": expected,
            "calls": {op: v["calls"] for op, v in snap["ops"].items()}, "expected_calls": expected_calls}


def _sharding_case(config, layout):
    """Full -> shards (TP and PP stages) -> full is exact; the layout-independent init agrees."""
    torch.manual_seed(3)
    full = GLMForCausalLM(config).state_dict()
    per_stage = config.num_layers // layout.pp_size
    layers = range(layout.pp_rank * per_stage, (layout.pp_rank + 1) * per_stage)
    local = shard_state_dict(full, config, layout, layer_indices=layers)
    stage = GLMForCausalLM(config, tensor_parallel_spec(config, layout), layer_indices=layers,
                           pre_process=layout.is_first_stage, post_process=layout.is_last_stage)
    stage.load_state_dict(local, strict=True)
    back = gather_full_state_dict(stage, config, layout)
    exact = sorted(back) == sorted(full) and all(torch.equal(back[k], full[k]) for k in full)
    # init_parallel_weights_ gives every layout the weights the single-process model gets
    init_parallel_weights_(stage, layout, seed=7)
    single = GLMForCausalLM(config, init=False)
    init_parallel_weights_(single, ParallelLayout.single(), seed=7)
    inited = gather_full_state_dict(stage, config, layout)
    same_init = all(torch.equal(inited[k], single.state_dict()[k]) for k in full)
    return {"exact": exact, "same_init": same_init}


def _gathered_column_case(layout):
    """ColumnParallelLinear(gather_output=True) (gather_from_tp fwd / chunk bwd) == nn.Linear."""
    from engine.parallel.tensor_parallel import ColumnParallelLinear
    torch.manual_seed(5)
    full = torch.nn.Linear(16, 12)
    x = torch.randn(2, 8, 16, requires_grad=True)
    full(x).pow(2).sum().backward()
    ref_x_grad, x.grad = x.grad, None
    col = ColumnParallelLinear(16, 12, True, layout, gather_output=True)
    rows = slice(layout.tp_rank * 12 // layout.tp_size, (layout.tp_rank + 1) * 12 // layout.tp_size)
    with torch.no_grad():
        col.weight.copy_(full.weight[rows]), col.bias.copy_(full.bias[rows])
    y = col(x)
    y.pow(2).sum().backward()
    return max(_rel_err(y.detach(), full(x).detach()), _rel_err(x.grad, ref_x_grad),
               _rel_err(col.weight.grad, full.weight.grad[rows]), _rel_err(col.bias.grad, full.bias.grad[rows]))


def _sequence_mappings_case(layout):
    """scatter_to_sequence / gather_from_sequence: values and conjugate gradients on [b, s, h]."""
    from engine.parallel.mappings import gather_from_sequence, scatter_to_sequence
    n = layout.tp_size
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3).requires_grad_(True)  # same on every rank
    c = torch.linspace(-1, 1, 2 * 8 * 3).view(2, 8, 3)
    local = scatter_to_sequence(x, layout)
    chunk_ok = torch.equal(local, x.detach()[:, layout.tp_rank * 8 // n:(layout.tp_rank + 1) * 8 // n])
    back = gather_from_sequence(local, layout)
    (back * c).sum().backward()
    # gather's backward reduce-scatters n copies of c; scatter's backward all-gathers them: n * c
    return {"chunk": chunk_ok, "round_trip": torch.equal(back, x.detach()), "grad": torch.equal(x.grad, n * c)}


def _comm_case(layout):
    """Point-to-point and broadcast wrappers over the pipeline group: values and recorded bytes."""
    from engine.parallel import comm
    layout.ledger.reset()
    x = torch.full((3, 5), float(layout.rank))
    got = torch.empty(3, 5)
    # pp=2: the next and previous stage are the same rank; post both directions at once
    works = comm.batch_send_recv([(x, layout.pp_next_rank)], [(got, layout.pp_prev_rank)], layout.pp_group,
                                 layout.ledger, "pp")
    for w in works:
        w.wait()
    y = torch.full((4,), float(layout.rank))
    comm.broadcast(y, layout.pp_ranks[0], layout.pp_group, layout.ledger, "pp")
    if layout.is_first_stage:
        comm.send(x * 2, layout.pp_next_rank, layout.pp_group, layout.ledger, "pp")
        second = None
    else:
        second = torch.empty(3, 5)
        comm.recv(second, layout.pp_prev_rank, layout.pp_group, layout.ledger, "pp")
    return {"p2p_ok": torch.equal(got, torch.full((3, 5), float(layout.pp_prev_rank))),
            "bcast_ok": torch.equal(y, torch.full((4,), float(layout.pp_ranks[0]))),
            "send_ok": second is None or torch.equal(second, torch.full((3, 5), 2.0 * layout.pp_prev_rank)),
            "ledger": layout.ledger.snapshot()["pp"], "first": layout.is_first_stage}


def _scalar_head_case(config, layout, sp, ids):
    """Critic/reward model (value head after the gathered sequence) and last-token logits under TP/SP."""
    torch.manual_seed(5)
    ref = GLMForScalarHead(config)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on row 0
    ref_values = ref(ids, mask)
    ref_values.pow(2).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    model = GLMForScalarHead(config, tensor_parallel_spec(config, layout, sp), init=False)
    mark_parameters(model, layout, sp)
    load_full_into(model, ref.state_dict(), layout)
    values = model(ids, mask)
    values.pow(2).sum().backward()
    sync_sequence_parallel_grads(model.parameters(), layout)
    grads = gather_full_state_dict({n: p.grad for n, p in model.named_parameters()}, config, layout)
    lm_ref = GLMForCausalLM(config)
    lm = GLMForCausalLM(config, tensor_parallel_spec(config, layout, sp), init=False)
    mark_parameters(lm, layout, sp)
    load_full_into(lm, lm_ref.state_dict(), layout)
    with torch.no_grad():
        last = gather_from_tp(lm(ids, last_only=True), layout)
        ref_last = lm_ref(ids)[:, -1:]
    return {"values": _rel_err(values.detach(), ref_values.detach()),
            "reward": _rel_err(model.reward(ids, mask).detach(), ref.reward(ids, mask).detach()),
            "grads": max(_rel_err(grads[n], ref_grads[n]) for n in ref_grads),
            "last_logits": _rel_err(last, ref_last)}


def _selected_head_case(config, layout, sp, ref, ids, labels):
    """The output layer at selected positions only (``glm.head_positions``) under TP/SP: its logits and the
    gradients of a loss over them equal the full logits' at those positions and a masked loss's gradients
    (the same ops on the same rows; the gathers' backward differs only in what it adds zeros to)."""
    model = GLMForCausalLM(config, tensor_parallel_spec(config, layout, sp), init=False)
    mark_parameters(model, layout, sp)
    load_full_into(model, ref.state_dict(), layout)
    keep = torch.arange(B * S).view(B, S) % 3 != 1
    index = head_positions(keep)
    full = model(ids)
    kernels.cross_entropy(full, labels.masked_fill(~keep, -100), group=layout.tp_group, reduction="sum").backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    selected = model.head(model.trunk(ids), index=index)  # [n, v/tp]
    kernels.cross_entropy(selected, labels.reshape(-1)[index], group=layout.tp_group, reduction="sum").backward()
    return {"shape": tuple(selected.shape) == (int(keep.sum()), config.vocab_size // layout.tp_size),
            "logits": _rel_err(selected.detach(), full.detach().reshape(-1, full.shape[-1])[index]),
            "grads": max(_rel_err(p.grad, full_grads[n]) for n, p in model.named_parameters())}


def _world4(rank, world_size):
    config = _config()
    ids, labels = _data(config)
    ref, ref_logits, ref_loss, ref_grads = _reference(config, ids, labels)
    tp2 = ParallelLayout.build(ParallelDims(tp=2, dp=None), name="tp2")  # x dp=2: both replicas check
    tp4 = ParallelLayout.build(ParallelDims(tp=4), name="tp4")
    tp2pp2 = ParallelLayout.build(ParallelDims(tp=2, pp=2, dp=None), name="tp2pp2")
    out = {}
    for layout in (tp2, tp4):
        for sp in (False, True):
            out[("parity", layout.tp_size, sp)] = _parity_case(config, layout, sp, ref, ref_logits, ref_loss,
                                                               ref_grads, ids, labels)
            out[("ledger", layout.tp_size, sp)] = _ledger_case(config, layout, sp)
            out[("scalar", layout.tp_size, sp)] = _scalar_head_case(config, layout, sp, ids)
            out[("selected", layout.tp_size, sp)] = _selected_head_case(config, layout, sp, ref, ids, labels)
    out[("sharding", "tp2pp2")] = _sharding_case(config, tp2pp2)
    out[("sharding", "tp4")] = _sharding_case(config, tp4)
    out["comm"] = _comm_case(tp2pp2)
    out["gathered_column"] = _gathered_column_case(tp4)
    out["sequence_mappings"] = _sequence_mappings_case(tp4)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4, 4)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_tp_matches_single_process(world4, tp, sp):
    for rank, res in enumerate(world4):
        r = res[("parity", tp, sp)]
        assert r["loss"] <= REL_TOL, (rank, r["loss"])
        assert r["logits"] <= REL_TOL, (rank, r["logits"])
        assert r["grad_names"], rank
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= REL_TOL, (rank, worst)
        assert r["kv_replicas_equal"], rank


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_scalar_head_and_last_token_logits_match_single_process(world4, tp, sp):
    for rank, res in enumerate(world4):
        r = res[("scalar", tp, sp)]
        assert max(r.values()) <= REL_TOL, (rank, r)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_output_layer_at_selected_positions(world4, tp, sp):
    for rank, res in enumerate(world4):
        r = res[("selected", tp, sp)]
        assert r["shape"] and r["logits"] <= REL_TOL and r["grads"] <= REL_TOL, (rank, r)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_comm_ledger_matches_analytic_bytes(world4, tp, sp):
    for res in world4:
        r = res[("ledger", tp, sp)]
        assert math.isclose(r["bytes"], r["expected"], rel_tol=1e-12), r
        assert r["calls"] == r["expected_calls"], r


@pytest.mark.parametrize("case", ["tp2pp2", "tp4"])
def test_sharding_round_trip_exact(world4, case):
    for res in world4:
        assert res[("sharding", case)] == {"exact": True, "same_init": True}


def test_sequence_mappings(world4):
    assert all(res["sequence_mappings"] == {"chunk": True, "round_trip": True, "grad": True} for res in world4)


def test_column_parallel_gather_output(world4):
    assert all(res["gathered_column"] <= REL_TOL for res in world4)


def test_p2p_and_broadcast_ledger(world4):
    for res in world4:
        r = res["comm"]
        assert r["p2p_ok"] and r["bcast_ok"] and r["send_ok"], r
        ops = r["ledger"]["ops"]
        # batch send 60 B (+ the blocking send of 60 B on the first stage); broadcast: source sends 16 B
        sent = 60 + (60 + 16 if r["first"] else 0)
        received = 60 + (0 if r["first"] else 16 + 60)
        assert r["ledger"]["bytes"] == sent and r["ledger"]["received"] == received, r
        assert ops["send"]["calls"] == (2 if r["first"] else 1) and ops["recv"]["calls"] == (1 if r["first"] else 2)
        assert ops["broadcast"]["calls"] == 1
