"""DPO (engine.train.objectives.DPOObjective, launch.train --mode dpo): the loss by hand, the objective's loss and
logit gradients against an fp64 autograd reference, the preference dataset's answer labels, the reference
log-probs of a batch on TP / PP / DP layouts equal to one process's (and the first step's loss is log 2: policy =
reference), and the launcher."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.parallel import ParallelDims, ParallelLayout
from engine.train.lr import LRConfig, LRSchedule
from engine.train.objectives import IGNORE_INDEX, DPOObjective, dpo_loss, simpo_loss
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer
from tests._dist import run_distributed

SEQ, VOCAB = 12, 64
LR = LRConfig(lr=1e-3, min_lr=1e-3)


def _config() -> GLMConfig:
    return GLMConfig(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                     num_kv_groups=2, head_dim=8, max_position_embeddings=64, name="dpo-test")


def _pairs(n: int, seed: int) -> dict:
    """Random pairs sharing a prompt of 3-5 tokens, answers of different lengths; labels as PreferenceDataset
    makes them (the answer tokens, each at the position that predicts it)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    prompt_length = torch.randint(3, 6, (n,), generator=g)
    prompt = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
        length = torch.randint(7, SEQ + 1, (n,), generator=g)
        positions = torch.arange(SEQ)[None]
        ids = torch.where(positions < prompt_length[:, None], prompt, ids)
        mask = (positions < length[:, None]).long()
        ids = ids * mask
        labels = torch.full((n, SEQ), IGNORE_INDEX)
        for i in range(n):
            p, m = int(prompt_length[i]), int(length[i])
            labels[i, p - 1:m - 1] = ids[i, p:m]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


def _trainer(layout, chunks, train: TrainConfig, beta=0.1) -> Trainer:
    optim = OptimizerConfig(weight_decay=0.0, clip_grad=0.0)
    return Trainer(chunks, build_optimizer(chunks, layout, optim, LR.lr), layout, _config(), train,
                   LRSchedule(LR, max(1, train.train_steps)), DPOObjective(beta=beta))


# ---- the math --------------------------------------------------------------------------------------------
def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -3.0])
    loss, rc, rr = dpo_loss(chosen - ref_c, rejected - ref_r, beta=0.5)
    # margins: 0.5 * ((0.5) - (-1)) = 0.75 ; 0.5 * (0 - 1) = -0.5
    expected = [math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.5))]
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert rc.tolist() == [0.25, 0.0] and rr.tolist() == [-0.5, 0.5]
    smooth, _, _ = dpo_loss(chosen - ref_c, rejected - ref_r, beta=0.5, label_smoothing=0.2)
    want = [0.8 * math.log1p(math.exp(-m)) + 0.2 * math.log1p(math.exp(m)) for m in (0.75, -0.5)]
    torch.testing.assert_close(smooth, torch.tensor(want))
    # IPO: (h - 1 / (2 beta))^2 on the log-ratio margin h = 1.5, -1 (beta = 0.5: the target margin is 1)
    ipo, _, _ = dpo_loss(chosen - ref_c, rejected - ref_r, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([0.25, 4.0]))
    # SLiC's hinge: max(0, 1 - beta h) = max(0, 0.25), max(0, 1.5)
    hinge, _, _ = dpo_loss(chosen - ref_c, rejected - ref_r, beta=0.5, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.25, 1.5]))
    hinge, _, _ = dpo_loss(chosen - ref_c, rejected - ref_r, beta=2.0, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 3.0]))  # a margin past 1 / beta costs nothing
    # SimPO: -log sigmoid(beta (mean_c - mean_r) - gamma) on mean log-probs, no reference
    simpo, rc, rr = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=2.0, gamma=0.5)
    torch.testing.assert_close(simpo, torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(2.5))]))
    assert rc.tolist() == [-2.0, -4.0] and rr.tolist() == [-3.0, -2.0]
    assert not DPOObjective(loss_type="simpo").uses_reference and DPOObjective(loss_type="ipo").uses_reference
    assert "ref_chosen_logprobs" not in DPOObjective(loss_type="simpo").batch_keys
    for kwargs, needle in [(dict(beta=0.0), "dpo.beta=0.0 must be > 0"),
                           (dict(gamma=1.0), "dpo.gamma=1.0 is SimPO's target margin"),
                           (dict(loss_type="simpo", offload_reference=True), "needs a reference"),
                           (dict(gamma=-1.0, loss_type="simpo"), "dpo.gamma=-1.0 is SimPO's target margin"),
                           (dict(label_smoothing=0.5), r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
                           (dict(loss_type="kto"),
                            r"dpo.loss_type='kto' must be one of \('sigmoid', 'ipo', 'hinge', 'simpo'\)"),
                           (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing=0.1 is conservative DPO")]:
        with pytest.raises(ValueError, match=needle):
            DPOObjective(**kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_objective_loss_and_gradients_match_fp64_autograd(loss_type):
    """Through model_inputs: logits at the answer positions only; the summed answer log-probs minus the
    reference's, the loss and stats, and the logits' gradient equal fp64 torch (log_softmax, gather)."""
    batch = _pairs(3, seed=1)
    g = torch.Generator().manual_seed(2)
    batch["ref_chosen_logprobs"] = torch.where(batch["chosen_labels"] != IGNORE_INDEX,
                                               -torch.rand(3, SEQ, generator=g), torch.zeros(()))
    batch["ref_rejected_logprobs"] = torch.where(batch["rejected_labels"] != IGNORE_INDEX,
                                                 -torch.rand(3, SEQ, generator=g), torch.zeros(()))
    objective = DPOObjective(beta=0.3, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, loss_type=loss_type,
                             gamma=0.2 if loss_type == "simpo" else 0.0)
    if loss_type == "simpo":  # reference-free: the batch carries no reference log-probs
        batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    mb = objective.model_inputs(batch)
    labels = mb["labels"]
    assert mb["output_index"].tolist() == torch.nonzero((labels != IGNORE_INDEX).flatten()).flatten().tolist()
    logits = torch.randn(mb["output_index"].numel(), VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
    loss, stats = objective.loss_and_stats(logits, mb, ParallelLayout.single(), "torch")
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    token = torch.log_softmax(ref_logits, -1).gather(1, labels.flatten()[mb["output_index"]][:, None])[:, 0]
    rows = mb["output_index"] // SEQ
    sums = torch.zeros(6, dtype=torch.float64).index_add(0, rows, token)
    if loss_type == "simpo":  # mean log-prob per answer token, no reference
        means = sums / (labels != IGNORE_INDEX).sum(1)
        margin = 0.3 * (means[:3] - means[3:])
    else:
        ref = mb["ref_logprobs"].double().sum(1)
        margin = 0.3 * ((sums[:3] - ref[:3]) - (sums[3:] - ref[3:]))
    expected = {"sigmoid": -0.9 * torch.nn.functional.logsigmoid(margin) - 0.1 * torch.nn.functional.logsigmoid(-margin),
                "ipo": (margin / 0.3 - 1 / 0.6) ** 2, "hinge": torch.relu(1 - margin),
                "simpo": -torch.nn.functional.logsigmoid(margin - 0.2)}[loss_type].sum()
    expected.backward()
    # fp32 math on fp64 inputs: ~1e-7 relative
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert stats[0].item() == pytest.approx(float((margin > 0).sum()))  # accuracy, summed over pairs
    assert stats[1].item() == pytest.approx(margin.sum().item(), rel=1e-5)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["rejected_labels"][1] = IGNORE_INDEX
    with pytest.raises(ValueError, match="preference pair 1: its rejected answer has no token to score"):
        objective.model_inputs(empty)


def test_preference_dataset_labels_are_the_answer_tokens():
    from engine.data.builtin import builtin_dataset
    from engine.data.datasets import PreferenceDataset
    from engine.data.indexed_dataset import IndexedDataset
    from engine.data.tokenizer import default_tokenizer
    tokenizer = default_tokenizer()
    dataset = PreferenceDataset(IndexedDataset(builtin_dataset("preference", tokenizer, None), tokenizer), 64)
    for i in range(3):
        item = dataset[i]
        p = int(item["prompt_length"])
        for side in ("chosen", "rejected"):
            ids, labels, m = item[f"{side}_input_ids"], item[f"{side}_labels"], int(item[f"{side}_length"])
            assert (labels[:p - 1] == IGNORE_INDEX).all() and (labels[m - 1:] == IGNORE_INDEX).all()
            assert (labels[p - 1:m - 1] == ids[p:m]).all() and m > p


# ---- layouts ---------------------------------------------------------------------------------------------
CASES = [("tp2", dict(tp=2)), ("pp2", dict(pp=2)), ("dp2", dict(dp=2))]


def _single_run(state, batch, train):
    """One process: the reference's log-probs of the batch, then two steps' losses and stats."""
    policy = GLMForCausalLM(_config(), init=False)
    policy.load_state_dict(state)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    trainer = _trainer(ParallelLayout.single(), [policy], train)
    ref = trainer.objective.reference_logprobs(trainer, [reference], batch)
    records = [trainer.train_step({**batch, **ref}) for _ in range(2)]
    return ref, [(r.loss, r.stats) for r in records]


def _layout_runs(rank, world_size, state, batch, train):
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import load_full_into
    out = {}
    for name, dims in CASES:
        layout = ParallelLayout.build(ParallelDims(**dims), name=name)
        models = []
        for _ in range(2):  # the policy and the reference
            chunks = build_model_chunks(_config(), layout, model_cls=GLMForCausalLM, seed=None)
            for chunk in chunks:
                load_full_into(chunk, state, layout)
            models.append(chunks)
        trainer = _trainer(layout, models[0], train)
        ref = trainer.objective.reference_logprobs(trainer, models[1], batch)
        records = [trainer.train_step({**batch, **ref}) for _ in range(2)]
        out[name] = ({k: v.numpy() for k, v in ref.items()}, [(r.loss, r.stats) for r in records])
    return out


def test_reference_logprobs_and_steps_on_tp_pp_dp_match_one_process():
    """The reference's per-token log-probs of a batch and two DPO steps on TP=2, PP=2 and DP=2 equal one
    process's; the first step's loss is log 2 (the policy is the reference: every margin is 0)."""
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in GLMForCausalLM(_config()).state_dict().items()}
    batch = _pairs(4, seed=4)
    train = TrainConfig(global_batch_size=4, micro_batch_size=1, seq_length=SEQ, train_steps=2)
    ref, steps = _single_run(state, batch, train)
    answers = batch["chosen_labels"] != IGNORE_INDEX
    assert (ref["ref_chosen_logprobs"][answers] < 0).all() and (ref["ref_chosen_logprobs"][~answers] == 0).all()
    assert steps[0][0] == pytest.approx(math.log(2), abs=1e-5) and steps[1][0] < steps[0][0]
    for result in run_distributed(_layout_runs, 2, state, batch, train, timeout=240):
        for name, _ in CASES:
            got_ref, got_steps = result[name]
            for key, value in got_ref.items():  # fp32 forwards of other shapes: ~1e-6
                torch.testing.assert_close(torch.from_numpy(value), ref[key], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{name} {key}: {m}")
            for (loss, stats), (want_loss, want_stats) in zip(got_steps, steps):
                assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-6), name
                for k in ("margin", "chosen_reward", "rejected_reward"):
                    assert stats[k] == pytest.approx(want_stats[k], rel=1e-3, abs=1e-5), (name, k)


# ---- launcher --------------------------------------------------------------------------------------------
def test_launcher_runs_dpo_from_an_sft_checkpoint(tmp_path, capsys):
    """launch.train --mode dpo from a (random) SFT checkpoint on the built-in preference pairs: the first step's
    loss is exactly log 2 (fp32; bf16 with --dpo-loss ipo: exactly IPO's 1 / (2 beta)^2, the reference computing in
    the policy's dtype); the second step's
    margins scale with --dpo-beta (Adam's first step does not depend on the gradient's scale) and are not 0 (the
    reference stays frozen); resuming against another reference is refused; --init-from is required, cp refused,
    and a seq_length that cuts every answer off is refused."""
    from engine.train.checkpoint import save_checkpoint
    from launch.train import load_run_config, main, validate_run
    root = Path(__file__).resolve().parent.parent
    preset = str(root / "configs" / "runs" / "dpo.yaml")
    assert main(["--mode", "dpo", "--config", preset]) == 2
    assert "mode dpo needs --init-from DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"dpo scores whole sequences \(use cp=1\)"):
        validate_run(load_run_config(preset, {"checkpoint": {"init_from": "x"}, "parallel": {"cp": 2}}), 2)
    config = GLMConfig.preset("tiny").replace(num_layers=2)
    (tmp_path / "model.yaml").write_text("preset: tiny\nnum_layers: 2\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))

    def run(name, *flags):
        cmd = [sys.executable, "-m", "launch.train", "--config", preset, "--model", str(tmp_path / "model.yaml"),
               "--init-from", str(tmp_path / "sft"), "--train-steps", "2", "--seq-length", "64", "--eval-interval",
               "2", "--log-dir", str(tmp_path / name), *flags]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines() if proc.returncode == 0 else []
        return proc, [json.loads(x) for x in lines]

    proc, (first, second) = run("beta2", "--dpo-beta", "0.2", "--save", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dpo GLMForCausalLM" in proc.stdout and "sigmoid loss, beta 0.2, frozen reference from --init-from" in proc.stdout
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["accuracy"] == 0.0  # margins exactly 0
    assert abs(second["margin"]) > 1e-4 and 0 <= second["eval_accuracy"] <= 1
    assert first["reference_s"] > 0 and second["reference_s"] > 0  # the reference forward, outside tokens_per_s
    # the reference in host memory between its forwards: the same numbers
    proc, offloaded = run("offload", "--dpo-beta", "0.2", "--offload-reference")
    assert "frozen reference from --init-from, in host memory between its forwards" in proc.stdout
    numbers = ("loss", "grad_norm", "accuracy", "margin", "chosen_reward", "rejected_reward", "eval_loss",
               "eval_accuracy")
    for got, want in zip(offloaded, (first, second)):
        assert {k: got.get(k) for k in numbers} == {k: want.get(k) for k in numbers}
    _, (_, doubled) = run("beta4", "--dpo-beta", "0.4")
    assert doubled["margin"] == pytest.approx(2 * second["margin"], rel=1e-2)
    # bf16 with IPO's loss: margins exactly 0 at the first step give (0 - 1 / (2 x 0.1))^2 = 25
    proc, (bf16, _) = run("bf16", "--mixed-precision", "bf16", "--dpo-loss", "ipo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert bf16["loss"] == pytest.approx(25.0, abs=1e-4)
    proc, _ = run("resumed", "--load", str(tmp_path / "ck"), "--train-steps", "3", "--init-from", str(tmp_path / "ck"))
    assert proc.returncode == 2 and "a dpo run against another reference than --init-from" in proc.stderr
    # SimPO: no reference model is built; its first step is not log 2 (the rewards are mean log-probs, not 0)
    proc, (first, _) = run("simpo", "--dpo-loss", "simpo", "--dpo-beta", "2.0", "--dpo-gamma", "1.0", "--save",
                           str(tmp_path / "simpo_ck"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "simpo loss, beta 2.0, no reference model" in proc.stdout
    assert math.isfinite(first["loss"]) and abs(first["loss"] - math.log(2)) > 1e-3 and abs(first["margin"]) > 1e-3
    assert "reference_s" not in first
    # a resume keeps the loss: a simpo checkpoint does not continue as DPO (nor would DPO's as simpo)
    proc, _ = run("simpo_as_dpo", "--load", str(tmp_path / "simpo_ck"), "--train-steps", "3")
    assert proc.returncode == 2 and "is a dpo run with loss_type simpo; this run asks for sigmoid" in proc.stderr
    # simpo needs --init-from only to start (no reference): a resume may leave it out, DPO's may not
    resume = {"checkpoint": {"load": str(tmp_path / "simpo_ck"), "init_from": None}}
    validate_run(load_run_config(preset, {**resume, "dpo": {"loss_type": "simpo", "beta": 2.0}}), 1)
    with pytest.raises(ValueError, match="mode dpo needs --init-from DIR"):
        validate_run(load_run_config(preset, resume), 1)
    # ... but when --load finds nothing (the --load D --save D pattern) a simpo run without --init-from is refused
    # rather than trained from random weights
    fresh = [sys.executable, "-m", "launch.train", "--config", preset, "--model", str(tmp_path / "model.yaml"),
             "--train-steps", "1", "--seq-length", "64", "--dpo-loss", "simpo", "--dpo-beta", "2", "--log-dir",
             str(tmp_path / "fresh"), "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "empty")]
    proc = subprocess.run(fresh, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "mode dpo needs --init-from DIR to start" in proc.stderr, proc.stderr
    proc, _ = run("cut", "--seq-length", "8")
    assert proc.returncode == 2 and "seq_length=8 cuts off an answer of every training pair" in proc.stderr



def test_resume_checks_the_mode_the_loss_and_the_reference():
    """check_resumed: a dpo checkpoint continues with its own loss type and reference; one from before the loss
    was saved (a reference, no dpo_loss) resumes with any loss that has a reference, not as simpo."""
    from engine.train.checkpoint import CheckpointError
    from launch.train import check_resumed, load_run_config
    preset = str(Path(__file__).resolve().parent.parent / "configs" / "runs" / "dpo.yaml")

    def run(loss: str):
        return load_run_config(preset, {"checkpoint": {"load": "ck", "init_from": "sft"}, "dpo": {"loss_type": loss}})
    check_resumed({"mode": "dpo", "dpo_loss": "ipo", "reference": "a"}, run("ipo"), "a")
    check_resumed({"mode": "dpo", "dpo_loss": "simpo"}, run("simpo"), None)
    for loss in ("sigmoid", "ipo", "hinge"):  # an older checkpoint: its loss is unknown, its reference is checked
        check_resumed({"mode": "dpo", "reference": "a"}, run(loss), "a")
    for extra, loss, ref, needle in [
            ({"mode": "sft"}, "sigmoid", "a", "holds a sft run; this run is dpo"),
            ({"mode": "dpo", "dpo_loss": "ipo", "reference": "a"}, "sigmoid", "a", "loss_type ipo; this run asks for sigmoid"),
            ({"mode": "dpo", "reference": "a"}, "simpo", None, "is a dpo run against a reference; this run asks for simpo"),
            ({"mode": "dpo", "dpo_loss": "sigmoid", "reference": "a"}, "sigmoid", "b", "against another reference")]:
        with pytest.raises(CheckpointError, match=needle):
            check_resumed(extra, run(loss), ref)

def test_answers_fit_counts_pairs_with_an_answer_token_in_the_window():
    from engine.data.builtin import builtin_dataset
    from engine.data.datasets import PreferenceDataset
    from engine.data.indexed_dataset import IndexedDataset
    from engine.data.tokenizer import default_tokenizer
    tokenizer = default_tokenizer()
    indexed = IndexedDataset(builtin_dataset("preference", tokenizer, None), tokenizer)
    for window in (20, 64):
        dataset = PreferenceDataset(indexed, window)
        fits = dataset.answers_fit()
        for i in range(len(dataset)):
            chosen, rejected, p = indexed.get_pair(i)
            assert fits[i] == (min(len(chosen), window) > p and min(len(rejected), window) > p), (window, i)
        assert fits.any() and (window == 64) == fits.all()
