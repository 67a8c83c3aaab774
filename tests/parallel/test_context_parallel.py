"""Context parallelism: the load-balanced split, the K/V gather, and the model on cp ranks against one process.

Training on cp layouts (cp2, tp2 x cp2 + SP, cp2 x dp2 ZeRO, tp2 x cp2 x pp2) against the single-process
reference, and their bytes against the analytic formulas, are in test_layouts.py; packed rows on cp2 in
test_sft_packing.py; a cp2 checkpoint resumed by one process in test_launch_train.py. Here: the pieces,
and the forward/backward with what test_layouts' batches lack: left padding (key mask, positions
counted over whole rows) and packed segments, on cp4 and tp2 x cp2 (one 4-rank launch).

Tolerances (fp32): the cp ranks compute each query's attention over exactly the keys the whole-sequence
attention uses (a prefix of the keys instead of the full row with the rest masked: masked keys add exact
zeros), so outputs differ only in summation order and blocking, ~1e-7 relative; 1e-5 leaves room for the
gradient sums over ranks. A misplaced chunk or a missing reduction is off by O(1).
"""
import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.model.spec import ModelSpec
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.context_parallel import ContextParallel, _to_natural, _to_ranks, local_chunk_ids, split_sequence
from engine.train import TrainConfig
from tests._dist import run_distributed

CONFIG = GLMConfig.preset("tiny").replace(num_layers=2)
B, S = 2, 32


def test_split_takes_chunks_r_and_mirror_and_the_gather_order_inverts_it():
    x = torch.arange(2 * 16).view(2, 16)
    assert local_chunk_ids(4, 1) == (1, 6)
    assert split_sequence(x, 4, 1).tolist() == [[2, 3, 12, 13], [18, 19, 28, 29]]
    assert split_sequence(x, 1, 0) is x
    # all cp ranks' pieces, rank-major, back into sequence order -- and back again
    for cp in (2, 4):
        ranked = torch.stack([split_sequence(x, cp, r) for r in range(cp)])
        assert torch.equal(_to_natural(ranked, cp), x)
        assert torch.equal(_to_ranks(x, cp), ranked)
    # every rank gets the same causal work: sum over its chunks of (chunk + 1)
    for cp in (2, 3, 8):
        assert len({sum(c + 1 for c in local_chunk_ids(cp, r)) for r in range(cp)}) == 1


def test_bad_context_parallel_input_is_refused():
    with pytest.raises(ValueError, match=r"sequence length 10 .* not divisible by 2 x cp = 4"):
        split_sequence(torch.zeros(1, 10), 2, 0)
    with pytest.raises(ValueError, match=r"cp_rank=2 is outside \[0, cp=2\)"):
        local_chunk_ids(2, 2)
    with pytest.raises(ValueError, match="seq_length=30 divisible by 2 x cp = 4"):
        TrainConfig(global_batch_size=2, seq_length=30).validate(ParallelDims(cp=2, dp=None), CONFIG, 2)
    with pytest.raises(ValueError, match="seq_length=36 / cp=2 divisible by tp=4"):
        TrainConfig(global_batch_size=2, seq_length=36, sequence_parallel=True).validate(
            ParallelDims(tp=4, cp=2, dp=None), CONFIG, 8)
    with pytest.raises(ValueError, match=r"sequence_parallel=True needs tp > 1"):
        TrainConfig(global_batch_size=2, seq_length=36, sequence_parallel=True).validate(
            ParallelDims(cp=2, dp=None), CONFIG, 2)
    with pytest.raises(ValueError, match=r"tp=1 x pp=1 x cp=2 x dp=2 = 4 != world_size=2"):
        ParallelDims(cp=2, dp=2).validate(2)
    # the checks that come before any collective, on a model built for cp = 2
    model = GLMForCausalLM(CONFIG, ModelSpec(context_parallel=ContextParallel(None, 2, 0)))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="context parallelism needs position_ids"):
        model(ids)
    with pytest.raises(ValueError, match="KV-cache decoding needs a layout with cp=1"):
        model(ids, position_ids=torch.arange(8)[None], cache=model.new_cache(1, 8))


def test_context_parallel_rank_order():
    d = ParallelDims(tp=2, cp=2, dp=2, pp=2)
    # rank = ((pp * dp + dp_rank) * cp + cp_rank) * tp + tp_rank: tp, then cp, then dp, then pp (Megatron)
    assert [(*d.coords(r), d.cp_coord(r)) for r in range(16)] == \
        [(t, dd, p, c) for p in range(2) for dd in range(2) for c in range(2) for t in range(2)]
    assert all(d.rank_of(*d.coords(r), d.cp_coord(r)) == r for r in range(16))
    assert d.tp_group_ranks(5) == [4, 5]
    assert d.cp_group_ranks(5) == [5, 7]
    assert d.dp_group_ranks(5) == [1, 5]
    assert d.pp_group_ranks(5) == [5, 13]
    assert d.mp_group_ranks(5) == [4, 5, 12, 13]
    g = d.gradient_dims()  # cp folded into dp: the same ranks, dp x cp = 4 replicas
    assert (g.tp, g.pp, g.dp, g.cp) == (2, 2, 4, 1)
    assert g.dp_group_ranks(5) == [1, 3, 5, 7]
    assert all(g.mp_group_ranks(r) == d.mp_group_ranks(r) for r in range(16))


def _batches():
    """Left-padded rows (key mask, positions counted over real tokens) and packed rows (segments)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CONFIG.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :5] = 0   # left padding spanning the first chunk boundary at cp 4 (chunks of 4 tokens)
    mask[1, :13] = 0
    segments = torch.tensor([[0] * 7 + [1] * 12 + [2] * 13, [0] * 20 + [1] * 12])
    positions = torch.cat([torch.arange(n) for n in (7, 12, 13, 20, 12)]).view(B, S)
    return [dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)),
            dict(input_ids=ids, segment_ids=segments, position_ids=positions)]


def _reference(state):
    """Per batch: full logits and the gradients of sum(logits * w) for a fixed w."""
    model = GLMForCausalLM(CONFIG)
    model.load_state_dict(state)
    out = []
    for batch in _batches():
        model.zero_grad()
        logits = model(**batch)
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
        (logits * w).sum().backward()
        out.append((logits.detach(), w, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def _cp_world(rank, world_size, state, reference):
    from engine.parallel import comm
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import load_full_into
    from engine.train.objectives import RewardObjective
    from engine.train.step import OptimizerConfig, Trainer, build_optimizer
    results = {}
    for name, tp, cp in (("cp4", 1, 4), ("tp2_cp2", 2, 2)):
        layout = ParallelLayout.build(ParallelDims(tp=tp, cp=cp, dp=1), name=name)
        (model,) = build_model_chunks(CONFIG, layout, seed=None)
        load_full_into(model, state, layout)
        errors = []
        for batch, (ref_logits, w, ref_grads) in zip(_batches(), reference):
            model.zero_grad()
            local = {k: split_sequence(v, cp, layout.cp_rank) for k, v in batch.items()}
            logits = model(**local)
            v = logits.shape[-1]
            w_local = split_sequence(w, cp, layout.cp_rank)[..., layout.tp_rank * v:(layout.tp_rank + 1) * v]
            (logits * w_local).sum().backward()
            full = model.spec.gather_vocab(logits) if tp > 1 else logits
            errors.append(("logits", (full - split_sequence(ref_logits, cp, layout.cp_rank)).abs().max().item()))
            if tp == 1:  # every cp rank's gradient is a partial sum over its tokens: add them up
                for n, p in model.named_parameters():
                    g = comm.all_reduce(p.grad.clone(), layout.cp_group, None, "test")
                    errors.append((n, ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()))
        results[name] = errors
        if name == "cp4":
            with pytest.raises(ValueError, match="does not support context parallelism"):
                trainer = Trainer([model], build_optimizer([model], layout, OptimizerConfig(), 1e-3), layout, CONFIG,
                                  TrainConfig(global_batch_size=1, seq_length=S), lambda step: 1e-3,
                                  RewardObjective())
                pair = torch.zeros(1, S, dtype=torch.long)
                trainer.microbatches({"chosen_input_ids": pair, "chosen_attention_mask": pair + 1,
                                      "rejected_input_ids": pair, "rejected_attention_mask": pair + 1})
            with pytest.raises(ValueError, match=r"the RLHF generation layout decodes whole sequences \(training cp=4\)"):
                ParallelLayout.for_generation(layout, 1)
            from engine.rlhf.ppo import PPOConfig, PPOLoop
            # PPO splits prompt + response sequences too: their length must split into 2 cp chunks
            with pytest.raises(ValueError, match=r"cp=4\) splits every sequence into 2 x cp = 8 equal chunks: "
                                                 r"max_prompt_length \+ max_new_tokens = 62 must be divisible by 8"):
                PPOLoop(PPOConfig(max_new_tokens=30), CONFIG, layout, [model], None, None, None, [[1]], [2], 0)
            # an optimizer built on the model's layout still averages over every replica: the dp x cp ranks
            from engine.optim import DistributedOptimizer
            assert DistributedOptimizer(model.parameters(), layout).layout.dp_size == cp
    return results


def test_model_on_cp_ranks_matches_one_process():
    torch.manual_seed(0)
    state = GLMForCausalLM(CONFIG).state_dict()
    reference = _reference(state)
    for rank, results in enumerate(run_distributed(_cp_world, 4, state, reference, timeout=300)):
        for case, errors in results.items():
            assert errors and all(e <= 1e-5 for _, e in errors), (rank, case, [x for x in errors if x[1] > 1e-5])
