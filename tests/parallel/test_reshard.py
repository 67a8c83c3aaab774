"""Resharding a training TP layout into the generation layout (``sharding.reshard_tp``) with KV heads
replicated over TP ranks: every target shard equals ``tp_slice`` of the full weights (bitwise), and the
bytes each rank receives are the minimum (each element of its target shard it lacks, once) whenever the
source subgroups align with the heads' replica blocks; otherwise (tp 6 -> 2 with 3 KV groups) the plain
all-gather, duplicates included.

    4 ranks: 1 KV group (multi-query: one head on all 4 ranks), tp 4 -> 2 and 4 -> 1; 2 KV groups, 4 -> 2, 4 -> 1
    6 ranks: 3 KV groups (pairs share a head), tp 6 -> 3 (one head per subgroup), 6 -> 1 (3 heads exchanged),
             6 -> 2 (subgroups of 3 straddle the pairs: all-gather)
    8 ranks: the whole generation shard (``reshard_for_generation``) from tp 2 x pp 2 x dp 2 training shards,
             to tp 1 and 2, with 2 KV groups and with 1 (replicated): TP subgroups, pipeline stages and
             data-parallel replicas at once
"""
import pytest
import torch

from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.pipeline import stage_layer_indices
from engine.parallel.sharding import kv_replication, reshard_for_generation, reshard_tp, shard_state_dict, tp_slice
from tests._dist import run_distributed


def _config(groups: int, heads: int) -> GLMConfig:
    return GLMConfig(vocab_size=96, hidden_size=48, ffn_hidden_size=96, num_layers=1, num_attention_heads=heads,
                     num_kv_groups=groups, head_dim=8, max_position_embeddings=32, name=f"reshard-g{groups}")


def _state(config: GLMConfig) -> dict:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in GLMForCausalLM(config).state_dict().items()}


def _minimum(state, config, tp, rank, tp_g, j, held=None) -> int:
    """Bytes of target shard j (of tp_g) that source shard ``rank`` (of tp) lacks: elements numbered.
    ``held``: the tensor names the source holds (its pipeline stage's), default all."""
    total = 0
    for name, t in state.items():
        ids = torch.arange(t.numel()).view(t.shape)
        have = set(tp_slice(name, ids, config, tp, rank).flatten().tolist()) if held is None or name in held else set()
        need = set(tp_slice(name, ids, config, tp_g, j).flatten().tolist())
        total += len(need - have) * t.element_size()
    return total


def _world(rank, world_size, cases):
    out = []
    for groups, heads, tp_g in cases:
        config = _config(groups, heads)
        state = _state(config)
        layout = ParallelLayout.build(ParallelDims(tp=world_size), name=f"g{groups}")
        gen = ParallelLayout.for_generation(layout, tp_g)
        local = {k: tp_slice(k, v, config, world_size, layout.tp_rank).contiguous() for k, v in state.items()}
        before = layout.ledger.received("reshard")
        shards = reshard_tp(local, config, layout, gen)
        received = layout.ledger.received("reshard") - before
        exact = all(torch.equal(t, tp_slice(k, state[k], config, tp_g, gen.tp_rank)) for k, t in shards.items())
        out.append(dict(exact=exact, received=received, gen_rank=gen.tp_rank,
                        local=sum(t.numel() * t.element_size() for k, t in local.items() if not k.endswith("norm.weight"))))
    return out


CASES = {4: [(1, 4, 2), (1, 4, 1), (2, 4, 2), (2, 4, 1)], 6: [(3, 6, 3), (3, 6, 1), (3, 6, 2)]}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_reshard_with_replicated_kv_heads_moves_the_minimum(world_size):
    results = run_distributed(_world, world_size, CASES[world_size], timeout=300)
    for rank, per_case in enumerate(results):
        for (groups, heads, tp_g), r in zip(CASES[world_size], per_case):
            config = _config(groups, heads)
            assert r["exact"], (rank, groups, tp_g)
            f, rep = world_size // tp_g, kv_replication(config, world_size)
            want = _minimum(_state(config), config, world_size, rank, tp_g, r["gen_rank"])
            if f % rep == 0 or rep % f == 0:
                assert r["received"] == want, (rank, groups, tp_g, r["received"], want)
            else:  # straddling subgroups: everything gathered, replicated heads more than once
                assert r["received"] == (f - 1) * r["local"] > want, (rank, groups, tp_g)


def _world_3d(rank, world_size, cases):
    out = []
    for groups, tp_g in cases:
        config = _config(groups, 4).replace(num_layers=2)
        state = _state(config)
        layout = ParallelLayout.build(ParallelDims(tp=2, pp=2, dp=2), name=f"3d-g{groups}-{tp_g}")
        gen = ParallelLayout.for_generation(layout, tp_g)
        (layers,) = stage_layer_indices(config.num_layers, 2, 1)[layout.pp_rank]
        local = shard_state_dict(state, config, layout, layer_indices=layers)
        before = layout.ledger.received("reshard")
        shards = reshard_for_generation(local, config, layout, gen)
        received = layout.ledger.received("reshard") - before
        exact = (set(shards) == set(state) and
                 all(torch.equal(t, tp_slice(k, state[k], config, tp_g, gen.tp_rank)) for k, t in shards.items()))
        out.append(dict(exact=exact, received=received, gen_rank=gen.tp_rank, tp_rank=layout.tp_rank,
                        held=sorted(local), replica=gen.dp_rank))
    return out


CASES_3D = [(2, 1), (2, 2), (1, 1)]


def test_generation_shard_from_tp_pp_dp_training_shards_moves_the_minimum():
    """Every rank of tp 2 x pp 2 x dp 2 ends with its generation slice of every layer, bitwise, having
    received exactly the slice minus what it held; the 8 ranks form 8 / tp_g generation replicas."""
    results = run_distributed(_world_3d, 8, CASES_3D, timeout=300)
    for i, (groups, tp_g) in enumerate(CASES_3D):
        config = _config(groups, 4).replace(num_layers=2)
        state = _state(config)
        assert sorted({r[i]["replica"] for r in results}) == list(range(8 // tp_g)), (groups, tp_g)
        for rank, per_case in enumerate(results):
            r = per_case[i]
            assert r["exact"], (rank, groups, tp_g)
            want = _minimum(state, config, 2, r["tp_rank"], tp_g, r["gen_rank"], held=set(r["held"]))
            assert r["received"] == want > 0, (rank, groups, tp_g, r["received"], want)
