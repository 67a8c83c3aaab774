"""ParallelDims validation and rank arithmetic: pure, no process group is ever touched."""
import pytest
import torch.distributed as dist

from engine.config import GLMConfig
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.comm import CommLedger, all_gather, all_reduce, reduce_scatter

TINY = GLMConfig.preset("tiny")  # 8 heads, 2 KV groups, 8 layers, ffn 688, vocab 4096


@pytest.fixture(autouse=True)
def _no_process_groups(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("validation must not create process groups")
    monkeypatch.setattr(dist, "new_group", forbidden)
    yield
    assert not dist.is_initialized()


@pytest.mark.parametrize("dims, kwargs, fragments", [
    (ParallelDims(tp=4, pp=1, dp=None), dict(world_size=6), ["world_size=6", "tp=4", "pp=1", "= 4"]),
    (ParallelDims(tp=2, pp=2, dp=3), dict(world_size=8), ["tp=2", "pp=2", "dp=3", "= 12", "world_size=8"]),
    (ParallelDims(tp=3, dp=None), dict(world_size=3, config=TINY), ["num_attention_heads=8", "tp=3"]),
    (ParallelDims(tp=4, dp=None), dict(world_size=4, config=TINY.replace(ffn_hidden_size=690)),
     ["ffn_hidden_size=690", "tp=4"]),
    (ParallelDims(tp=4, dp=None), dict(world_size=4, config=TINY.replace(num_attention_heads=12, num_kv_groups=6)),
     ["num_kv_groups=6", "tp=4", "neither divides nor is divisible"]),
    (ParallelDims(tp=2, dp=None), dict(world_size=2, config=TINY.replace(vocab_size=4095)), ["vocab_size=4095", "tp=2"]),
    (ParallelDims(pp=3, dp=None), dict(world_size=3, config=TINY), ["num_layers=8", "pp=3", "vpp=1"]),
    (ParallelDims(pp=2, vpp=3, dp=None), dict(world_size=2, config=TINY), ["num_layers=8", "pp=2", "vpp=3", "= 6"]),
    (ParallelDims(pp=2, dp=None), dict(world_size=2, config=TINY, layers_per_stage=[3, 3, 2]),
     ["layers_per_stage has 3 entries", "pp=2", "vpp=1"]),
    (ParallelDims(pp=2, dp=None), dict(world_size=2, config=TINY, layers_per_stage=[3, 3]),
     ["sums to 6", "num_layers=8"]),
    (ParallelDims(dp=None), dict(world_size=4, global_batch_size=10, micro_batch_size=2),
     ["global_batch_size=10", "micro_batch_size=2", "dp=4", "= 8"]),
    (ParallelDims(vpp=2, dp=None), dict(world_size=2), ["vpp=2", "pp=1"]),
    (ParallelDims(tp=0), dict(world_size=1), ["tp=0"]),
])
def test_each_invalid_layout_names_its_factors(dims, kwargs, fragments):
    with pytest.raises(ValueError) as err:
        dims.validate(**kwargs)
    for f in fragments:
        assert f in str(err.value), (f, str(err.value))


def test_every_problem_reported_at_once():
    with pytest.raises(ValueError) as err:
        ParallelDims(tp=3, pp=3, dp=2, vpp=2).validate(12, TINY, global_batch_size=7, micro_batch_size=2)
    msg = str(err.value)
    for f in ("world_size=12", "num_attention_heads=8", "num_kv_groups=2", "ffn_hidden_size=688",
              "vocab_size=4096", "num_layers=8", "global_batch_size=7"):
        assert f in msg, (f, msg)


def test_valid_layouts_and_dp_derivation():
    d = ParallelDims(tp=2, pp=2, dp=None).validate(8, TINY, global_batch_size=8, micro_batch_size=2)
    assert (d.dp, d.world_size) == (2, 8)
    assert ParallelDims(tp=4, dp=None).validate(4, TINY).dp == 1  # tp > KV groups: replicated KV heads
    assert ParallelDims(pp=2, vpp=2, dp=None).validate(2, TINY, layers_per_stage=[1, 3, 2, 2]).dp == 1
    assert ParallelDims(tp=2, pp=2, dp=2).validate().world_size == 8


def test_megatron_rank_order():
    d = ParallelDims(tp=2, pp=2, dp=2)
    # rank = pp * (dp * tp) + dp * tp + tp
    assert [d.coords(r) for r in range(8)] == [(t, dd, p) for p in range(2) for dd in range(2) for t in range(2)]
    assert all(d.rank_of(*d.coords(r)) == r for r in range(8))
    assert d.tp_group_ranks(5) == [4, 5]
    assert d.dp_group_ranks(5) == [5, 7]
    assert d.pp_group_ranks(5) == [1, 5]
    assert d.mp_group_ranks(5) == [0, 1, 4, 5]
    assert ParallelDims(tp=8).tp_subgroup_ranks(5, 4) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="rank 8"):
        d.coords(8)


def test_layout_build_validates_before_any_group():
    with pytest.raises(ValueError, match="num_attention_heads|tp=3"):
        ParallelLayout.build(ParallelDims(tp=3, dp=None), world_size=4)


def test_single_layout_and_noop_comm():
    layout = ParallelLayout.single()
    assert (layout.tp_size, layout.pp_size, layout.dp_size, layout.vpp_size) == (1, 1, 1, 1)
    assert layout.is_first_stage and layout.is_last_stage and layout.pp_next_rank == 0
    import torch
    x = torch.randn(2, 4, 3)
    ledger = CommLedger()
    assert all_reduce(x, layout.tp_group, ledger, "tp") is x
    assert all_gather(x, 1, layout.tp_group, ledger, "tp") is x
    assert reduce_scatter(x, 1, layout.tp_group, ledger, "tp") is x
    assert ledger.snapshot() == {}
