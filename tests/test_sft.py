"""SFT: loss only on assistant tokens, one step equals a manual computation, run_sft end to end."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine.config import GLMConfig
from engine.data.datasets import SFTDataset
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from engine.parallel import ParallelLayout
from engine.train.lr import LRConfig
from engine.train.sft import SFTConfig, build_sft_trainer, global_batches, run_sft
from engine.train.step import OptimizerConfig, TrainConfig
from tests.test_data import TOK  # byte-level stand-in tokenizer with GLM's chat format and loss mask

SEQ = 24


def _config() -> GLMConfig:
    return GLMConfig(vocab_size=TOK.vocab_size, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, num_kv_groups=2, head_dim=8, max_position_embeddings=64, name="sft-test")


def _dataset(tmp_path, n=8, name="chat"):
    prefix = tmp_path / name
    with IndexedDatasetBuilder(prefix, TOK, "chat") as b:
        for i in range(n):
            b.add_document(*TOK.encode_chat([{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"ans {i % 3}"}]))
    return SFTDataset(IndexedDataset(prefix, TOK), SEQ)


def _sft_config(steps=1, log_dir=None):
    return SFTConfig(train=TrainConfig(global_batch_size=4, micro_batch_size=2, seq_length=SEQ, train_steps=steps),
                     optim=OptimizerConfig(weight_decay=0.0, clip_grad=0.0), lr=LRConfig(lr=1e-3, min_lr=1e-4),
                     eval_interval=2, log_dir=log_dir)


def test_labels_only_on_assistant_tokens(tmp_path):
    ds = _dataset(tmp_path)
    batch = next(global_batches(ds, 4, seed=0))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100].tolist()
        # the assistant body "\nans k" and the closing EOS; nothing of the user turn
        assert kept[-1] == TOK.eos_id and bytes(t - 3 for t in kept[1:-1]).decode().startswith("ans ")
        assert TOK.ROLES["user"] not in kept and TOK.ROLES["assistant"] not in kept


def test_one_step_equals_manual(tmp_path):
    ds = _dataset(tmp_path)
    config = _sft_config()
    trainer = build_sft_trainer(_config(), config, ParallelLayout.single())
    model = trainer.chunks[0]
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(global_batches(ds, 4, seed=0))

    # manual: mean CE over non-ignored tokens of the whole batch, then one AdamW step
    manual = type(model)(_config())
    manual.load_state_dict(ref)
    logits = manual(batch["input_ids"], batch["attention_mask"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in manual.named_parameters()}

    seen = {}
    metrics = trainer.train_step(batch, on_grads=lambda t: seen.update(
        {n: p.main_grad.clone() for n, p in model.named_parameters()}))
    assert metrics.loss == pytest.approx(loss.item(), rel=1e-5)
    assert metrics.loss_tokens == int((batch["labels"] != -100).sum())
    for n, g in grads.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-4, atol=1e-6)  # fp32, different summation order
    opt = torch.optim.AdamW(manual.parameters(), lr=config.lr.lr, betas=config.optim.betas,
                            eps=config.optim.eps, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr"] = float(trainer.lr(0))
    opt.step()
    for n, p in manual.named_parameters():
        # Adam's first step is ~lr * sign(g): where |g| is near eps, gradient rounding moves the
        # update by a small fraction of lr (1e-3), so atol = 1% of lr
        torch.testing.assert_close(model.state_dict()[n], p.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.equal(p.detach(), ref[n])


def test_run_sft_writes_metrics_and_eval(tmp_path):
    train, held_out = _dataset(tmp_path, 12, "train"), _dataset(tmp_path, 4, "eval")
    records = run_sft(_config(), _sft_config(steps=4, log_dir=str(tmp_path / "run")), train, held_out)
    assert [("eval_loss" in r) for r in records] == [False, True, False, True]
    assert records[-1]["loss"] < records[0]["loss"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "eval_loss" in json.loads(lines[1])
    with pytest.raises(ValueError, match="fewer than global_batch_size"):
        next(global_batches(held_out, 8, seed=0))


def test_run_yamls_load():
    from pathlib import Path

    from engine.train.reward import RewardConfig, load_reward_run
    from engine.train.sft import load_sft_run
    runs = Path(__file__).resolve().parent.parent / "configs" / "runs"
    model, config = load_sft_run(runs / "sft.yaml")
    assert model.num_layers == 2 and model.hidden_size == 256 and config.train.global_batch_size == 8
    assert config.optim.betas == (0.9, 0.95) and config.eval_interval == 5
    model, reward, optim, lr, log_dir = load_reward_run(runs / "rm.yaml")
    assert isinstance(reward, RewardConfig) and reward.l2_coef == 1e-3 and lr.warmup_steps == 4
    assert log_dir == "runs/rm" and model.name == "tiny"


def test_run_yaml_errors(tmp_path):
    from engine.train.sft import load_sft_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntrain: {global_batch: 4}\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_sft_run(bad)
    bad.write_text("model: tiny\nsurprise: 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_sft_run(bad)
