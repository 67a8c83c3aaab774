"""Reward model: loss/penalty math by hand, learning a synthetic preference rule, TP / SP / DP / ZeRO-1 / PP
parity with the single-process step."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine.config import GLMConfig
from engine.model.glm import GLMForScalarHead
from engine.parallel import ParallelDims, ParallelLayout
from engine.train.lr import LRConfig, LRSchedule
from engine.train.objectives import (RewardObjective, pairwise_ranking_loss, preference_accuracy,
                                     reward_l2_penalty)
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer
from tests._dist import run_distributed

SEQ, VOCAB, BAD = 12, 64, 7  # BAD: the token that marks a rejected answer


def _config() -> GLMConfig:
    return GLMConfig(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                     num_kv_groups=2, head_dim=16, max_position_embeddings=64, name="rm-test")


def _pairs(n: int, seed: int, marks_rejected: bool = True, min_length: int = SEQ - 4) -> dict:
    """Shared random prompt+answer; the rejected answer has the BAD token at a random answer position,
    the chosen one never does (``marks_rejected=False``: the token marks the chosen one instead).
    Right padding of random length in [min_length, SEQ] (same length per pair)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(min_length, SEQ + 1, (n,), generator=g)
    rejected = ids.clone()
    for i in range(n):
        rejected[i, torch.randint(2, int(lengths[i]), (1,), generator=g)] = BAD
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    chosen, rejected = ids * mask, rejected * mask  # pad id 0
    if not marks_rejected:
        chosen, rejected = rejected, chosen
    return {"chosen_input_ids": chosen, "chosen_attention_mask": mask,
            "rejected_input_ids": rejected, "rejected_attention_mask": mask.clone()}


# ---- pure functions ------------------------------------------------------------------------------

def test_ranking_loss_penalty_accuracy_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.5, -2.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5)) + math.log(2.0)) / 3
    assert pairwise_ranking_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)
    # coef * mean(rc^2 + rr^2) = 0.1 * (1 + 0.25 + 8) / 3
    assert reward_l2_penalty(rc, rr, 0.1).item() == pytest.approx(0.1 * 9.25 / 3, rel=1e-6)
    assert preference_accuracy(rc, rr).item() == pytest.approx(1 / 3)  # the tie counts as wrong
    # huge margins stay finite
    assert pairwise_ranking_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item() == pytest.approx(400.0)


def test_penalty_and_ranking_gradients():
    rc = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    rr = torch.tensor([0.5, 0.25, -1.0], requires_grad=True)
    reward_l2_penalty(rc, rr, 0.3).backward()
    torch.testing.assert_close(rc.grad, 2 * 0.3 * rc.detach() / 3)
    torch.testing.assert_close(rr.grad, 2 * 0.3 * rr.detach() / 3)
    rc.grad = rr.grad = None
    pairwise_ranking_loss(rc, rr).backward()
    sig = torch.sigmoid(-(rc.detach() - rr.detach()))
    torch.testing.assert_close(rc.grad, -sig / 3)
    torch.testing.assert_close(rr.grad, sig / 3)


def test_validation_raises():
    with pytest.raises(ValueError, match="same b"):
        pairwise_ranking_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="coef"):
        reward_l2_penalty(torch.zeros(2), torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="l2_coef"):
        RewardObjective(l2_coef=-0.5)


# ---- training ------------------------------------------------------------------------------------

LR = LRConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3)


def _trainer(layout, chunks, train: TrainConfig, l2_coef=1e-3, zero=False, lr=LR, pack=False):
    optim = OptimizerConfig(weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=zero)
    opt = build_optimizer(chunks, layout, optim, lr.lr)
    return Trainer(chunks, opt, layout, chunks[0].config, train, LRSchedule(lr, max(1, train.train_steps)),
                   RewardObjective(l2_coef, pack=pack))


def test_reward_model_learns_preference_rule():
    torch.manual_seed(0)
    model = GLMForScalarHead(_config())
    train = TrainConfig(global_batch_size=16, micro_batch_size=8, seq_length=SEQ, train_steps=40)
    trainer = _trainer(ParallelLayout.single(), [model], train)
    # A random init already scores the marker token consistently higher or lower; point the rule
    # AGAINST that bias so held-out accuracy starts <= 50% and reaching 90% needs learning.
    marks_rejected = trainer.evaluate(_pairs(16, seed=999))["accuracy"] < 0.5
    held_out = _pairs(16, seed=999, marks_rejected=marks_rejected)
    before = trainer.evaluate(held_out)["accuracy"]
    assert before <= 0.5
    records = [trainer.train_step(_pairs(16, seed=s, marks_rejected=marks_rejected)) for s in range(40)]
    after = trainer.evaluate(held_out)
    assert after["accuracy"] >= 0.9, (marks_rejected, before, after)
    assert records[-1].loss < records[0].loss
    assert set(records[0].stats) == set(RewardObjective.stat_names)


def _capture(step, chunks, out):
    def wrapped(*a, **k):
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                out[name] = p.main_grad.detach().clone()
        return step(*a, **k)
    return wrapped


# name, dims, ZeRO-1, sequence parallel, packed pairs (reward.pack)
CASES = (("tp2", dict(tp=2), False, False, False), ("tp2_sp", dict(tp=2), False, True, False),
         ("dp2", dict(dp=2), False, False, False), ("dp2_zero1", dict(dp=2), True, False, False),
         ("pp2", dict(pp=2), False, False, False), ("tp2_sp_packed", dict(tp=2), False, True, True),
         ("dp2_packed", dict(dp=2), False, False, True))


def _parallel_step(rank, world_size, full_state, batch, train):
    """One step per layout: loss, stats and full (gathered) grads."""
    from engine.parallel import CommLedger, comm
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import gather_full_state_dict, load_full_into
    out = {}
    for name, dims, zero, sp, pack in CASES:
        layout = ParallelLayout.build(ParallelDims(**dims), name=name)
        chunks = build_model_chunks(_config(), layout, model_cls=GLMForScalarHead, sequence_parallel=sp, seed=None)
        for chunk in chunks:
            load_full_into(chunk, full_state, layout)
        trainer = _trainer(layout, chunks, dataclasses.replace(train, sequence_parallel=sp), l2_coef=0.01, zero=zero,
                           pack=pack)
        grads = {}
        trainer.optimizer.step = _capture(trainer.optimizer.step, chunks, grads)
        rec = trainer.train_step(batch)
        if zero:  # ZeRO-1 keeps only its reduced shard of each 1/dp-scaled grad: sum the ranks' copies
            for g in grads.values():
                comm.all_reduce(g, layout.dp_group, None, "dp")
        side = dataclasses.replace(layout, ledger=CommLedger())
        full = gather_full_state_dict(grads, _config(), side)
        evaluated = trainer.evaluate(batch)
        # numpy, pickled by value: torch tensors would go through shared memory that dies with the worker
        out[name] = (rec.loss, rec.stats, evaluated, {k: v.numpy() for k, v in full.items()})
        out[("rows", name)] = (sum(mb["input_ids"].shape[0] for mb in trainer.microbatches(batch)[0]), rec.tokens)
    return out


def test_parallel_layouts_match_single_process():
    """TP=2 (plain and sequence parallel), DP=2 (plain and ZeRO-1) and PP=2 (1F1B, the value head on the
    last stage), and packed pairs on TP=2 + SP and DP=2: same loss, stats, held-out metrics and gradients
    as one padded process."""
    torch.manual_seed(1)
    model = GLMForScalarHead(_config())
    full = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _pairs(4, seed=5, min_length=3)  # short pairs: chosen and rejected share a row when packed
    train = TrainConfig(global_batch_size=4, micro_batch_size=1, seq_length=SEQ, train_steps=1)
    trainer = _trainer(ParallelLayout.single(), [model], train, l2_coef=0.01)
    ref_grads = {}
    trainer.optimizer.step = _capture(trainer.optimizer.step, [model], ref_grads)
    ref = trainer.train_step(batch)
    ref_eval = trainer.evaluate(batch)
    results = run_distributed(_parallel_step, 2, full, batch, train, timeout=180)
    for name, dims, _, _, pack in CASES:  # tokens: the rows every DP rank ran (packed: each its own count)
        rows = [r[("rows", name)] for r in results]
        if dims.get("dp"):
            assert all(tokens == sum(n for n, _ in rows) * SEQ for _, tokens in rows), (name, rows)
        if pack:
            assert sum(n for n, _ in rows) < 2 * 4 * (2 if dims.get("tp") else 1), (name, rows)  # pairs shared rows
    results = [{k: v for k, v in r.items() if not (isinstance(k, tuple) and k[0] == "rows")} for r in results]
    for (case, (loss, stats, evaluated, grads)) in (item for r in results for item in r.items()):
        # fp32 with a different reduction order over shards / micro-batches: relative error ~1e-6
        assert loss == pytest.approx(ref.loss, rel=1e-5), case
        assert stats["accuracy"] == ref.stats["accuracy"], case
        for k, v in stats.items():
            assert v == pytest.approx(ref.stats[k], rel=1e-4, abs=1e-6), (case, k)
        for k, v in evaluated.items():
            assert v == pytest.approx(ref_eval[k], rel=1e-4, abs=1e-6), (case, k)
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            g = torch.from_numpy(g)
            err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)).item()
            assert err < 1e-4, (case, name, err)


def test_trainer_on_bucket_balanced_preference_dataset(tmp_path):
    """PreferenceDataset items (collated) feed the trainer; one concatenated forward gives the same
    rewards as scoring chosen and rejected separately."""
    from engine.data.datasets import PreferenceDataset, bucket_balance, collate
    from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from tests.test_data import TOK

    g = torch.Generator().manual_seed(3)
    with IndexedDatasetBuilder(tmp_path / "pref", TOK, "preference") as b:
        for i in range(24):
            prompt = torch.randint(10, 200, (4,), generator=g).tolist()
            good = torch.randint(10, 200, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            bad = torch.randint(10, 200, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            b.add_pair(prompt + good, prompt + bad, 4)
    indexed = IndexedDataset(tmp_path / "pref", TOK)
    full = PreferenceDataset(indexed, 16)
    kept = bucket_balance(full.pair_lengths(), num_buckets=3).kept
    data = PreferenceDataset(indexed, 16, kept)
    assert len(data) >= 4
    batch = collate([data[i] for i in range(4)])

    torch.manual_seed(0)
    model = GLMForScalarHead(dataclasses.replace(_config(), vocab_size=TOK.vocab_size))
    trainer = _trainer(ParallelLayout.single(), [model], TrainConfig(global_batch_size=4, micro_batch_size=4,
                                                                     seq_length=16, train_steps=2))
    mb = trainer.microbatches(batch)[0][0]
    with torch.no_grad():
        rc, rr = trainer.objective.rewards(model.head(model.trunk(mb["input_ids"], mb["attention_mask"]),
                                                      index=mb["output_index"]), mb)
        # fp32; batch composition changes only the GEMM blocking
        torch.testing.assert_close(rc, model.reward(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rr, model.reward(batch["rejected_input_ids"], batch["rejected_attention_mask"]),
                                   rtol=1e-5, atol=1e-6)
    rec = trainer.train_step(batch)
    expected = pairwise_ranking_loss(rc, rr) + reward_l2_penalty(rc, rr, trainer.objective.l2_coef)
    assert rec.loss == pytest.approx(expected.item(), rel=1e-5)
    assert rec.stats["accuracy"] == preference_accuracy(rc, rr).item()
    assert rec.stats["margin"] == pytest.approx((rc - rr).mean().item(), rel=1e-5, abs=1e-7)
    assert 0.0 <= trainer.evaluate(batch)["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="lacks 'rejected_input_ids'"):
        trainer.train_step({k: v for k, v in batch.items() if k != "rejected_input_ids"})


def test_packed_pairs_score_like_padded_rows():
    """reward.pack: each micro-batch's 2b sequences in as few rows as hold them (fewer than 2b here); the
    scores are those of the padded rows (fp32, the same per-sequence ops in other GEMM shapes: 1e-5), and
    so are one step's loss, stats and gradients. Pipeline stages refuse packed pairs (variable rows)."""
    torch.manual_seed(2)
    model = GLMForScalarHead(_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _pairs(8, seed=6, min_length=3)
    train = TrainConfig(global_batch_size=8, micro_batch_size=4, seq_length=SEQ, train_steps=1)
    results = {}
    for pack in (False, True):
        model = GLMForScalarHead(_config())  # a fresh model: each optimizer hooks its parameters
        model.load_state_dict(state)
        trainer = _trainer(ParallelLayout.single(), [model], train, l2_coef=0.01, pack=pack)
        mbs, _ = trainer.microbatches(batch)
        rows = [mb["input_ids"].shape[0] for mb in mbs]
        grads = {}
        trainer.optimizer.step = _capture(trainer.optimizer.step, [model], grads)
        rec = trainer.train_step(batch)
        results[pack] = (rows, rec, grads)
    (padded_rows, ref, ref_grads), (packed_rows, got, got_grads) = results[False], results[True]
    assert padded_rows == [8, 8] and all(r < 8 for r in packed_rows), packed_rows
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    for k, v in got.stats.items():
        assert v == pytest.approx(ref.stats[k], rel=1e-4, abs=1e-6), k
    for name, g in got_grads.items():
        err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, (name, err)
    mb = RewardObjective(pack=True).model_inputs({k: v[:4] for k, v in batch.items()})
    from engine.parallel.pipeline import chunk_forward
    with torch.no_grad():
        scores = chunk_forward(model, mb["input_ids"], None, mb["attention_mask"], mb["position_ids"],
                               mb["segment_ids"], mb["output_index"])
        rc = model.reward(batch["chosen_input_ids"][:4], batch["chosen_attention_mask"][:4])
        rr = model.reward(batch["rejected_input_ids"][:4], batch["rejected_attention_mask"][:4])
    torch.testing.assert_close(scores, torch.cat([rc, rr]), rtol=1e-5, atol=1e-6)
    empty = {k: v[:2].clone() for k, v in batch.items()}
    empty["rejected_attention_mask"][1] = 0
    with pytest.raises(ValueError, match="preference pair 1: its rejected sequence has no token"):
        RewardObjective(pack=True).model_inputs(empty)


def test_packed_pairs_need_one_pipeline_stage():
    from tests._dist import run_distributed
    assert all(run_distributed(_packed_on_pipeline, 2, timeout=120))


def _packed_on_pipeline(rank, world_size):
    from engine.parallel.pipeline import build_model_chunks
    layout = ParallelLayout.build(ParallelDims(pp=2))
    chunks = build_model_chunks(_config(), layout, model_cls=GLMForScalarHead)
    trainer = _trainer(layout, chunks, TrainConfig(global_batch_size=4, micro_batch_size=2, seq_length=SEQ,
                                                   train_steps=1), pack=True)
    with pytest.raises(ValueError, match="pipeline stages exchange fixed activations of micro_batch_size x 2 = 4 rows"):
        trainer.train_step(_pairs(4, seed=1, min_length=3))
    return True
