"""Sharded checkpoints (engine.train.checkpoint): bitwise resume, resharding, atomic commit, damaged and
hostile checkpoints, keep-last-k, and export to the Hugging Face layout.

Two 4-process gloo launches (the resume needs fresh processes) and single-process cases.

Tolerances: resuming at the SAME layout replays the same ops in the same order, so losses, weights
and optimizer states must be bitwise equal. Resharding moves data only, so the loaded full weights
and optimizer states must be bitwise equal too; but a model at another TP degree sums its matmul
partial products (row-parallel all-reduce, vocab-parallel logits) in another order, so losses differ
by fp32 rounding (~1e-7 relative per op); the loss before and after one more AdamW step must agree
to 1e-5 relative (tests/parallel/test_data_parallel.py observes ~1e-7 for the same model).
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

import kernels
from engine.config import GLMConfig
from engine.data.datasets import DataIterator
from engine.model.glm import GLMForCausalLM, default_positions
from engine.optim import DistributedOptimizer
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.mappings import gather_from_tp
from engine.parallel.sharding import gather_full_state_dict
from engine.parallel.tensor_parallel import build_parallel_model
from engine.train import checkpoint as ckpt
from engine.train.checkpoint import (AsyncCheckpointer, CheckpointError, latest_step, load_checkpoint,
                                     read_full_model_state, save_checkpoint)
from engine.train.lr import LRConfig, LRSchedule
from tests._dist import run_distributed

CFG = GLMConfig.preset("tiny").replace(num_layers=2, vocab_size=512)
S, MICRO, SAMPLES = 8, 2, 16
HYPER = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SCHEDULE = LRSchedule(LRConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2), train_steps=6)
PROBE_LR = 1e-3
REL_TOL = 1e-5


# ---- a small training loop -----------------------------------------------------------------------
def _dataset():
    seqs = torch.randint(0, CFG.vocab_size, (SAMPLES, S + 1), generator=torch.Generator().manual_seed(3)).numpy()
    return [{"input_ids": s[:-1], "labels": s[1:]} for s in seqs]


def _iterator(layout):
    return DataIterator.for_rank(_dataset(), MICRO, layout.dp_rank, layout.dp_size, shuffle=True, seed=5,
                                 num_epochs=None)


def _seed(layout, base):
    # python/numpy draw the lr jitter (must agree on every rank); torch draws the loss mask (must agree
    # within a TP group, differs between DP ranks, so a rank-swapped RNG restore changes the losses)
    random.seed(base)
    np.random.seed(base)
    torch.manual_seed(base + 1000 * layout.dp_rank)


def _rng_digest():
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    h.update(np.random.get_state()[1].tobytes())
    return h.hexdigest()


def _loss(model, layout, ids, labels):
    return kernels.cross_entropy(gather_from_tp(model(ids), layout), labels)


def _build(layout, seed, zero=True, layer_indices=None):
    kw = {} if layer_indices is None else dict(layer_indices=layer_indices, pre_process=layout.is_first_stage,
                                               post_process=layout.is_last_stage)
    model = build_parallel_model(GLMForCausalLM, CFG, layout, seed=seed, **kw)
    opt = DistributedOptimizer(model.named_parameters(), layout, use_distributed_optimizer=zero,
                               bucket_size_bytes=256 * 1024, **HYPER)  # several buckets
    return model, opt


def _train(model, opt, layout, it, start, steps):
    """Uses every RNG a run may use: torch (loss mask), python and numpy (lr jitter), and the data order."""
    losses = []
    for step in range(start, start + steps):
        batch = next(it)
        labels = batch["labels"].clone()
        labels[torch.rand(labels.shape) < 0.25] = -100
        lr = SCHEDULE(step) * (1 + 0.1 * random.random()) * (1 + 0.1 * float(np.random.rand()))
        loss = _loss(model, layout, batch["input_ids"], labels)
        loss.backward()
        opt.step(lr=lr)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _snapshot(model, opt, layout):
    """sha256 of every full (gathered over TP/PP/DP) weight and optimizer state: equal digests = bitwise equal."""
    full = dict(gather_full_state_dict(model, CFG, layout))
    names = {id(p): n for n, p in model.named_parameters()}
    states = opt.param_states()
    for key in ckpt.OPTIM_KEYS:
        local = {names[id(opt.params[i])]: s[key] for i, s in states.items()}
        full.update({f"{key}/{n}": t for n, t in gather_full_state_dict(local, CFG, layout).items()})
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in full.items()}


def _probe_batch(layout):
    rows = torch.randint(0, CFG.vocab_size, (4, S + 1), generator=torch.Generator().manual_seed(11))
    per = 4 // layout.dp_size
    rows = rows[layout.dp_rank * per:(layout.dp_rank + 1) * per]
    return rows[:, :-1], rows[:, 1:]


def _probe(model, opt, layout):
    """(loss, loss after one AdamW step at PROBE_LR) on this DP rank's share of a fixed batch."""
    ids, labels = _probe_batch(layout)
    loss = _loss(model, layout, ids, labels)
    loss.backward()
    opt.step(lr=PROBE_LR)
    opt.zero_grad()
    with torch.no_grad():
        return loss.item(), _loss(model, layout, ids, labels).item()


def _probe_pp(model, opt, layout):
    """``_probe`` on a two-stage pipeline (tp=1), activations and their gradients sent by hand."""
    ids, labels = _probe_batch(layout)
    pos = default_positions(ids, None)

    def forward_backward(backward):
        if layout.is_first_stage:
            h = model.run_layers(model.embedding(ids), pos)
            dist.send(h.detach().contiguous(), layout.pp_next_rank)
            if backward:
                grad = torch.empty_like(h)
                dist.recv(grad, layout.pp_next_rank)
                h.backward(grad)
            return None
        h = torch.empty(ids.shape + (CFG.hidden_size,))
        dist.recv(h, layout.pp_prev_rank)
        h.requires_grad_(backward)
        loss = kernels.cross_entropy(model.output_layer(model.final_norm(model.run_layers(h, pos))), labels)
        if backward:
            loss.backward()
            dist.send(h.grad.contiguous(), layout.pp_prev_rank)
        return loss.item()

    before = forward_backward(True)
    opt.step(lr=PROBE_LR)
    opt.zero_grad()
    with torch.no_grad():
        return before, forward_backward(False)


@contextlib.contextmanager
def _disk_failure_on_rank_1(rank):
    """DCP's file writer fails on rank 1 (the other ranks write normally) while the context is open."""
    original = FileSystemWriter.write_data
    if rank == 1:
        def failing_write(self, plan, planner):
            raise OSError("simulated disk failure on rank 1")
        FileSystemWriter.write_data = failing_write
    try:
        yield
    finally:
        FileSystemWriter.write_data = original


# ---- launch 1: straight run, 3 steps + save, a save that fails on one rank ---------------------
def _launch_train_and_save(rank, world_size, ckdir):
    layout = ParallelLayout.build(ParallelDims(tp=2, pp=1, dp=2))
    model, opt = _build(layout, seed=0)
    it = _iterator(layout)
    _seed(layout, 10)
    straight = _train(model, opt, layout, it, 0, 6)
    after6 = _snapshot(model, opt, layout)

    model, opt = _build(layout, seed=0)
    it = _iterator(layout)
    _seed(layout, 10)
    first = _train(model, opt, layout, it, 0, 3)
    assert first == straight[:3]
    rng = _rng_digest()
    save_checkpoint(ckdir, 3, model, opt, layout, CFG, extra_state={"data": it.state_dict()})
    assert _rng_digest() == rng, "saving must not draw random numbers"
    after3 = _snapshot(model, opt, layout)

    # one rank's writer fails mid-save: every rank raises (none hangs), step 3 stays latest
    with _disk_failure_on_rank_1(rank), pytest.raises(CheckpointError, match="DCP write failed"):
        save_checkpoint(ckdir, 4, model, opt, layout, CFG, extra_state={"data": it.state_dict()})
    dist.barrier()
    left = sorted(p.name for p in Path(ckdir).iterdir())
    return {"straight": straight, "rng": rng, "after3": after3, "after6": after6, "left": left,
            "latest": latest_step(ckdir)}


# ---- launch 2: load in new processes, resume; reshard to pp=2; a corruption one rank sees ------
def _launch_resume_and_reshard(rank, world_size, ckdir, bad_dir, tp4_dir):
    layout = ParallelLayout.build(ParallelDims(tp=2, pp=1, dp=2))
    model, opt = _build(layout, seed=1)  # other weights: the load must overwrite every one
    _seed(layout, 99)
    extra = load_checkpoint(ckdir, model, opt, layout, CFG)
    out = {"rng": _rng_digest(), "after_load": _snapshot(model, opt, layout), "step": extra["step"]}
    out["probe"] = _probe(model, opt, layout)

    load_checkpoint(ckdir, model, opt, layout, CFG)  # again: undoes the probe step
    it = _iterator(layout)
    it.load_state_dict(extra["data"])
    out["resumed"] = _train(model, opt, layout, it, 3, 3)
    out["after6"] = _snapshot(model, opt, layout)

    # a byte flipped in the file of rank 3 (tp rank 1): only tp rank 1 reads it, every rank must raise
    if rank == 0:
        shutil.copytree(Path(ckdir) / "step_000003", Path(bad_dir) / "step_000003")
        (Path(bad_dir) / "latest").write_text("step_000003\n")
        f = Path(bad_dir) / "step_000003" / "__3_0.distcp"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    dist.barrier()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"__3_0\.distcp is corrupted"):
        load_checkpoint(bad_dir, model, opt, layout, CFG)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a failed load changed weights"

    # reshard: (tp, pp, dp) = (2, 1, 2) -> (1, 2, 2), stages own layer 0 / layer 1
    pp_layout = ParallelLayout.build(ParallelDims(tp=1, pp=2, dp=2), name="pp")
    stage, stage_opt = _build(pp_layout, seed=2, layer_indices=[pp_layout.pp_rank])
    with pytest.warns(UserWarning, match="RNG states are not restored") if rank == 0 else contextlib.nullcontext():
        load_checkpoint(ckdir, stage, stage_opt, pp_layout, CFG, step=3)
    out["pp_after_load"] = _snapshot(stage, stage_opt, pp_layout)
    out["pp_probe"] = _probe_pp(stage, stage_opt, pp_layout)
    out["pp_coords"] = (pp_layout.pp_rank, pp_layout.dp_rank)

    # tp=4 > 2 KV groups: each KV head is replicated on two ranks; load into it, then save from it
    # (the replicated rows must be written once) for the (1,1,1) load in the parent
    tp4 = ParallelLayout.build(ParallelDims(tp=4, pp=1, dp=1), name="tp4")
    model4, opt4 = _build(tp4, seed=4, zero=False)
    load_checkpoint(ckdir, model4, opt4, tp4, CFG, step=3)
    out["tp4_after_load"] = _snapshot(model4, opt4, tp4)
    save_checkpoint(tp4_dir, 3, model4, opt4, tp4, CFG)
    return out


def test_resume_bitwise_and_reshard(tmp_path):
    ckdir, bad, tp4_dir = str(tmp_path / "ck"), str(tmp_path / "bad"), str(tmp_path / "tp4")
    a = run_distributed(_launch_train_and_save, 4, ckdir)
    assert a[0]["latest"] == 3 and a[0]["left"] == ["latest", "step_000003"], a[0]["left"]

    b = run_distributed(_launch_resume_and_reshard, 4, ckdir, bad, tp4_dir)
    for r in range(4):
        assert b[r]["step"] == 3
        assert b[r]["rng"] == a[r]["rng"], f"rank {r}: RNG state not restored"
        assert b[r]["resumed"] == a[r]["straight"][3:], f"rank {r}: resumed losses differ"
    assert b[0]["after_load"] == a[0]["after3"]
    assert b[0]["after6"] == a[0]["after6"], "weights/optimizer after the resumed run differ"
    assert b[0]["pp_after_load"] == a[0]["after3"], "resharded (pp=2) weights/optimizer state differ"
    assert b[0]["tp4_after_load"] == a[0]["after3"], "resharded (tp=4) weights/optimizer state differ"
    # (2,1,2) probe on dp rank d (ranks d*2, d*2+1) vs the pp=2 last stage (ranks 2 + d)
    for r in range(4):
        pp_rank, dp_rank = b[r]["pp_coords"]
        if pp_rank == 1:
            ref = b[2 * dp_rank]["probe"]
            for got, want in zip(b[r]["pp_probe"], ref):
                assert abs(got - want) <= REL_TOL * abs(want), (b[r]["pp_probe"], ref)

    # reshard to (1, 1, 1) in this process, no process group, no ZeRO
    single = ParallelLayout.single()
    model, opt = _build(single, seed=3, zero=False)
    with pytest.warns(UserWarning, match="RNG states are not restored"):
        load_checkpoint(ckdir, model, opt, single, CFG, step=3)
    assert _snapshot(model, opt, single) == a[0]["after3"]
    with pytest.warns(UserWarning, match="RNG states are not restored"):
        load_checkpoint(tp4_dir, model, opt, single, CFG)  # saved at tp=4 with replicated KV heads
    assert _snapshot(model, opt, single) == a[0]["after3"]
    got = _probe(model, opt, single)
    want = [(b[0]["probe"][i] + b[2]["probe"][i]) / 2 for i in range(2)]  # two equal DP halves
    for g, w in zip(got, want):
        assert abs(g - w) <= REL_TOL * abs(w), (got, want)


# ---- launch 3: async saves overlapping training ---------------------------------------------------
def _launch_async(rank, world_size, ckdir):
    """dp=2 with ZeRO-1 (the snapshot joins the optimizer's gather): a save started at step 2 is written
    while two more steps run (their collectives on the default group, the saver's on its own), and holds
    the step-2 state and RNG; a write failure on one rank reaches every rank at the next wait."""
    layout = ParallelLayout.build(ParallelDims(tp=1, pp=1, dp=2))
    model, opt = _build(layout, seed=0)
    it = _iterator(layout)
    _seed(layout, 10)
    _train(model, opt, layout, it, 0, 2)
    at_save, rng = _snapshot(model, opt, layout), _rng_digest()
    saver = AsyncCheckpointer(layout)
    saver.save(ckdir, 2, model, opt, layout, CFG, extra_state={"data": it.state_dict()})
    _train(model, opt, layout, it, 2, 2)
    after = _snapshot(model, opt, layout)
    path = saver.wait()

    with _disk_failure_on_rank_1(rank):
        saver.save(ckdir, 4, model, opt, layout, CFG)
        with pytest.raises(CheckpointError, match="DCP write failed.*simulated disk failure"):
            saver.wait()
    # rank 1 cannot copy its state to host memory: every rank raises at save (none waits in a collective)
    saver._staging.clear()  # no host buffers to reuse: the copy must allocate
    empty = torch.empty
    if rank == 1:
        def no_host_memory(*a, **kw):
            if "pin_memory" in kw:
                raise RuntimeError("simulated: no host memory")
            return empty(*a, **kw)
        torch.empty = no_host_memory
    try:
        with pytest.raises(CheckpointError, match=r"copying this rank's state.*rank 1: RuntimeError: simulated"):
            saver.save(ckdir, 5, model, opt, layout, CFG)
    finally:
        torch.empty = empty
    saver.close()

    fresh, fresh_opt = _build(layout, seed=1)
    _seed(layout, 99)
    extra = load_checkpoint(ckdir, fresh, fresh_opt, layout, CFG)
    return {"path": str(path), "at_save": at_save, "after": after, "loaded": _snapshot(fresh, fresh_opt, layout),
            "rng": rng, "loaded_rng": _rng_digest(), "step": extra["step"], "latest": latest_step(ckdir)}


def test_async_save_overlaps_training_and_holds_the_state_at_save_time(tmp_path):
    ckdir = str(tmp_path / "ck")
    out = run_distributed(_launch_async, 2, ckdir)
    for r, res in enumerate(out):
        assert res["path"] == str(Path(ckdir) / "step_000002") and res["latest"] == res["step"] == 2, r
        assert res["loaded_rng"] == res["rng"], f"rank {r}: RNG state is not the one at the save"
    assert out[0]["loaded"] == out[0]["at_save"] != out[0]["after"]
    assert sorted(p.name for p in Path(ckdir).iterdir()) == ["latest", "step_000002"]  # the failed save left nothing


# ---- single process ---------------------------------------------------------------------------
def _tiny_run(seed=0):
    layout = ParallelLayout.single()
    model, opt = _build(layout, seed=seed, zero=False)
    ids, labels = _probe_batch(layout)
    _loss(model, layout, ids, labels).backward()
    opt.step()
    opt.zero_grad()
    return layout, model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A committed single-process checkpoint at step 7 (pristine: tests copy it before damaging it)."""
    root = tmp_path_factory.mktemp("saved")
    layout, model, opt = _tiny_run()
    save_checkpoint(root, 7, model, opt, layout, CFG, extra_state={"note": "x"}, tokenizer_fingerprint="abc123")
    return root, {n: p.detach().clone() for n, p in model.named_parameters()}


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(saved[0], dst)
    return dst


def _load(ckdir, **kw):
    layout, model, opt = _tiny_run(seed=5)
    return load_checkpoint(ckdir, model, opt, layout, CFG, **kw), model


def test_round_trip_single_process(saved, tmp_path):
    extra, model = _load(saved[0], tokenizer_fingerprint="abc123")
    assert extra == {"note": "x", "step": 7}
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[1][n]), n
    config, full = read_full_model_state(saved[0])
    assert config == CFG and all(torch.equal(full[n], t) for n, t in saved[1].items())
    # a list of model chunks (virtual pipeline) with no optimizer
    chunks = [GLMForCausalLM(CFG, layer_indices=[0], post_process=False),
              GLMForCausalLM(CFG, layer_indices=[1], pre_process=False)]
    load_checkpoint(saved[0], chunks, None, ParallelLayout.single(), CFG)
    for chunk in chunks:
        for n, p in chunk.named_parameters():
            assert torch.equal(p, saved[1][n]), n


def test_bf16_params_with_fp32_master(tmp_path):
    layout = ParallelLayout.single()
    runs = []
    for seed in (0, 1):
        model = build_parallel_model(GLMForCausalLM, CFG, layout, seed=seed)
        opt = DistributedOptimizer(model.named_parameters(), layout, mixed_precision="bf16", **HYPER)
        runs.append((model, opt))
    (model, opt), (fresh, fresh_opt) = runs
    ids, labels = _probe_batch(layout)
    _loss(model, layout, ids, labels).backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, layout, CFG)
    load_checkpoint(tmp_path, fresh, fresh_opt, layout, CFG)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    want, got = opt.param_states(), fresh_opt.param_states()
    assert fresh_opt.step_count == 1
    assert all(torch.equal(want[i][k], got[i][k]) for i in want for k in ckpt.OPTIM_KEYS)
    with pytest.raises(ValueError, match="embedding.weight: missing"):
        fresh_opt.load_param_states({}, 1)


def _rewrite_manifest(step_dir: Path, *changed: str) -> None:
    """Update the manifest's size and sha256 of ``changed`` files (as an attacker who can write the dir would)."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name in changed:
        data = (step_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(step_dir: Path, edit) -> None:
    manifest = json.loads((step_dir / "manifest.json").read_text())
    edit(manifest)
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_shard": (lambda d: _truncate(d / "step_000007/__0_0.distcp"), r"__0_0\.distcp is truncated"),
    "flipped_byte": (lambda d: _flip(d / "step_000007/__0_0.distcp"), r"__0_0\.distcp is corrupted"),
    "truncated_metadata": (lambda d: _truncate(d / "step_000007/.metadata"), r"\.metadata is truncated"),
    "missing_metadata": (lambda d: (d / "step_000007/.metadata").unlink(), r"step_000007/\.metadata is missing"),
    "missing_manifest": (lambda d: (d / "step_000007/manifest.json").unlink(), r"manifest\.json is missing"),
    "garbled_manifest": (lambda d: (d / "step_000007/manifest.json").write_text("{not json"),
                         r"manifest\.json is corrupted"),
    "chunk_gap": (lambda d: _edit_manifest(d / "step_000007", lambda m: m["tensors"]["model"]["embedding.weight"]
                                           .update(chunks=[[0, 256]])), r"manifest\.json is corrupted: .*end at 256"),
    "truncated_rng": (lambda d: _truncate(d / "step_000007/rng/rank_00000.json"), r"rank_00000\.json is truncated"),
    "latest_to_nowhere": (lambda d: (d / "latest").write_text("step_000009\n"),
                          r"latest points to .*step_000009, which does not exist"),
    "latest_garbage": (lambda d: (d / "latest").write_text("../../etc\n"), r"latest does not name a step"),
    "latest_missing": (lambda d: (d / "latest").unlink(), r"latest is missing but .* holds committed"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_checkpoint_names_the_file(saved, tmp_path, case):
    ckdir = _copy(saved, tmp_path)
    damage, message = CORRUPTIONS[case]
    damage(ckdir)
    layout, model, opt = _tiny_run(seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckdir, model, opt, layout, CFG)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a failed load changed weights"


def test_mismatched_config_and_tokenizer(saved):
    layout = ParallelLayout.single()
    other = CFG.replace(num_layers=3, ffn_hidden_size=512)
    model = build_parallel_model(GLMForCausalLM, other, layout)
    with pytest.raises(CheckpointError, match=r"manifest\.json was saved with a different model config: "
                                              r"ffn_hidden_size: checkpoint 688 vs this run 512; num_layers"):
        load_checkpoint(saved[0], model, None, layout, other)
    with pytest.raises(CheckpointError, match="tokenizer abc123, this run uses ffff"):
        _load(saved[0], tokenizer_fingerprint="ffff")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        _load(saved[0] / "nothing_here")


class _Evil:
    """Unpickling this opens (creates) a sentinel file: the stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickles_are_refused_and_run_nothing(saved, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    sentinel = tmp_path / "pwned"

    # 1. .metadata replaced by a hostile pickle (manifest checksums updated to match)
    ckdir = _copy(saved, tmp_path)
    step = ckdir / "step_000007"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(sentinel)))
    _rewrite_manifest(step, ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load DCP metadata .* is not allowed"):
        _load(ckdir)
    with pytest.raises(CheckpointError, match="refused"):
        read_full_model_state(ckdir)
    assert not sentinel.exists()

    # 2. a tensor record pointing at a hostile torch.save payload appended to a data file
    shutil.rmtree(ckdir)
    ckdir = _copy(saved, tmp_path)
    step = ckdir / "step_000007"
    files = json.loads((step / "manifest.json").read_text())["files"]
    meta = ckpt._read_dcp_metadata(step / ".metadata", files[".metadata"])  # the allow-list reader
    buf = io.BytesIO()
    torch.save(_Evil(sentinel), buf)
    data = step / "__0_0.distcp"
    offset = data.stat().st_size
    data.write_bytes(data.read_bytes() + buf.getvalue())
    index = next(i for i in meta.storage_data if i.fqn.startswith("model/embedding.weight@"))
    meta.storage_data[index] = dataclasses.replace(meta.storage_data[index], offset=offset, length=len(buf.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    _rewrite_manifest(step, ".metadata", "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: cannot read tensors .*[Ww]eights only load failed"):
        _load(ckdir)
    assert not sentinel.exists()

    # 3. a tensor record turned into a pickled-bytes record (DCP would torch.load it unsafely)
    meta.state_dict_metadata[index.fqn] = BytesStorageMetadata()
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    _rewrite_manifest(step, ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata has no tensor model/embedding\.weight@"):
        _load(ckdir)
    assert not sentinel.exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    layout, model, opt = _tiny_run()
    save_checkpoint(tmp_path, 1, model, opt, layout, CFG)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lr=1e-2)  # change the weights so a wrong load would show

    # the writer dies after writing its data
    original = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        original(self, plan, planner).wait()
        raise RuntimeError("killed mid-save")
    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_die)
    with pytest.raises(CheckpointError, match="killed mid-save"):
        save_checkpoint(tmp_path, 2, model, opt, layout, CFG)
    monkeypatch.undo()
    # the job dies after the data, before the manifest
    monkeypatch.setattr(ckpt, "_write_manifest", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(CheckpointError, match="killed"):
        save_checkpoint(tmp_path, 2, model, opt, layout, CFG)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]

    # a hard kill leaves its temp dir behind: never a step, removed by the next save
    (tmp_path / ".tmp_step_000002_dead").mkdir()
    (tmp_path / ".tmp_step_000002_dead" / "__0_0.distcp").write_bytes(b"partial")
    assert latest_step(tmp_path) == 1
    _, fresh = _load(tmp_path)
    assert all(torch.equal(p, good[n]) for n, p in fresh.named_parameters())

    # a crash between the rename and the pointer update: the step is complete, latest still says 1
    monkeypatch.setattr(ckpt, "_replace_durable", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(CheckpointError, match="killed"):
        save_checkpoint(tmp_path, 2, model, opt, layout, CFG)
    monkeypatch.undo()
    assert latest_step(tmp_path) == 1 and not (tmp_path / ".tmp_step_000002_dead").exists()
    _, fresh = _load(tmp_path)
    assert all(torch.equal(p, good[n]) for n, p in fresh.named_parameters())


def test_keep_last_k(tmp_path):
    layout, model, opt = _tiny_run()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, layout, CFG, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert latest_step(tmp_path) == 5
    assert _load(tmp_path, step=4)[0]["step"] == 4
    with pytest.raises(CheckpointError, match=r"step_000002 does not exist .*step_000004"):
        _load(tmp_path, step=2)
    save_checkpoint(tmp_path, 6, model, opt, layout, CFG)  # keep_last=None keeps everything
    assert latest_step(tmp_path) == 6 and (tmp_path / "step_000004").is_dir()
    with pytest.raises(CheckpointError, match="keep_last=0"):
        save_checkpoint(tmp_path, 7, model, opt, layout, CFG, keep_last=0)


def test_convert_checkpoint_to_hf(saved, tmp_path, capsys):
    import transformers
    from launch.convert import main
    assert main(["--checkpoint", str(saved[0]), "--step", "7", "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.GlmForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = GLMForCausalLM(CFG, init=False)
    ours.load_state_dict(saved[1])
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(ids), hf(ids).logits
    # same fp32 math, different op order (fused vs split QKV): rounding only (see test_model_hf.py)
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()

    assert main(["--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_async_save_commits_only_when_complete(tmp_path, monkeypatch):
    """While the background write is held back, nothing is committed and training changes the weights;
    the committed step then holds the weights at the save. Errors surface at wait()."""
    import threading
    layout, model, opt = _tiny_run()
    at_save = {n: p.detach().clone() for n, p in model.named_parameters()}
    release, persist = threading.Event(), ckpt._persist
    monkeypatch.setattr(ckpt, "_persist", lambda *a, **k: (release.wait(30), persist(*a, **k))[1])
    saver = AsyncCheckpointer(layout)
    saver.save(tmp_path / "ck", 3, model, opt, layout, CFG)
    assert saver.in_flight and latest_step(tmp_path / "ck") is None
    opt.step(lr=1e-2)  # training goes on: the snapshot must not see this
    assert not all(torch.equal(p, at_save[n]) for n, p in model.named_parameters())
    release.set()
    assert saver.wait() == tmp_path / "ck" / "step_000003" and not saver.in_flight
    extra, loaded = _load(tmp_path / "ck")
    assert extra["step"] == 3 and all(torch.equal(p, at_save[n]) for n, p in loaded.named_parameters())
    # the next save copies into the same host buffers (written by then) and holds the new weights
    buffers = {k: t.data_ptr() for k, t in saver._staging.items()}
    at_save = {n: p.detach().clone() for n, p in model.named_parameters()}
    saver.save(tmp_path / "ck", 4, model, opt, layout, CFG)
    opt.step(lr=1e-2)
    assert saver.wait() == tmp_path / "ck" / "step_000004"
    assert buffers and {k: t.data_ptr() for k, t in saver._staging.items()} == buffers
    extra, loaded = _load(tmp_path / "ck")
    assert extra["step"] == 4 and all(torch.equal(p, at_save[n]) for n, p in loaded.named_parameters())

    (tmp_path / "file").write_text("not a directory")
    saver.save(tmp_path / "file", 4, model, opt, layout, CFG)
    with pytest.raises(CheckpointError, match="cannot create a temp dir"):
        saver.close()
    assert saver.wait() is None  # the error is reported once
    with pytest.raises(CheckpointError, match="after close"):
        saver.save(tmp_path / "ck", 5, model, opt, layout, CFG)
