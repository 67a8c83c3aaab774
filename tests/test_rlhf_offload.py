"""Offloading of the co-located PPO models (``engine.rlhf.offload``): the same numbers with and without it,
each phase holding only what it uses (measured from the tensors' storages), device copies really released,
parameter identity kept, the optimizer's released gradients guarded, and clear errors."""
import gc
import weakref

import pytest
import torch

from engine.optim.distributed import DistributedOptimizer
from engine.parallel import ParallelLayout
from engine.rlhf.offload import Offloader, device_bytes
from tests.test_rlhf_ppo import _loop, _models, _ppo

CPU = torch.device("cpu")
TIMING = ("_s", "seconds")


def _bytes(tensors) -> int:
    return device_bytes(list(tensors), CPU)


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith(TIMING) and not k.startswith("resident_bytes")}


def test_offloading_changes_no_number_and_each_phase_holds_only_what_it_uses():
    """Two iterations with and without offloading give identical records (bitwise on CPU: offloading only
    copies), and the ledger of each phase is exactly the groups that phase needs."""
    plain, offloaded = _loop(_ppo(), models=_models(seed=3)), _loop(_ppo(offload=True), models=_models(seed=3))
    for _ in range(2):
        a, b = plain.iteration(), offloaded.iteration()
        assert _untimed(a) == _untimed(b)
    for name in ("actor", "critic"):
        pa, pb = getattr(plain, name)[0].state_dict(), getattr(offloaded, name)[0].state_dict()
        assert all(torch.equal(pa[k], pb[k]) for k in pa)

    opt_a, opt_c = offloaded.actor_trainer.optimizer, offloaded.critic_trainer.optimizer
    # (counted from shapes: offloaded tensors are views of one host arena per group)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    # the trained models' weights are their optimizers' flat buffers (padded to a multiple of dp)
    weights = {"actor": nbytes(opt_a.param_buffers().values()), "critic": nbytes(opt_c.param_buffers().values()),
               "reference": nbytes(offloaded.reference[0].parameters()),
               "reward": nbytes(offloaded.reward[0].parameters())}
    # + moments and fp32 gradient buffers (the actor's are released now: counted from the bucket sizes)
    training = {name: weights[name] + nbytes(opt.state_buffers().values()) + sum(4 * bk.numel for bk in opt.buckets)
                for name, opt in (("actor", opt_a), ("critic", opt_c))}
    assert b["resident_bytes_generate"] == weights["actor"]  # pp = 1, no resharding: sampling on the actor
    assert b["resident_bytes_score"] == max(weights.values())  # one model at a time
    assert b["resident_bytes_update"] == max(training.values())  # one model and its optimizer at a time
    optimizers = (plain.actor_trainer.optimizer, plain.critic_trainer.optimizer)
    everything = sum(weights.values()) + _bytes(t for o in optimizers for d in (o.state_buffers(), o.grad_buffers())
                                               for t in d.values())
    assert a["resident_bytes_generate"] == a["resident_bytes_score"] == a["resident_bytes_update"] == everything
    assert b["resident_bytes_update"] < everything / 2
    # after the iteration the critic (its update ran last) is resident, everything else in host memory
    assert offloaded.offloader.where() == {"actor": "host", "actor.optim": "host", "critic": "device",
                                           "critic.optim": "device", "reference": "host", "reward": "host"}
    assert offloaded.offloader.host_bytes() > 0 and plain.offloader.host_bytes() == 0


def test_offloading_releases_the_device_copies_and_keeps_parameter_identity():
    """The old tensors of an offloaded group are freed (nothing else holds them), the params are the same
    objects, re-pointed, and the host copies are allocated once. (Resharded sampling with offloading is a
    multi-process case: tests/test_rlhf_ppo.py runs pp=2 with it.)"""
    loop = _loop(_ppo(offload=True), models=_models(seed=4))
    optimizer = loop.actor_trainer.optimizer
    params = list(loop.actor[0].parameters())
    old_state = [weakref.ref(t) for t in optimizer.state_buffers().values()]
    old_buffers = [weakref.ref(t) for t in optimizer.param_buffers().values()]
    old_grads = [weakref.ref(t) for t in optimizer.grad_buffers().values()]
    loop.offloader.ensure("critic")
    gc.collect()
    assert all(r() is None for r in old_state + old_buffers + old_grads)  # nothing holds the device copies
    assert list(loop.actor[0].parameters()) == params  # the same Parameter objects, re-pointed
    assert all(p.main_grad is None for p in params) and optimizer.grads_released
    # the host arenas are reused: offloading again allocates nothing new
    host = dict(loop.offloader._host)
    loop.offloader.ensure_all()
    loop.offloader.ensure("reward")
    assert all(loop.offloader._host[k] is v for k, v in host.items())
    # an optimizer state comes with its model's weights (its kernels read both); anything else leaves
    loop.offloader.ensure("actor.optim")
    assert [n for n, w in loop.offloader.where().items() if w == "device"] == ["actor", "actor.optim"]
    # every group's arena is exactly its tensors, each rounded up to 256 bytes
    sizes = {n: sum(-(-t.numel() * t.element_size() // 256) * 256 for t in g.get().values())
             for n, g in loop.offloader.groups.items()}
    assert loop.offloader.host_bytes() == sum(sizes.values())


def test_save_and_load_from_an_offloaded_state_continue_exactly(tmp_path):
    first = _loop(_ppo(iterations=3, offload=True), models=_models(seed=5))
    expected = [first.iteration() for _ in range(3)]
    second = _loop(_ppo(iterations=3, offload=True), models=_models(seed=5))
    second.iteration()
    second.save(tmp_path / "ck")  # the actor was in host memory: save brings each model in
    # other initial actor and critic weights (the checkpoint replaces them), the same frozen models
    other, frozen = _models(seed=6), _models(seed=5)
    third = _loop(_ppo(iterations=3, offload=True), models=(other[0], other[1], frozen[2], frozen[3]))
    third.load(tmp_path / "ck")
    resumed = [third.iteration() for _ in range(2)]
    for want, got in zip(expected[1:], resumed):
        assert _untimed(got) == _untimed(want)


def test_grpo_with_offloading_resumes_exactly(tmp_path):
    """A critic-free run saves and resumes the actor alone (no critic checkpoint) from an offloaded state."""
    from engine.parallel import ParallelLayout
    from engine.rlhf.ppo import PPOLoop
    from tests.test_rlhf_ppo import EOS, LR, OPTIM, PAD, _config, _prompts

    def loop(seed):
        actor, _, reference, reward = _models(seed=seed)
        frozen = _models(seed=5)
        return PPOLoop(_ppo(iterations=3, offload=True, advantage_estimator="grpo"), _config(),
                       ParallelLayout.single(), actor, None, frozen[2], frozen[3], _prompts(), [EOS], PAD,
                       OPTIM, OPTIM, LR, LR)
    first = loop(5)
    expected = [first.iteration() for _ in range(3)]
    second = loop(5)
    second.iteration()
    second.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["actor"]
    third = loop(6)
    third.load(tmp_path / "ck")
    for want in expected[1:]:
        assert _untimed(third.iteration()) == _untimed(want)
    # the estimator is part of the run: a gae run does not resume a critic-free one, nor the reverse
    from engine.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"is a 'grpo' PPO run \(without a critic\); this run uses "
                                              r"advantage_estimator='gae': .*--actor-from .*ck/actor"):
        _loop(_ppo(iterations=3)).load(tmp_path / "ck")
    # refused before anything is loaded: the gae loop's weights are untouched
    fresh = _loop(_ppo(iterations=3))
    before = {k: v.clone() for k, v in fresh.actor[0].state_dict().items()}
    with pytest.raises(CheckpointError, match="is a 'grpo' PPO run"):
        fresh.load(tmp_path / "ck")
    assert all(torch.equal(v, before[k]) for k, v in fresh.actor[0].state_dict().items())
    # a checkpoint from before the estimator was recorded: without a critic it was critic-free, so it resumes
    import json
    manifest = next((tmp_path / "ck" / "actor").glob("step_*/manifest.json"))
    data = json.loads(manifest.read_text())
    del data["extra_state"]["advantage_estimator"]
    manifest.write_text(json.dumps(data))
    loop(6).load(tmp_path / "ck")
    gae = _loop(_ppo(iterations=3))
    gae.save(tmp_path / "gae")
    with pytest.raises(CheckpointError, match=r"is a 'gae' PPO run \(with a critic\); this run uses "
                                              r"advantage_estimator='grpo'"):
        loop(6).load(tmp_path / "gae")


def _optimizer():
    model = torch.nn.Linear(4, 3)
    return model, DistributedOptimizer(list(model.named_parameters()), ParallelLayout.single(), lr=0.1)


def test_optimizer_buffers_release_and_errors():
    model, opt = _optimizer()
    opt.release_grads()
    with pytest.raises(RuntimeError, match="while the gradient buffers are released .*call optimizer.zero_grad"):
        model(torch.ones(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="gradient buffers are released .*zero_grad\\(\\), backward, then step"):
        opt.step()
    opt.zero_grad()  # allocates them again
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not opt.grads_released and opt.grad_buffers()["bucket0.grad"].numel() > 0
    # weights and optimizer state apart (an offloaded state next to resident weights): a clear error
    opt.set_buffers({"bucket0.exp_avg": torch.zeros(1, 15, device="meta").view(15)})
    with pytest.raises(RuntimeError, match=r"the optimizer's buffers are on several devices \['cpu', 'meta'\]"):
        opt.step()
    opt.set_buffers({"bucket0.exp_avg": torch.zeros(15)})
    with pytest.raises(ValueError, match=r"set_buffers: bucket0.exp_avg \(2,\) torch.float32 does not replace"):
        opt.set_buffers({"bucket0.exp_avg": torch.zeros(2)})
    # fp32 without ZeRO: the params are the master weights, which follow the param buffer
    new = opt.param_buffers()["bucket0.param"].clone()
    opt.set_buffers({"bucket0.param": new})
    assert opt.buckets[0].master is new
    assert model.weight.untyped_storage().data_ptr() == new.untyped_storage().data_ptr()


def test_offloader_errors():
    model, opt = _optimizer()
    off = Offloader(CPU)
    off.add_model("m", [model], opt)
    with pytest.raises(ValueError, match="a group named 'm' exists already"):
        off.add_model("m", [model])
    with pytest.raises(ValueError, match=r"unknown groups \['actor'\]; registered: \['m', 'm.optim'\]"):
        off.ensure("actor")
    disabled = Offloader(CPU, enabled=False)
    disabled.add_model("m", [model], opt)
    disabled.ensure()
    assert disabled.where() == {"m": "device", "m.optim": "device"}


def test_host_arenas_start_on_a_page_and_own_their_last_page():
    """What CUDA page-locks (cudaHostRegister needs ranges that do not overlap another arena's pages)."""
    import mmap

    from engine.rlhf.offload import _page_aligned
    arenas = [_page_aligned(n) for n in (1, 100, mmap.PAGESIZE, mmap.PAGESIZE + 1, 3 * 2**20)]
    for a, n in zip(arenas, (1, 100, mmap.PAGESIZE, mmap.PAGESIZE + 1, 3 * 2**20)):
        assert a.numel() == n and a.data_ptr() % mmap.PAGESIZE == 0
        pages = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
        assert a.untyped_storage().nbytes() >= (a.data_ptr() - a.untyped_storage().data_ptr()) + pages


def test_device_bytes_counts_each_storage_once():
    flat = torch.zeros(100)
    views = [flat[:10], flat[10:50], flat[50:]]
    assert device_bytes(views, CPU) == 400
    assert device_bytes(views + [torch.zeros(5, dtype=torch.float16)], CPU) == 410
    assert device_bytes([torch.zeros(0)], CPU) == 0
    assert device_bytes(views, torch.device("meta")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the allocator's bytes")
def test_offloading_frees_the_allocators_device_memory():
    """On a GPU, offloading a group returns exactly its measured bytes to the caching allocator."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = torch.nn.Linear(1024, 1024).to(device)
    opt = DistributedOptimizer(list(model.named_parameters()), ParallelLayout.single(), lr=0.1)
    off = Offloader(device)
    off.add_model("m", [model], opt)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    held = off.resident_bytes()
    off.ensure()
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated(device) == held
    # host copies: page-locked in place, exactly the group's bytes (256-byte aligned), not rounded up
    host = [t for g in off.groups.values() for t in g.get().values()]
    assert all(t.is_pinned() for t in host)
    assert off.host_bytes() == sum(-(-t.numel() * t.element_size() // 256) * 256 for t in host)
    off.ensure_all()
    assert all(p.device == device for p in model.parameters())
    opt.zero_grad()  # the released gradient buffers come back on the device
    model(torch.ones(2, 1024, device=device)).sum().backward()
    opt.step()
