"""Packed SFT (``PackedSFTDataset`` + ``segment_ids``): the row layout, each packed conversation gets the
logits, loss terms and gradients of its own padded row, the same on TP=2 and PP=2 layouts, and
launch.train's ``--pack``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.data.datasets import PackedSFTDataset, SFTDataset
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from engine.model.glm import GLMForCausalLM
from tests._dist import run_distributed
from tests.test_data import TOK  # byte-level stand-in tokenizer with GLM's chat format and loss mask

SEQ = 64
ROOT = Path(__file__).resolve().parents[1]


def _config() -> GLMConfig:
    return GLMConfig(vocab_size=TOK.vocab_size, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, num_kv_groups=2, head_dim=8, max_position_embeddings=128, name="pack-test")


def _indexed(tmp_path, n=12) -> IndexedDataset:
    """Chat conversations of varied lengths (about 15 to 40 tokens)."""
    prefix = tmp_path / "chat"
    with IndexedDatasetBuilder(prefix, TOK, "chat") as b:
        for i in range(n):
            b.add_document(*TOK.encode_chat([{"role": "user", "content": "q" * (1 + i % 5)},
                                             {"role": "assistant", "content": f"ans {i} " + "x" * (3 * (i % 4))}]))
    return IndexedDataset(prefix, TOK)


def test_packed_rows_hold_every_conversation_once_with_its_own_labels_and_positions(tmp_path):
    indexed = _indexed(tmp_path)
    ds = PackedSFTDataset(indexed, SEQ, seed=3)
    padded = SFTDataset(indexed, SEQ)  # one conversation per row: the reference labels
    seen = []
    for i in range(len(ds)):
        item, convs = ds[i], ds.conversations(i)
        seen.extend(convs.tolist())
        p = 0
        for segment, conv in enumerate(convs, start=1):
            n = int(indexed.sizes[conv])
            assert (item["segment_ids"][p:p + n] == segment).all()
            assert item["position_ids"][p:p + n].tolist() == list(range(n))
            assert (item["input_ids"][p:p + n] == indexed.get(int(conv), 0, n)).all()
            ref = padded[int(conv)]["labels"]
            assert item["labels"][p:p + n - 1].tolist() == ref[:n - 1].tolist()
            assert item["labels"][p + n - 1] == -100  # no loss across the boundary to the next conversation
            p += n
        assert (item["segment_ids"][p:] == 0).all() and (item["attention_mask"][p:] == 0).all()
        assert (item["attention_mask"][:p] == 1).all() and (item["labels"][p:] == -100).all()
    assert sorted(seen) == list(range(len(indexed)))
    real = int(indexed.sizes.sum())
    assert ds.packing_efficiency == pytest.approx(real / (len(ds) * SEQ))
    assert len(ds) < len(padded) and ds.packing_efficiency > real / (len(padded) * SEQ)
    assert PackedSFTDataset(indexed, SEQ, seed=3).conversations(0).tolist() == ds.conversations(0).tolist()


def test_long_conversations_are_cut_and_bad_input_is_refused(tmp_path):
    indexed = _indexed(tmp_path)
    short = PackedSFTDataset(indexed, 16)
    assert short.num_truncated == int((indexed.sizes > 16).sum()) > 0
    assert all(int((short[i]["segment_ids"] > 0).sum()) <= 16 for i in range(len(short)))
    with pytest.raises(ValueError, match="seq_length must be >= 2"):
        PackedSFTDataset(indexed, 1)
    prefix = tmp_path / "text"
    with IndexedDatasetBuilder(prefix, TOK, "text") as b:
        b.add_document(TOK.encode("plain text"))
    with pytest.raises(ValueError, match="without a loss mask; SFT needs chat data"):
        PackedSFTDataset(IndexedDataset(prefix, TOK), SEQ)


def _packed_row(tmp_path):
    indexed = _indexed(tmp_path)
    ds = PackedSFTDataset(indexed, SEQ, seed=0)
    i = max(range(len(ds)), key=lambda r: len(ds.conversations(r)))  # the row with the most conversations
    assert len(ds.conversations(i)) >= 2
    return indexed, ds, i


def test_packed_row_equals_each_conversation_alone(tmp_path):
    """fp32, torch backend: the logits of every packed conversation equal those of the conversation run
    alone, and the packed row's summed loss and gradients equal the sum over the padded rows."""
    indexed, ds, i = _packed_row(tmp_path)
    item = {k: torch.from_numpy(v)[None] for k, v in ds[i].items()}
    torch.manual_seed(0)
    model = GLMForCausalLM(_config())
    logits = model(item["input_ids"], item["attention_mask"], item["position_ids"], segment_ids=item["segment_ids"])
    packed_loss = kernels.cross_entropy(logits, item["labels"], reduction="sum")
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    padded = SFTDataset(indexed, SEQ)
    p, alone_loss = 0, 0.0
    for conv in ds.conversations(i):
        n = int(indexed.sizes[conv])
        ids = torch.from_numpy(indexed.get(int(conv), 0, n).astype(np.int64))[None]
        # fp32; the packed forward's masked keys add exact zeros, so only summation order differs
        torch.testing.assert_close(logits[:, p:p + n], model(ids), rtol=1e-5, atol=1e-5)
        row = {k: torch.from_numpy(v)[None] for k, v in padded[int(conv)].items()}
        loss = kernels.cross_entropy(model(row["input_ids"], row["attention_mask"]), row["labels"], reduction="sum")
        loss.backward()
        alone_loss += loss.item()
        p += n
    assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 3\) != input_ids shape"):
        model(item["input_ids"], segment_ids=item["segment_ids"][:, :3])


def _trainer_loss(rank, world_size, dims, state, batch):
    from engine.parallel import ParallelLayout
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import load_full_into
    from engine.train.lr import LRConfig, LRSchedule
    from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer
    from engine.parallel import ParallelDims
    layout = ParallelLayout.build(ParallelDims(**dims)) if world_size > 1 else ParallelLayout.single()
    chunks = build_model_chunks(_config(), layout, seed=None)
    for c in chunks:
        load_full_into(c, state, layout)
    train = TrainConfig(global_batch_size=batch["input_ids"].shape[0], micro_batch_size=1, seq_length=SEQ,
                        train_steps=1)
    optim = OptimizerConfig(weight_decay=0.0, clip_grad=0.0)
    trainer = Trainer(chunks, build_optimizer(chunks, layout, optim, 1e-3), layout, _config(), train,
                      LRSchedule(LRConfig(lr=1e-3, min_lr=1e-3), 1))
    return trainer.train_step(batch).loss


def test_packed_batches_train_alike_on_tp2_pp2_and_cp2(tmp_path):
    """The segment ids reach every pipeline stage, TP rank and context-parallel rank: one packed step's loss
    on TP=2, PP=2 and CP=2 equals one process."""
    from engine.train.batches import DatasetBatches
    from launch.train import PACKED_SFT_KEYS
    indexed = _indexed(tmp_path)
    ds = PackedSFTDataset(indexed, SEQ, seed=0)
    batch = DatasetBatches(ds, 2, 0, PACKED_SFT_KEYS)(0)
    torch.manual_seed(0)
    model = GLMForCausalLM(_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the reference: one forward of the whole model with the segments
        logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                       segment_ids=batch["segment_ids"])
        ref = kernels.cross_entropy(logits, batch["labels"]).item()
    assert _trainer_loss(0, 1, {}, state, batch) == pytest.approx(ref, rel=1e-5)
    for dims in ({"tp": 2}, {"pp": 2}, {"cp": 2}):
        for loss in run_distributed(_trainer_loss, 2, dims, state, batch, timeout=240):
            assert loss == pytest.approx(ref, rel=1e-5), dims  # fp32, another reduction order


def test_launch_train_sft_pack(tmp_path):
    cmd = [sys.executable, "-m", "launch.train", "--mode", "sft", "--pack", "--train-steps", "2",
           "--global-batch-size", "2", "--micro-batch-size", "1", "--seq-length", "128", "--log-dir", str(tmp_path)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(x["loss"]) for x in lines)
    bad = subprocess.run([sys.executable, "-m", "launch.train", "--mode", "rm", "--pack", "--train-steps", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.pack=True must be true or false and packs conversations: mode sft only" \
        in bad.stderr


def test_packing_benchmark_rows():
    from launch.bench_data import bench_packing, format_packing
    (row,) = bench_packing([256])
    # the built-in conversations average ~70 tokens: a padded 256-token row is mostly padding
    assert row["packed_rows"] < row["padded_rows"] and row["packed_real"] > 2 * row["padded_real"]
    assert "| 256 |" in format_packing([row])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_keeps_the_segments(tmp_path, mode):
    """Activation recompute replays the attention with the same segment ids: gradients equal no recompute."""
    _, ds, i = _packed_row(tmp_path)
    item = {k: torch.from_numpy(v)[None] for k, v in ds[i].items()}
    grads = {}
    for recompute in ("none", mode):
        torch.manual_seed(0)
        model = GLMForCausalLM(_config())
        model.set_recompute(recompute)
        logits = model(item["input_ids"], item["attention_mask"], item["position_ids"], segment_ids=item["segment_ids"])
        kernels.cross_entropy(logits, item["labels"], reduction="sum").backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_first_fit_bins_equals_the_plain_first_fit_loop():
    from engine.data.datasets import first_fit_bins
    rng = np.random.default_rng(0)
    for capacity, n in ((64, 300), (7, 50), (100, 1)):
        lengths = rng.integers(0, capacity + 1, n)
        free, want = [], []
        for x in lengths:  # O(n * bins) reference
            b = next((i for i, f in enumerate(free) if f >= x), len(free))
            if b == len(free):
                free.append(capacity)
            free[b] -= x
            want.append(b)
        assert first_fit_bins(lengths, capacity).tolist() == want
    assert first_fit_bins(np.zeros(0, np.int64), 8).tolist() == []
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, capacity=8\], got \[1, 9\]"):
        first_fit_bins(np.array([1, 9]), 8)
