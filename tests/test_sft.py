"""SFT: loss only on assistant tokens, one step equals a manual computation, launch.train's sft mode end to
end on a user dataset with a held-out file, run YAMLs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from engine.config import GLMConfig
from engine.data.datasets import SFTDataset
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from engine.parallel import ParallelLayout
from engine.train.batches import DatasetBatches
from engine.train.lr import LRConfig, LRSchedule
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer
from launch.train import DataConfig, RunConfig, load_run_config, validate_run
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


KEYS = ("input_ids", "labels", "attention_mask")
TRAIN = TrainConfig(global_batch_size=4, micro_batch_size=2, seq_length=SEQ, train_steps=1)
OPTIM = OptimizerConfig(weight_decay=0.0, clip_grad=0.0)
LR = LRConfig(lr=1e-3, min_lr=1e-4)


def _trainer():
    from engine.model.glm import GLMForCausalLM
    torch.manual_seed(0)
    model = GLMForCausalLM(_config())
    layout = ParallelLayout.single()
    return Trainer([model], build_optimizer([model], layout, OPTIM, LR.lr), layout, _config(), TRAIN,
                   LRSchedule(LR, 1))


def test_labels_only_on_assistant_tokens(tmp_path):
    ds = _dataset(tmp_path)
    batch = DatasetBatches(ds, 4, 0, KEYS)(0)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100].tolist()
        # the assistant body "\nans k" and the closing EOS; nothing of the user turn
        assert kept[-1] == TOK.eos_id and bytes(t - 3 for t in kept[1:-1]).decode().startswith("ans ")
        assert TOK.ROLES["user"] not in kept and TOK.ROLES["assistant"] not in kept


def test_one_step_equals_manual(tmp_path):
    ds = _dataset(tmp_path)
    trainer = _trainer()
    model = trainer.chunks[0]
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    batch = DatasetBatches(ds, 4, 0, KEYS)(0)

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
    opt = torch.optim.AdamW(manual.parameters(), lr=LR.lr, betas=OPTIM.betas, eps=OPTIM.eps, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr"] = float(trainer.lr(0))
    opt.step()
    for n, p in manual.named_parameters():
        # Adam's first step is ~lr * sign(g): where |g| is near eps, gradient rounding moves the
        # update by a small fraction of lr (1e-3), so atol = 1% of lr
        torch.testing.assert_close(model.state_dict()[n], p.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.equal(p.detach(), ref[n])


def test_sft_mode_with_held_out_file(tmp_path):
    """launch.train in sft mode on a user chat dataset with a separate held-out file: eval_loss on the
    evaluation steps (every 2 and the last), loss going down, metrics.jsonl written."""
    from launch.train import train
    _dataset(tmp_path, 12, "train"), _dataset(tmp_path, 4, "eval")
    run = RunConfig(model=_config(), mode="sft", train=dataclasses.replace(TRAIN, train_steps=4, eval_interval=2),
                    optim=OPTIM, lr=LR, data=DataConfig(path=str(tmp_path / "train"), eval_path=str(tmp_path / "eval")),
                    log_dir=str(tmp_path / "run"))
    validate_run(run, 1)
    assert train(run) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_loss" in d) for d in lines] == [False, True, False, True]
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["eval_loss"] < lines[1]["eval_loss"]
    with pytest.raises(ValueError, match="fewer than global_batch_size=8"):
        DatasetBatches(_dataset(tmp_path, 4, "small"), 8, 0, KEYS)


def test_run_yamls_load():
    from pathlib import Path
    runs = Path(__file__).resolve().parent.parent / "configs" / "runs"
    sft = load_run_config(runs / "sft.yaml")
    assert sft.mode == "sft" and sft.model.name == "tiny" and sft.train.global_batch_size == 8
    assert sft.optim.betas == (0.9, 0.95) and sft.train.eval_interval == 25 and sft.data.eval_fraction == 0.1
    rm = load_run_config(runs / "rm.yaml")
    assert rm.mode == "rm" and rm.reward.l2_coef == 1e-3 and rm.lr.warmup_steps == 4 and rm.log_dir == "runs/rm"
    assert rm.data.balance_buckets == 4
    assert load_run_config(runs / "pretrain.yaml").mode == "pretrain"
    for run in (sft, rm):
        validate_run(run, 1)


@pytest.mark.parametrize("text, needle", [
    ("model: tiny\ntrain: {global_batch: 4}\n", "unknown field"),
    ("model: tiny\nsurprise: 1\n", "unknown section"),
    ("mode: ppo\n", "mode='ppo' must be one of"),
    ("reward: {l2_coef: -1}\n", "l2_coef=-1 must be >= 0"),
    ("mode: dpo\ndpo: {beta: 0}\n", "dpo.beta=0 must be > 0"),
])
def test_run_yaml_errors(tmp_path, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_run_config(bad)


@pytest.mark.parametrize("overrides, needle", [
    ({"data": {"eval_fraction": 1.0}}, "eval_fraction=1.0 must be in"),
    ({"data": {"eval_fraction": 0.1, "eval_path": "x"}}, "not both"),
    ({"mode": "sft", "data": {"balance_buckets": 3}}, r"for preference pairs \(mode rm or dpo\) only"),
    ({"data": {"path": "x", "eval_fraction": 0.1}}, "pass data.eval_path"),
    ({"train": {"eval_batches": 0}}, "eval_batches=0 must be a positive integer"),
])
def test_run_validation_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        validate_run(load_run_config(None, overrides), 1)


def test_logits_only_where_labels_take_loss():
    """The language-model objective has the head compute logits only at positions whose label takes loss
    (SFT: assistant tokens; ``output_index``): the same loss and gradients as the full logits with a masked
    loss (fp32, the same per-row ops: 1e-6), and the activations held for backward shrink by at least the
    skipped positions' fp32 log-softmax, [positions, vocab]."""
    from engine.model.glm import GLMForCausalLM
    from engine.parallel.pipeline import chunk_forward
    from engine.train.metrics import SavedActivationMeter
    from engine.train.objectives import LanguageModelObjective
    config = _config()
    torch.manual_seed(0)
    model = GLMForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    labels = torch.randint(0, config.vocab_size, (2, 16))
    labels[0, :10] = labels[1, :6] = -100  # prompt tokens: 16 of 32 take no loss
    objective = LanguageModelObjective()
    mb = objective.model_inputs({"input_ids": ids, "labels": labels})
    assert mb["output_index"].numel() == 16

    def run(index):
        model.zero_grad()
        with SavedActivationMeter(exclude=list(model.parameters())) as meter:
            out = chunk_forward(model, ids, None, output_index=index)
            if index is None:
                loss = F.cross_entropy(out.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            else:
                loss, _ = objective.loss_and_stats(out, mb, ParallelLayout.single(), "torch")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, meter.peak

    full_loss, full_grads, full_bytes = run(None)
    loss, grads, selected_bytes = run(mb["output_index"])
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, full_grads[n], rtol=1e-6, atol=1e-7)
    assert full_bytes - selected_bytes >= 16 * config.vocab_size * 4, (full_bytes, selected_bytes)
