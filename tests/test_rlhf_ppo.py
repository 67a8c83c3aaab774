"""The PPO loop: objectives on the Trainer equal the core math, the behaviour log-probs of the rollout
equal the training forward's, the ChatGLM-RLHF options (reference baseline, reward-spread filter,
PPO-ptx) do what they say, TP generation equals single-process generation, the update is layout
independent (TP=2, DP=2 vs one process), and launch.rlhf's errors are clear."""
import copy
import dataclasses
import json
import math

import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM, GLMForScalarHead
from engine.parallel import ParallelDims, ParallelLayout
from engine.rlhf.core import ppo_policy_loss
from engine.rlhf.ppo import PPOConfig, PPOLoop, align, left_pad_prompts
from engine.train.lr import LRConfig
from engine.train.objectives import LanguageModelObjective
from engine.train.step import OptimizerConfig
from tests._dist import run_distributed

VOCAB, EOS, PAD = 64, 2, 0
CP_NEW_TOKENS = 8  # prompt 8 + response 8 tokens: divisible by 2 x cp = 4
OPTIM = OptimizerConfig(weight_decay=0.0, clip_grad=0.0)
LR = LRConfig(lr=1e-3, min_lr=1e-3)


def _config() -> GLMConfig:
    # 4 layers: pp = 2 x vpp = 2 gives every virtual stage one
    return GLMConfig(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=4,
                     num_kv_groups=2, head_dim=8, max_position_embeddings=64, name="ppo-test",
                     pad_token_id=PAD, eos_token_id=[EOS])


def _prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _ppo(**kw) -> PPOConfig:
    base = dict(iterations=2, rollout_prompts=4, samples_per_prompt=2, max_prompt_length=8, max_new_tokens=6,
                mini_batch_size=4, micro_batch_size=2, kl_coef=0.1, min_reward_spread=0.0, seed=7)
    return PPOConfig(**{**base, **kw})


def _models(seed=0):
    torch.manual_seed(seed)
    actor, critic = GLMForCausalLM(_config()), GLMForScalarHead(_config())
    reward = GLMForScalarHead(_config())
    return actor, critic, copy.deepcopy(actor), reward


def _loop(config=None, layout=None, models=None, ptx=None) -> PPOLoop:
    actor, critic, reference, reward = models or _models()
    return PPOLoop(config or _ppo(), _config(), layout or ParallelLayout.single(), actor, critic, reference, reward,
                   _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR, ptx_batches=ptx)


# ---- pieces ------------------------------------------------------------------------------------
def test_left_pad_and_align():
    ids, mask = left_pad_prompts([[5, 6], [7, 8, 9]], 4, PAD)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]] and mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="prompt 0 has 3 tokens, more than max_prompt_length=2"):
        left_pad_prompts([[1, 2, 3]], 2, PAD)
    # response token j (position P + j) is predicted at position P + j - 1
    assert align(torch.tensor([[1.0, 2.0, 3.0]]), 4, 0.0).tolist() == [[0, 0, 0, 1, 2, 3, 0]]


def test_rollout_logprobs_match_the_training_forward_and_the_first_ratio_is_one():
    """One mini-batch holding the whole rollout: the policy objective's log-probs of the unchanged
    actor equal the rollout's behaviour log-probs, so ratio = 1, no clipping and approx_kl = 0; the
    loss equals the core function on the response tokens."""
    loop = _loop(_ppo(mini_batch_size=8, micro_batch_size=4, iterations=1))
    rollout, _ = loop.rollout(0)
    batch, stats = loop.advantages(rollout)
    assert stats["kept_fraction"] == 1.0 and stats["kl"] == pytest.approx(0.0, abs=1e-5)  # actor == reference
    mask = rollout.response_mask.bool()
    P = loop.config.max_prompt_length
    assert torch.equal(batch["labels"][:, P - 1:-1][mask], rollout.responses[mask])
    logits = loop.actor[0](rollout.sequences, rollout.attention_mask)[:, P - 1:-1]
    fresh = kernels.token_logprobs(logits, rollout.responses)
    torch.testing.assert_close(fresh[mask], rollout.logprobs[mask], rtol=0, atol=1e-5)  # fp32, other batch rows
    expected, _ = ppo_policy_loss(fresh, rollout.logprobs, batch["advantages"][:, P - 1:-1], mask, 0.2)
    update = loop.update(batch, 0)
    assert update["ppo_steps"] == 1 and update["clipfrac"] == 0.0 and update["approx_kl"] < 1e-8
    assert update["policy_loss"] == pytest.approx(expected.item(), abs=1e-6)


def test_sampler_logprobs_match_the_training_forward_and_a_stale_sampling_copy_shows(monkeypatch):
    """The sampling copy's log-probs of its tokens (KV-cache decoding) equal the training forward's; a copy
    whose weights differ from the trained ones (stale or wrongly synchronised) shows in the metrics."""
    # many stop tokens: responses of several lengths, so that the padding after them is checked too
    loop = PPOLoop(_ppo(iterations=1), _config(), ParallelLayout.single(), *_models(), _prompts(), list(range(2, 24)),
                   PAD, OPTIM, OPTIM, LR, LR)
    rollout, _ = loop.rollout(0)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.sampler_logprobs[mask], rollout.logprobs[mask], rtol=0, atol=1e-5)  # fp32
    assert (rollout.sampler_logprobs[~mask] == 0).all() and mask.any() and not mask.all()
    _, stats = loop.advantages(rollout)
    assert stats["rollout_logprob_diff_max"] < 1e-4 and stats["rollout_kl"] < 1e-8
    assert "rollout_is_truncated" not in stats  # no correction asked for
    stale = copy.deepcopy(loop.actor[0])
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    sample = loop._generate_rows
    monkeypatch.setattr(loop, "_generate_rows", lambda model, *args: sample(stale, *args))
    _, stats = loop.advantages(loop.rollout(1)[0])
    assert stats["rollout_logprob_diff_max"] > 0.05 and stats["rollout_kl"] > 1e-4, stats


@pytest.mark.parametrize("cap,level,mode,weight,capped", [
    (3.0, "token", "truncate", 2.0, 0.0), (1.5, "token", "truncate", 1.5, 1.0),
    (3.0, "geometric", "truncate", 2.0, 0.0), (3.0, "sequence", "truncate", 3.0, 1.0),
    (3.0, "token", "mask", 2.0, 0.0), (1.5, "token", "mask", 0.0, 1.0)])  # mask: 2 outside [1/1.5, 1.5] trains nothing
def test_truncated_importance_weights_scale_the_policy_loss_only(cap, level, mode, weight, capped):
    """A sampler that gave every token half the training forward's probability: each token's policy loss is
    weighted by min(ratio, cap), 2 per token and per geometric mean, 2^6 per (6-token) response, so the actor's
    loss and gradient norm scale by that factor and nothing else changes (one mini-batch holding the rollout,
    the same starting weights)."""
    # advantages not whitened: whitened ones sum to 0 over the batch, and so would the loss at ratio 1
    config = _ppo(rollout_is_cap=cap, rollout_is_level=level, rollout_is_mode=mode, iterations=1, mini_batch_size=8,
                  whiten_advantages=False)
    states, loop, rollout, _ = _one_process(seed=3, config=config)
    half = dataclasses.replace(rollout, sampler_logprobs=rollout.logprobs - math.log(2))
    batch, stats = loop.advantages(half)
    trained = batch["labels"] != -100
    assert torch.allclose(batch["rollout_is_weights"][trained], torch.tensor(weight), rtol=1e-5)
    assert (batch["rollout_is_weights"][~trained] == 0).all()
    assert (batch["attention_mask"][:, -6:] == 1).all()  # every response runs to max_new_tokens = 6
    assert stats["rollout_is_truncated"] == capped
    plain = _loop(dataclasses.replace(config, rollout_is_cap=0.0), models=_models(seed=3))
    plain_batch, _ = plain.advantages(half)
    assert "rollout_is_weights" not in plain_batch
    a, b = loop.update(batch, 0), plain.update(plain_batch, 0)
    assert a["policy_loss"] == pytest.approx(weight * b["policy_loss"], rel=1e-5)
    assert a["actor_grad_norm"] == pytest.approx(weight * b["actor_grad_norm"], rel=1e-5)
    for key in ("value_loss", "entropy", "approx_kl", "clipfrac", "critic_grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mode", ["ppo", "gspo", "cispo"])
def test_truncated_importance_weights_per_token_with_every_loss_term(agg, mode):
    """Sampler log-probs off by noise (weights 0.x-2, some capped), an entropy bonus and a KL-loss term against a
    reference unlike the actor, each aggregation kind and policy loss: at ratio 1 the weights change the
    policy term alone, by sum_t w_agg (w_is - 1) (-A) / N (the entropy and KL terms cancel in the difference)."""
    from engine.rlhf.core import loss_token_weights
    config = _ppo(rollout_is_cap=2.0, iterations=1, mini_batch_size=8, whiten_advantages=False, entropy_coef=0.05,
                  kl_loss_coef=0.2, loss_agg_mode=agg, policy_loss=mode)

    def models():
        actor, critic, reference, reward = _models(seed=3)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        return actor, critic, reference, reward

    loop = _loop(config, models=models())
    rollout, _ = loop.rollout(0)
    noise = 0.7 * torch.randn(rollout.logprobs.shape, generator=torch.Generator().manual_seed(0))
    noisy = dataclasses.replace(rollout, sampler_logprobs=rollout.logprobs + noise)
    batch, stats = loop.advantages(noisy)
    trained = batch["labels"] != -100
    w = align(torch.exp(-noise).clamp(max=2.0), config.max_prompt_length, 0.0)
    torch.testing.assert_close(batch["rollout_is_weights"][trained], w[trained])
    assert w[trained].std() > 0.1 and 0 < stats["rollout_is_truncated"] < 1  # varied, some capped
    plain = _loop(dataclasses.replace(config, rollout_is_cap=0.0), models=models())
    plain_batch, plain_stats = plain.advantages(noisy)
    assert stats["truncated_fraction"] == plain_stats["truncated_fraction"]  # responses cut off: not the cap
    a, b = loop.update(batch, 0), plain.update(plain_batch, 0)
    agg_w = loss_token_weights(trained, agg, config.max_new_tokens) if agg != "token-mean" else trained.float()
    expected = ((agg_w * (w - 1) * -batch["advantages"])[trained].sum() / trained.sum()).item()
    assert a["policy_loss"] - b["policy_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-6) and a["ref_kl"] == pytest.approx(b["ref_kl"], rel=1e-6)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_loss_aggregation_modes_in_the_update(mode):
    """One mini-batch holding the whole rollout, ratio 1: the actor's loss is the mode's aggregate of -A over
    the response tokens (by hand), and the clip options change nothing at ratio 1."""
    config = _ppo(mini_batch_size=8, micro_batch_size=2, iterations=1, loss_agg_mode=mode, clip_eps_high=0.3,
                  dual_clip=3.0)
    # many stop tokens: responses of several lengths, so that the modes differ
    loop = PPOLoop(config, _config(), ParallelLayout.single(), *_models(), _prompts(), list(range(2, 24)), PAD,
                   OPTIM, OPTIM, LR, LR)
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    P, T = config.max_prompt_length, config.max_new_tokens
    adv, mask = batch["advantages"][:, P - 1:-1].double(), rollout.response_mask.bool()
    rows = [(-adv[i][mask[i]]) for i in range(8) if mask[i].any()]
    expected = {"seq-mean-token-mean": sum(r.mean() for r in rows) / len(rows),
                "seq-mean-token-sum": sum(r.sum() for r in rows) / len(rows),
                "seq-mean-token-sum-norm": sum(r.sum() for r in rows) / (len(rows) * T)}[mode]
    assert len({int(m.sum()) for m in mask}) > 2
    update = loop.update(batch, 0)
    assert update["ppo_steps"] == 1 and update["clipfrac"] == 0.0 and update["dual_clipfrac"] == 0.0
    # fp32 sums over <= 48 tokens vs fp64
    assert update["policy_loss"] == pytest.approx(expected.item(), abs=1e-5)
    if mode == "seq-mean-token-mean":  # the entropy bonus reaches the step, aggregated like the loss
        actor = _models()[0]  # the same initial weights as the loop's actor
        with torch.no_grad():
            logp = torch.log_softmax(actor(rollout.sequences, rollout.attention_mask)[:, P - 1:-1].double(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        per_response = [entropy[i][mask[i]].mean() for i in range(8) if mask[i].any()]
        bonus = PPOLoop(dataclasses.replace(config, entropy_coef=0.3), _config(), ParallelLayout.single(), *_models(),
                        _prompts(), list(range(2, 24)), PAD, OPTIM, OPTIM, LR, LR).update(batch, 0)
        assert bonus["entropy"] == pytest.approx(update["entropy"], rel=1e-6)  # the stat: a plain token mean
        want = expected - 0.3 * sum(per_response) / len(per_response)
        assert bonus["policy_loss"] == pytest.approx(want.item(), abs=1e-5)


def test_clip_options_and_weighted_kl_loss_reach_the_update():
    """Ratios away from 1 (the behaviour log-probs shifted), a reference unlike the actor and seq-mean-token-mean:
    the step's loss is the core policy loss with clip-higher and dual clipping, plus the weighted k3 KL term,
    over the token count (by the core functions on a fresh forward); both clips are active."""
    from engine.rlhf.core import kl_penalty, loss_token_weights
    config = _ppo(mini_batch_size=8, micro_batch_size=2, iterations=1, loss_agg_mode="seq-mean-token-mean",
                  clip_eps_high=0.3, dual_clip=1.5, kl_coef=0.0, kl_loss_coef=0.2)
    actor, critic, reference, reward = _models(seed=11)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loop = PPOLoop(config, _config(), ParallelLayout.single(), actor, critic, reference, reward, _prompts(),
                   list(range(2, 24)), PAD, OPTIM, OPTIM, LR, LR)
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    P, T = config.max_prompt_length, config.max_new_tokens
    mask = rollout.response_mask.bool()
    old = (rollout.logprobs - 0.6 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))) * mask
    batch["old_logprobs"] = align(old, P, 0.0)
    with torch.no_grad():
        fresh = kernels.token_logprobs(loop.actor[0](rollout.sequences, rollout.attention_mask)[:, P - 1:-1],
                                       rollout.responses)
    w = loss_token_weights(mask, "seq-mean-token-mean", T)
    policy, stats = ppo_policy_loss(fresh, old, batch["advantages"][:, P - 1:-1], mask, 0.2, "sum", 0.3, 1.5, w)
    kl = kl_penalty(fresh, rollout.ref_logprobs, mask, "k3", "sum", w)
    update = loop.update(batch, 0)
    assert stats["dual_clipfrac"] > 0 and stats["clipfrac"] > 0
    # fp32 forward of other micro-batches and fp32 sums vs the same ops in one batch
    assert update["policy_loss"] == pytest.approx(((policy + 0.2 * kl) / mask.sum()).item(), abs=1e-5)
    assert update["dual_clipfrac"] == pytest.approx((stats["dual_clipfrac"] / mask.sum()).item(), abs=1e-6)


def test_critic_warmup_leaves_the_actor_alone_at_first():
    """critic_warmup=1: iteration 0 steps the critic only (the actor's weights and step count unchanged, no
    policy metrics); iteration 1 steps both, the actor at its schedule's first learning rate."""
    decaying = LRConfig(lr=1e-3, min_lr=0.0)
    actor, critic, reference, reward = _models()
    loop = PPOLoop(_ppo(iterations=3, critic_warmup=1, offload=True), _config(), ParallelLayout.single(), actor, critic,
                   reference, reward, _prompts(), [EOS], PAD, OPTIM, OPTIM, decaying, decaying)
    # the actor's schedule spans the 2 iterations after the warm-up (2 steps each), the critic's all 3
    assert loop.actor_trainer.lr.decay_steps == 4 and loop.critic_trainer.lr.decay_steps == 6
    actor_before = {k: v.clone() for k, v in loop.actor[0].state_dict().items()}
    critic_before = {k: v.clone() for k, v in loop.critic[0].state_dict().items()}
    warm = loop.iteration()
    assert "policy_loss" not in warm and math.isfinite(warm["value_loss"]) and warm["ppo_steps"] == 2
    assert "actor_lr" not in warm
    critic_bytes = sum(t.numel() * t.element_size() for t in loop.critic[0].state_dict().values())
    # offloaded, the update phase held the critic alone: fp32 weights, gradients and two Adam moments (the
    # actor, which holds more, never came in)
    assert warm["resident_bytes_update"] == 4 * critic_bytes
    assert loop.actor_trainer.steps_done == 0 and loop.critic_trainer.steps_done == 2
    assert all(torch.equal(v, actor_before[k]) for k, v in loop.actor[0].state_dict().items())
    assert any(not torch.equal(v, critic_before[k]) for k, v in loop.critic[0].state_dict().items())
    both = loop.iteration()
    assert math.isfinite(both["policy_loss"]) and loop.actor_trainer.steps_done == 2
    assert both["actor_lr"] == pytest.approx(loop.actor_trainer.lr(1)) and both["actor_lr"] < 1e-3  # decaying


def test_generation_in_chunks_bounds_the_rows_per_generate_call(monkeypatch):
    """generation_batch_size: every generate call (rollout, reference answers) takes at most that many rows; a
    chunk as large as the slice is the unchunked rollout exactly; greedy answers do not depend on it."""
    import engine.rlhf.ppo as ppo
    calls = []
    real = ppo.generate

    def counting(model, ids, mask, params):
        calls.append(ids.shape[0])
        return real(model, ids, mask, params)
    monkeypatch.setattr(ppo, "generate", counting)
    whole, _ = _loop().rollout(0)
    assert max(calls) == 8  # the rollout's 8 rows at once
    calls.clear()
    same, _ = _loop(_ppo(generation_batch_size=8)).rollout(0)
    assert torch.equal(same.sequences, whole.sequences) and torch.equal(same.scores, whole.scores)
    calls.clear()
    chunked_loop = _loop(_ppo(generation_batch_size=3))
    chunked, _ = chunked_loop.rollout(0)
    assert calls == [3, 3, 2] + [3, 1]  # the rollout's 8 rows, then the reference answers of its 4 prompts
    assert chunked.sequences.shape == whole.sequences.shape
    assert torch.equal(chunked.baselines, whole.baselines)  # greedy: the same answers in any chunks
    assert not torch.equal(chunked.responses, whole.responses)  # sampled: each chunk draws its own noise


def test_iterations_report_finite_metrics_and_cache_the_reference_baseline():
    loop = _loop()
    records = [loop.iteration() for _ in range(2)]
    for r in records:
        for key in ("reward", "reward_vs_reference", "reference_reward", "kl", "policy_loss", "value_loss",
                    "clipfrac", "approx_kl", "entropy", "vf_clipfrac", "response_length", "generate_s"):
            assert math.isfinite(r[key]), (key, r)
        assert r["ppo_steps"] == 2 and r["kept_fraction"] == 1.0
        # the score relative to the reference answer: scores minus the cached per-prompt baselines
        assert r["reward_vs_reference"] == pytest.approx(r["reward"] - r["reference_reward"], abs=1e-5)
    seen = {int(i) for it in range(2) for i in loop.prompt_indices(it)}
    assert set(loop._baseline_cache) == seen  # one reference answer per prompt, computed once


def test_reward_spread_filter_can_drop_everything_and_then_nothing_trains():
    loop = _loop(_ppo(min_reward_spread=1e9, iterations=1))
    before = {k: v.clone() for k, v in loop.actor[0].state_dict().items()}
    record = loop.iteration()
    assert record["kept_fraction"] == 0.0 and record["ppo_steps"] == 0 and record["skipped_minibatches"] == 2
    assert all(torch.equal(v, before[k]) for k, v in loop.actor[0].state_dict().items())


def test_score_normalisation_and_clipping():
    """normalize_scores feeds the kept rows' adjusted scores into the running moments; with no KL
    penalty, gamma = lam = 1 and a tiny score_clip, every return (the sum of the rewards after the
    token) is bounded by the clip."""
    loop = _loop(_ppo(normalize_scores=True, score_clip=1e-3, kl_coef=0.0, lam=1.0, iterations=1))
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    assert loop.score_moments.count == loop.config.rollout_rows
    # returns = advantages + values in fp32 with |values| ~ 1: rounding adds up to a few 1e-7
    assert batch["returns"].abs().max().item() <= 1e-3 + 1e-6


def test_adaptive_kl_coefficient_follows_the_controller():
    """kl_target > 0: each iteration uses the current coefficient (logged as kl_coef) and then moves it
    by the controller on that rollout's KL; kl_target = 0 keeps it fixed."""
    from engine.rlhf.core import adaptive_kl_coef
    loop = _loop(_ppo(kl_target=1e-3, kl_horizon=16, iterations=3))
    coef = loop.config.kl_coef
    for _ in range(3):
        record = loop.iteration()
        assert record["kl_coef"] == coef
        new = adaptive_kl_coef(coef, record["kl"], 1e-3, 16, loop.config.rollout_rows)
        assert loop.kl_coef == new and (new > coef) == (record["kl"] > 1e-3)
        coef = new
    assert coef != loop.config.kl_coef
    fixed = _loop(_ppo(iterations=1))
    assert fixed.iteration()["kl_coef"] == fixed.kl_coef == fixed.config.kl_coef


def test_ptx_loss_is_added_in_the_same_actor_step():
    """PPO-ptx: the actor's gradient is the policy gradient plus ptx_coef times the LM gradient on the
    SFT batch (checked against each term computed alone)."""
    g = torch.Generator().manual_seed(3)
    S = 14
    ids = torch.randint(3, VOCAB, (4, S), generator=g)
    ptx = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    grads = {}
    for coef in (0.0, 0.5):
        loop = _loop(_ppo(ptx_coef=coef, iterations=1), ptx=lambda step: ptx)
        rollout, _ = loop.rollout(0)
        batch, _ = loop.advantages(rollout)
        mb = {k: v[:4] for k, v in batch.items()}
        seen = {}
        metrics = loop.actor_trainer.train_step(
            mb, on_grads=lambda t: seen.update({n: p.main_grad.clone() for n, p in t.chunks[0].named_parameters()}),
            extra=((LanguageModelObjective(), ptx, coef),) if coef else ())
        grads[coef] = seen
        if coef:
            assert metrics.stats["lm_loss"] == pytest.approx(
                kernels.cross_entropy(_models()[0](ids), ptx["labels"]).item(), rel=1e-5)
    lm = _models()[0]
    kernels.cross_entropy(lm(ids), ptx["labels"]).backward()
    for name, p in lm.named_parameters():
        torch.testing.assert_close(grads[0.5][name], grads[0.0][name] + 0.5 * p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "rloo", "dr-grpo"])
def test_group_estimators_train_without_a_critic(kind):
    """GRPO / RLOO: the advantage of every token of a response is its score relative to the prompt's other
    responses, less its KL penalty (kl_coef x its summed KL: folded into the RLOO score, centred over the
    group after GRPO's normalisation; Dr. GRPO: no division by the std), computed here by hand; no critic,
    no reference answers."""
    actor, _, reference, reward = _models(seed=2)
    config = (_ppo(advantage_estimator="grpo", grpo_normalize_std=False) if kind == "dr-grpo"
              else _ppo(advantage_estimator=kind))
    loop = PPOLoop(config, _config(), ParallelLayout.single(), actor, None, reference,
                   reward, _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR)
    assert loop.critic_trainer is None and sorted(loop.offloader.groups) == ["actor", "actor.optim", "reference",
                                                                             "reward"]
    rollout, _ = loop.rollout(0)
    batch, stats = loop.advantages(rollout)
    assert torch.equal(rollout.baselines, torch.zeros(8)) and loop._baseline_cache == {}
    mask = rollout.response_mask.bool()
    P, k = loop.config.max_prompt_length, loop.config.samples_per_prompt
    penalty = 0.1 * ((rollout.logprobs - rollout.ref_logprobs).double() * mask).sum(1)  # k1 KL, kl_coef 0.1
    expected = torch.zeros(8, dtype=torch.float64)
    for p in range(0, 8, k):
        score, pen = rollout.scores[p:p + k].double(), penalty[p:p + k]
        if kind == "grpo":
            expected[p:p + k] = (score - score.mean()) / (score.std() + 1e-6) - (pen - pen.mean())
        elif kind == "dr-grpo":
            expected[p:p + k] = (score - score.mean()) - (pen - pen.mean())
        else:
            folded = score - pen
            expected[p:p + k] = folded - (folded.sum() - folded) / (k - 1)  # minus the mean of the others
    adv = batch["advantages"][:, P - 1:-1]
    # fp32 sums of <= 6 token KLs and a 2-element std vs fp64: 1e-5 is ~10x the rounding
    want = expected[:, None].expand(8, adv.shape[1])[mask]
    torch.testing.assert_close(adv[mask].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    record = loop.iteration()
    assert record["ppo_steps"] == 2 and "value_loss" not in record and math.isfinite(record["policy_loss"])
    assert not {"reference_reward", "reward_vs_reference", "value_mean"} & set(record)  # nothing to report


def test_entropy_bonus_in_the_policy_objective():
    """entropy_coef: the objective subtracts coef x the summed entropy at the trained tokens (token-weighted
    when the batch carries weights); loss and logit gradients equal an fp64 autograd reference."""
    from engine.rlhf.objectives import PolicyObjective
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[-100, 4, 7, 9, -100], [-100, -100, 3, -100, -100]])
    mb = {"labels": labels, "old_logprobs": -torch.rand(2, 5, generator=g, dtype=torch.float64),
          "advantages": torch.randn(2, 5, generator=g, dtype=torch.float64),
          "token_weights": torch.rand(2, 5, generator=g, dtype=torch.float64)}
    mb = PolicyObjective().model_inputs(mb)
    at = lambda key: mb[key].reshape(-1)[mb["output_index"]][None]  # noqa: E731
    for weighted in (False, True):
        logits = torch.randn(4, VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
        objective = PolicyObjective(temperature=0.7, entropy_coef=0.05, weighted=weighted)
        loss, stats = objective.loss_and_stats(logits, mb, ParallelLayout.single(), "torch")
        loss.backward()
        reference_logits = logits.detach().clone().requires_grad_()
        logp = torch.log_softmax(reference_logits / 0.7, -1)
        entropy = -(logp.exp() * logp).sum(-1)[None]
        chosen = logp.gather(1, at("labels").reshape(-1, 1)).reshape(1, -1)
        weights = at("token_weights") if weighted else None
        expected, _ = ppo_policy_loss(chosen, at("old_logprobs"), at("advantages"), torch.ones(1, 4), reduction="sum",
                                      weights=weights)
        expected = expected - 0.05 * (entropy * (1.0 if weights is None else weights)).sum()
        expected.backward()
        # fp32 core math on fp64 inputs: ~1e-7 relative
        torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-6)
        assert stats[2].item() == pytest.approx(entropy.sum().item(), rel=1e-6)  # the stat: unweighted


@pytest.mark.parametrize("kind", ["reinforce++", "reinforce++-baseline"])
def test_reinforce_plus_plus_advantages(kind):
    """REINFORCE++: per-token rewards (-kl_coef x k1 KL, plus the score at the last token: relative to the
    reference answer, or for the -baseline variant to the mean score of the prompt's responses), summed to the
    end with gamma, whitened over the rollout; computed here by loops in fp64. No critic; an iteration trains."""
    actor, _, reference, reward = _models(seed=12)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loop = PPOLoop(_ppo(advantage_estimator=kind, gamma=0.9, overlong_buffer=2), _config(), ParallelLayout.single(),
                   actor, None, reference, reward, _prompts(), list(range(2, 24)), PAD, OPTIM, OPTIM, LR, LR)
    rollout, _ = loop.rollout(0)
    batch, stats = loop.advantages(rollout)
    mask = rollout.response_mask.bool()
    scores = rollout.scores.double()
    lengths = mask.sum(1).double()
    overlong = -((lengths - 4) / 2).clamp(0, 1)  # the last 2 of 6 tokens
    if kind == "reinforce++":
        assert loop._baseline_cache and stats["reward_vs_reference"] == pytest.approx(
            (rollout.scores - rollout.baselines).mean().item())
        adjusted = scores - rollout.baselines.double() + overlong
    else:
        assert loop._baseline_cache == {} and "reward_vs_reference" not in stats
        adjusted = scores + overlong  # the group mean of the penalised scores
        adjusted = adjusted - adjusted.view(4, 2).mean(1).repeat_interleave(2)
    kl = (rollout.logprobs - rollout.ref_logprobs).double()
    returns = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(8):
        n, acc = int(mask[i].sum()), 0.0
        for t in reversed(range(n)):
            acc = -0.1 * kl[i, t] + (adjusted[i] if t == n - 1 else 0.0) + 0.9 * acc
            returns[i, t] = acc
    values = returns[mask]
    expected = (values - values.mean()) / (values.var() + 1e-8).sqrt()
    assert len({int(m.sum()) for m in mask}) > 2 and (overlong < 0).any() and (overlong == 0).any()
    P = loop.config.max_prompt_length
    # fp32 sums of <= 6 terms and the whitening vs fp64
    torch.testing.assert_close(batch["advantages"][:, P - 1:-1][mask].double(), expected, rtol=1e-5, atol=1e-5)
    assert "old_values" not in batch and loop.critic_trainer is None
    record = loop.iteration()
    assert record["ppo_steps"] == 2 and math.isfinite(record["policy_loss"]) and "value_loss" not in record


def test_overlong_punishment_and_truncated_responses():
    """DAPO's length handling under GRPO (kl_coef 0): responses cut off without a stop token train nothing
    (mask_truncated) but keep their score in the group; every score first loses the overlong penalty of its
    length (buffer 3 of 6 tokens), so the advantages are GRPO's of the penalised scores (by hand)."""
    from engine.rlhf.core import group_advantages, overlong_penalty
    stops = list(range(2, 12))  # some responses stop early, some run to the limit
    config = _ppo(advantage_estimator="grpo", kl_coef=0.0, overlong_buffer=3, overlong_penalty=0.5,
                  mask_truncated=True, rollout_prompts=6, samples_per_prompt=2, mini_batch_size=6)
    actor, _, reference, reward = _models(seed=13)
    loop = PPOLoop(config, _config(), ParallelLayout.single(), actor, None, reference, reward, _prompts(), stops, PAD,
                   OPTIM, OPTIM, LR, LR)
    rollout, _ = loop.rollout(0)
    lengths = rollout.response_mask.sum(1)
    full = torch.nonzero(lengths == 6).flatten()
    rollout.responses[full[0], 5] = 2  # a response whose stop token is its 6th and last: not truncated
    batch, stats = loop.advantages(rollout)
    last = rollout.responses[torch.arange(12), (lengths - 1).clamp(min=0)]
    truncated = (lengths == 6) & ~torch.tensor([int(t) in stops for t in last])
    assert 0 < truncated.sum() < 12 and len(set(lengths.tolist())) > 2  # both kinds, several lengths
    assert not truncated[full[0]] and stats["trained_fraction"] == ((~truncated) & (lengths > 0)).float().mean().item()
    assert stats["truncated_fraction"] == truncated.float().mean().item()
    P = config.max_prompt_length
    trained = (batch["labels"][:, P - 1:-1] != -100).any(1)
    assert torch.equal(trained, ~truncated & (lengths > 0))
    penalty = overlong_penalty(lengths, 6, 3, 0.5)
    assert stats["overlong_penalty"] == pytest.approx(penalty.mean().item())
    expected = group_advantages((rollout.scores + penalty).view(6, 2), "grpo").view(-1)
    adv = batch["advantages"][:, P - 1]  # each response's first token carries its advantage
    torch.testing.assert_close(adv[trained], expected[trained], rtol=1e-6, atol=1e-6)  # the same fp32 ops


def test_kl_loss_term_in_the_policy_objective():
    """kl_loss_coef: the objective adds coef x the summed k3 KL to the reference (by the core functions on
    the same log-probs) and reports it; the loop puts the rollout's reference log-probs in the batch."""
    from engine.rlhf.core import kl_penalty
    from engine.rlhf.objectives import PolicyObjective
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 4, 7, 9, -100], [-100, -100, 3, -100, -100]])
    mb = {"labels": labels, "old_logprobs": -torch.rand(2, 5, generator=g, dtype=torch.float64),
          "advantages": torch.randn(2, 5, generator=g, dtype=torch.float64),
          "ref_logprobs": -torch.rand(2, 5, generator=g, dtype=torch.float64)}
    mb = PolicyObjective().model_inputs(mb)  # the head computes logits at the 4 trained tokens only
    assert mb["output_index"].tolist() == [1, 2, 3, 7]
    at_outputs = logits.reshape(-1, VOCAB)[mb["output_index"]]
    plain, stats = PolicyObjective().loss_and_stats(at_outputs, mb, ParallelLayout.single(), "torch")
    with_kl, kl_stats = PolicyObjective(kl_coef=0.5).loss_and_stats(at_outputs, mb, ParallelLayout.single(), "torch")
    logprobs = kernels.token_logprobs(logits, labels.clamp(min=0), backend="torch")
    expected = kl_penalty(logprobs, mb["ref_logprobs"], labels != -100, "k3", reduction="sum")
    torch.testing.assert_close(with_kl, plain + 0.5 * expected)  # the same fp32 ops on the same inputs
    assert kl_stats[3] == expected and len(stats) == 3
    assert PolicyObjective(kl_coef=0.5).batch_keys[-1] == "ref_logprobs"
    assert PolicyObjective(kl_coef=0.5).stat_names[-1] == "ref_kl"
    # the loop: the batch carries the rollout's reference log-probs at the old log-probs' positions, and with
    # one mini-batch holding the whole rollout, the step's ref_kl is the rollout's own k3 (the actor is
    # still the behaviour policy); the reference differs from the actor here
    actor, critic, reference, reward = _models(seed=4)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loop = _loop(_ppo(kl_coef=0.0, kl_loss_coef=0.1, mini_batch_size=8, micro_batch_size=4),
                 models=(actor, critic, reference, reward))
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    P, mask = loop.config.max_prompt_length, rollout.response_mask.bool()
    assert torch.equal(batch["ref_logprobs"][:, P - 1:-1], rollout.ref_logprobs * mask)
    update = loop.update(batch, 0)
    expected = kl_penalty(rollout.logprobs, rollout.ref_logprobs, mask, "k3")
    assert expected.item() > 1e-3  # a real KL, so a misaligned or missing term shows
    # fp32: the training forward re-computes the behaviour log-probs (~1e-6 apart)
    assert update["ref_kl"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mini_batch_size=3), "mini_batch_size=3 must divide"),
    (dict(kl_kind="k9"), "kl_kind='k9'"),
    (dict(samples_per_prompt=1, min_reward_spread=0.1), "needs samples_per_prompt >= 2"),
    (dict(rollout_prompts=0), "rollout_prompts=0 must be a positive integer"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(score_clip=-1.0), "score_clip=-1.0 must be >= 0"),
    (dict(generation_tp=0), "generation_tp=0 must be None or a positive divisor of the training tp"),
    (dict(kl_target=0.1, kl_coef=0.0), "kl_target=0.1 adapts kl_coef multiplicatively: it needs kl_coef > 0"),
    (dict(kl_horizon=0), "kl_horizon=0 must be a positive integer"),
    (dict(score_micro_batch_size=-1), "score_micro_batch_size=-1 must be a positive integer or 0"),
    (dict(kl_loss_coef=-0.1), "kl_loss_coef=-0.1 must be >= 0"),
    (dict(kl_loss_kind="k1"), r"kl_loss_kind='k1' must be k2 or k3 \(k1's gradient averages to zero"),
    (dict(clip_eps_high=0.0), "clip_eps_high=0.0 must be > 0"),
    (dict(dual_clip=0.5), r"dual_clip=0.5 must be 0 \(off\) or > 1"),
    (dict(dual_clip=math.inf), r"dual_clip=inf must be 0 \(off\) or > 1"),
    (dict(entropy_coef=math.inf), "entropy_coef=inf must be >= 0 and finite"),
    (dict(overlong_buffer=7), r"overlong_buffer=7 must be an integer in \[0, max_new_tokens=6\]"),
    (dict(overlong_penalty=-1.0), "overlong_penalty=-1.0 must be >= 0 and finite"),
    (dict(sampling_rounds=3), "sampling_rounds=3 resamples prompts .*: it needs min_reward_spread > 0"),
    (dict(sampling_rounds=0), "sampling_rounds=0 must be a positive integer"),
    (dict(generation_batch_size=-1), "generation_batch_size=-1 must be a positive integer or 0"),
    (dict(eval_samples=0), "eval_samples=0 must be a positive integer"),
    (dict(eval_temperature=0.0), "eval_temperature=0.0 > 0"),
    (dict(critic_warmup=2), r"critic_warmup=2 must be an integer in \[0, iterations=2\)"),
    (dict(critic_warmup=1, advantage_estimator="grpo"), "critic_warmup=1 warms up the critic: advantage_estimator="
                                                        "'grpo' has none"),
    (dict(loss_agg_mode="seq-mean"), "loss_agg_mode='seq-mean' must be one of"),
    (dict(policy_loss="grpo"), r"policy_loss='grpo' must be one of \('ppo', 'gspo', 'cispo'\)"),
    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip=3.0 caps PPO's clipped surrogate"),
    (dict(clip_eps=math.inf), r"clip_eps=inf must be > 0 and finite"),
    (dict(rollout_is_cap=0.5), r"rollout_is_cap=0.5 must be 0 \(off\) or >= 1 and finite"),
    (dict(rollout_is_level="row"), r"rollout_is_level='row' must be one of \('token', 'sequence', 'geometric'\)"),
    (dict(rollout_is_mode="clip"), r"rollout_is_mode='clip' must be one of \('truncate', 'mask'\)"),
    (dict(clip_eps=0.0), r"clip_eps=0.0 must be > 0 and finite"),
    (dict(gamma=1.5), r"gamma=1.5 and lam=0.95 must be in \[0, 1\]"),
    (dict(value_clip_eps=-1.0), r"value_clip_eps=-1.0 must be > 0 and finite"),
    (dict(advantage_estimator="vtrace"), r"advantage_estimator='vtrace' must be one of \('gae', 'grpo', 'rloo', "
                                         r"'reinforce\+\+', 'reinforce\+\+-baseline'\)"),
    (dict(advantage_estimator="reinforce++-baseline", samples_per_prompt=1, mini_batch_size=4, rollout_prompts=4),
     "advantage_estimator='reinforce\\+\\+-baseline' compares a prompt's responses"),
    (dict(advantage_estimator="grpo", samples_per_prompt=1, mini_batch_size=4, rollout_prompts=4),
     "advantage_estimator='grpo' compares a prompt's responses: it needs samples_per_prompt >= 2"),
])
def test_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        _ppo(**kwargs).validate(1)


def test_generation_layout_config_errors():
    from engine.rlhf.ppo import validate_generation_dims
    with pytest.raises(ValueError, match="generation_tp=3: the generation layout is invalid: .*num_attention_heads=4"):
        validate_generation_dims(3, 6, _config())
    with pytest.raises(ValueError, match="generation_tp=3 must divide the training tp=4"):
        _ppo(generation_tp=3).validate(1, 4)
    # the rows split evenly over dp; the sampling replicas of a DP replica pad its slice (rows 6 over the 8
    # replicas of dp=2 x tp=4 at generation_tp=1, or over the 4 of pp=4, test_uneven_sampling_slices_*)
    _ppo(generation_tp=1, rollout_prompts=3, mini_batch_size=2, micro_batch_size=1).validate(2, 4)
    _ppo(rollout_prompts=3, mini_batch_size=2, micro_batch_size=1).validate(1, 1, 4)
    with pytest.raises(ValueError, match="= 6 must be divisible by dp=4: each DP replica samples and scores"):
        _ppo(rollout_prompts=3, mini_batch_size=2, micro_batch_size=1).validate(4)
    # the generation layout's row order relies on PP ranks in ascending global-rank order (checked first)
    single = ParallelLayout.single()
    odd = dataclasses.replace(single, dims=dataclasses.replace(single.dims, pp=2), pp_ranks=(1, 0))
    with pytest.raises(RuntimeError, match=r"PP ranks \(1, 0\) or TP subgroup \(0,\) are not in ascending"):
        ParallelLayout.for_generation(odd, 1)
    # the interleaved schedule needs the micro-batches per DP rank in multiples of pp
    _ppo(mini_batch_size=4).validate(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"mini_batch_size=2 gives 1 micro-batches per DP rank; the interleaved "
                                         r"schedule \(vpp=2\) needs a multiple of pp=2"):
        _ppo(mini_batch_size=2).validate(1, 1, 2, 2)


def test_loop_errors():
    actor, critic, reference, reward = _models()
    with pytest.raises(ValueError, match="advantage_estimator='grpo' uses no critic: pass critic=None"):
        PPOLoop(_ppo(advantage_estimator="grpo"), _config(), ParallelLayout.single(), actor, critic, reference,
                reward, _prompts(), [EOS], PAD)
    with pytest.raises(ValueError, match="advantage_estimator='gae' needs a critic"):
        PPOLoop(_ppo(), _config(), ParallelLayout.single(), actor, None, reference, reward, _prompts(), [EOS], PAD)
    single = ParallelLayout.single()
    with pytest.raises(ValueError, match=r"actor: 1 model chunks on this rank, the layout has vpp=2 \(pipeline"):
        _loop(layout=dataclasses.replace(single, dims=dataclasses.replace(single.dims, vpp=2)))
    with pytest.raises(ValueError, match="ptx_coef > 0 needs ptx_batches"):
        _loop(_ppo(ptx_coef=0.1))
    with pytest.raises(ValueError, match="fewer than rollout_prompts=40"):
        _loop(_ppo(rollout_prompts=40, mini_batch_size=8))
    with pytest.raises(ValueError, match="generation_tp=2 must divide the training tp=1"):
        _loop(_ppo(generation_tp=2))


# ---- layouts -----------------------------------------------------------------------------------
def _one_process(seed: int, config=None):
    """The four models' full state dicts, and one process's loop, rollout 0 and PPO batch from them."""
    models = _models(seed=seed)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    loop = _loop(config, models=models)
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    return states, loop, rollout, batch


def off_policy(batch: dict, seed: int = 5) -> dict:
    """A copy of a PPO batch whose old log-probs lie off the current policy: per-token noise and a per-row
    shift, as if sampled some steps back. The first update step then has ratios far from 1 whose sequence
    means differ per response (GSPO), and importance weights past the clip range (CISPO)."""
    out = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(seed)
    old = out["old_logprobs"]
    out["old_logprobs"] = old + 0.2 * torch.randn(old.shape, generator=g) + 0.3 * torch.randn(old.shape[0], 1,
                                                                                              generator=g)
    return out


def _sharded(states, layout, sequence_parallel: bool = False) -> list:
    """Actor, critic, reference and reward built for ``layout`` from full state dicts (a model, or the
    rank's chunks when vpp > 1)."""
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import load_full_into
    models = []
    for cls, state in zip((GLMForCausalLM, GLMForScalarHead, GLMForCausalLM, GLMForScalarHead), states):
        chunks = build_model_chunks(_config(), layout, model_cls=cls, seed=None, sequence_parallel=sequence_parallel)
        for chunk in chunks:
            load_full_into(chunk, state, layout)
        models.append(chunks[0] if len(chunks) == 1 else chunks)
    return models


def _sharded_bytes(model) -> int:
    """Bytes of a rank's tensor-parallel shards (norm weights are replicated, never resharded)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if not k.endswith("norm.weight"))


def _world2(rank, world_size, states, prompts_greedy, batch):
    """TP=2: greedy generation equals one process; TP=2 and DP=2: one PPO update (fixed rollout batch)
    gives the single-process losses and actor weights; DP=2: a full iteration runs (rollout gather)."""
    from engine.model.generation import SamplingParams, generate
    from engine.parallel.sharding import gather_full_state_dict
    out = {}
    for name, dims in (("tp2", ParallelDims(tp=2)), ("dp2", ParallelDims(dp=2))):
        layout = ParallelLayout.build(dims, name=name)
        loop = _loop(layout=layout, models=_sharded(states, layout))
        if name == "tp2":
            ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
            gen = generate(loop.actor[0], ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
            out["greedy"] = (gen.response_ids.numpy(), gen.logprobs.numpy())
        update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
        fresh = dataclasses.replace(layout, ledger=type(layout.ledger)())  # the update's ledger stays as it was
        full = gather_full_state_dict(loop.actor[0], _config(), fresh)
        out[name] = (update, {k: v.clone().numpy() for k, v in full.items()})  # tp=1: views of live params
        if name == "dp2":
            record = loop.iteration()
            out["dp2_iteration"] = (record["ppo_steps"], layout.ledger.bytes("rollout") > 0,
                                    record["rollout_logprob_diff_max"] < 1e-4)
    # generation_tp=1 on a tp=2 training layout: the resharded actor is the whole model (greedy decoding
    # equals one process), the all-gather moves what the analytic count says, and an iteration runs
    layout = ParallelLayout.build(ParallelDims(tp=2), name="tp2_gen1")
    loop = _loop(_ppo(generation_tp=1), layout=layout, models=_sharded(states, layout))
    local_bytes = _sharded_bytes(loop.actor[0])
    gen = loop.generation_model()
    ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
    greedy = generate(gen, ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
    received = layout.ledger.received("reshard")
    record = loop.iteration()
    out["gen1"] = (greedy.response_ids.numpy(), received, local_bytes, record["ppo_steps"],
                   layout.ledger.received("reshard") == 2 * received and record["rollout_logprob_diff_max"] < 1e-4)
    return out


def test_tp2_and_dp2_match_one_process():
    from engine.model.generation import SamplingParams, generate
    states, loop, rollout, batch = _one_process(seed=5)
    prompts = _prompts(3, seed=9)
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    ref_gen = generate(loop.actor[0], ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
    ref_update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    ref_weights = loop.actor[0].state_dict()
    results = run_distributed(_world2, 2, states, prompts, batch, timeout=240)
    for r in results:
        tokens, logprobs = r["greedy"]
        assert torch.equal(torch.from_numpy(tokens), ref_gen.response_ids)
        torch.testing.assert_close(torch.from_numpy(logprobs), ref_gen.logprobs, rtol=0, atol=1e-5)
        for case in ("tp2", "dp2"):
            update, weights = r[case]
            for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy"):
                # fp32, another reduction order over TP shards / DP ranks
                assert update[key] == pytest.approx(ref_update[key], rel=1e-4, abs=1e-6), (case, key)
            for name, w in weights.items():
                torch.testing.assert_close(torch.from_numpy(w), ref_weights[name], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{case} {name}: {m}")
        assert r["dp2_iteration"] == (2, True, True)  # sampler and trainer log-probs agree (fp32)
        tokens, received, local_bytes, steps, once_per_iteration = r["gen1"]
        assert torch.equal(torch.from_numpy(tokens), ref_gen.response_ids)
        full_bytes = sum(t.numel() * t.element_size() for k, t in ref_weights.items() if not k.endswith("norm.weight"))
        # every sharded tensor all-gathered once over tp=2: (tp - 1) x its local bytes, which is the
        # analytic M (1 - 1/tp) here (no replicated KV heads at tp = groups); norms are not moved
        assert received == local_bytes == full_bytes / 2
        assert steps == 2 and once_per_iteration


def _minimum_reshard_bytes(state: dict, tp: int, tp_rank: int, tp_g: int, gen_rank: int) -> int:
    """Bytes of the tp_g generation shard ``gen_rank`` that training shard ``tp_rank`` of ``tp`` lacks: each
    tensor's elements numbered, sliced by both rules (``tp_slice``), the difference counted."""
    from engine.parallel.sharding import tp_slice
    total = 0
    for name, t in state.items():
        ids = torch.arange(t.numel()).view(t.shape)
        have = set(tp_slice(name, ids, _config(), tp, tp_rank).flatten().tolist())
        need = set(tp_slice(name, ids, _config(), tp_g, gen_rank).flatten().tolist())
        total += len(need - have) * t.element_size()
    return total


def _world4_generation(rank, world_size, states, prompts_greedy):
    """Training tp=4 (KV heads replicated over pairs of ranks), generation tp_g = 2 and 1: the regrouped
    layout, the resharded shards (bitwise the tp_g slices of the full weights), the bytes moved, greedy
    decoding on the generation layout, and a PPO iteration."""
    from engine.model.generation import SamplingParams, generate
    from engine.parallel.sharding import reshard_tp, tp_slice
    layout = ParallelLayout.build(ParallelDims(tp=4), name="tp4")
    out = {}
    # tp=4 > 2 KV groups: the QKV weights carry the replicated-KV gradient hook; a model holding such
    # hooks is freed by its last reference, without the cyclic GC (the generation copy relies on it)
    import gc
    import weakref
    from engine.parallel.pipeline import build_model_chunks
    (model,) = build_model_chunks(_config(), layout, seed=None)
    qkv = weakref.ref(next(iter(model.layers.values())).attention.qkv.weight)
    gc.disable()
    try:
        del model
        out["freed"] = qkv() is None
    finally:
        gc.enable()
    for tp_g in (2, 1):
        loop = _loop(_ppo(generation_tp=tp_g, rollout_prompts=2), layout=layout, models=_sharded(states, layout))
        gen = loop.generation_layout
        before = layout.ledger.received("reshard")
        shards = reshard_tp(loop.actor[0], _config(), layout, gen)
        received = layout.ledger.received("reshard") - before
        exact = all(torch.equal(t, tp_slice(k, states[0][k], _config(), tp_g, gen.tp_rank)) for k, t in shards.items())
        ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
        gen_model = loop.generation_model()
        on_device = all(p.device == torch.device("cpu") and not p.requires_grad for p in gen_model.parameters())
        greedy = generate(gen_model, ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
        del gen_model
        record = loop.iteration()
        out[tp_g] = dict(tp_ranks=gen.tp_ranks, dp_ranks=gen.dp_ranks, tp_rank=gen.tp_rank, dp_rank=gen.dp_rank,
                         exact=exact, names=sorted(shards) == sorted(states[0]), received=received,
                         local=_sharded_bytes(loop.actor[0]), tokens=greedy.response_ids.numpy(), on_device=on_device,
                         steps=record["ppo_steps"], rollout=record["response_length"])
    return out


def test_generation_layouts_tp4_to_tp2_and_tp1():
    from engine.model.generation import SamplingParams, generate
    actor, critic, reference, reward = _models(seed=6)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (actor, critic, reference, reward)]
    prompts = _prompts(3, seed=4)
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    ref = generate(actor, ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS])).response_ids
    results = run_distributed(_world4_generation, 4, states, prompts, timeout=300)
    for rank, r in enumerate(results):
        assert r["freed"]
        two, one = r[2], r[1]
        # tp 4 -> 2: f = 2 consecutive training ranks gather; generation TP groups are strided
        assert two["tp_rank"] == rank // 2 and two["tp_ranks"] == ((0, 2) if rank % 2 == 0 else (1, 3))
        assert two["dp_rank"] == rank % 2 and two["dp_ranks"] == ((0, 1) if rank < 2 else (2, 3))
        # tp 4 -> 1: every rank a whole model and its own generation replica
        assert one["tp_rank"] == 0 and one["tp_ranks"] == (rank,) and one["dp_rank"] == rank
        for case, tp_g in ((two, 2), (one, 1)):
            assert case["exact"] and case["names"] and case["on_device"]
            # the minimum: every element of the generation shard this rank's training shard lacks, once.
            # The replicated KV heads make it less than (f - 1) x the local bytes: at 4 -> 2 the rank
            # already holds its head, at 4 -> 1 it receives the other head once, not from both holders.
            want = _minimum_reshard_bytes(states[0], 4, rank, tp_g, rank // (4 // tp_g))
            assert case["received"] == want
            assert want < (4 // tp_g - 1) * case["local"]
            assert torch.equal(torch.from_numpy(case["tokens"]), ref)  # greedy: same tokens as one process
            assert case["steps"] == 1 and case["rollout"] > 0


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _world4_pipeline(rank, world_size, states, prompts_greedy, scored, batch, ckpt_dir):
    """Training layouts with pp=2 (tp2 x pp2 sampling at tp_g = 1 and 2; pp2 x dp2): the generation layout's
    rank order, the resharded shards (every layer, bitwise the tp_g slices of the full weights), the bytes
    moved, greedy decoding, the pipelined scoring of fixed sequences, the reference baselines (sampled on
    a resharded reference), one update on a fixed batch, a full iteration and a checkpoint; two layouts
    offload idle models (``PPOConfig.offload``), which changes no number."""
    from engine.model.generation import SamplingParams, generate
    from engine.parallel.comm import CommLedger
    from engine.parallel.sharding import gather_full_state_dict, reshard_for_generation, tp_slice
    out = {}
    sequences, attention, responses, prompt_index = scored
    for name, dims, tp_g, offload in (("tp2pp2_gen1", ParallelDims(tp=2, pp=2), 1, True),
                                      ("tp2pp2", ParallelDims(tp=2, pp=2), None, False),
                                      ("pp2dp2", ParallelDims(pp=2, dp=2), None, True)):
        layout = ParallelLayout.build(dims, name=name)
        loop = _loop(_ppo(generation_tp=tp_g, offload=offload), layout=layout, models=_sharded(states, layout))
        gen = loop.generation_layout
        before = layout.ledger.received("reshard")
        shards = reshard_for_generation(loop.actor, _config(), layout, gen)
        received = layout.ledger.received("reshard") - before
        exact = sorted(shards) == sorted(states[0]) and all(
            torch.equal(t, tp_slice(k, states[0][k], _config(), gen.tp_size, gen.tp_rank)) for k, t in shards.items())
        ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
        greedy = generate(loop.generation_model(), ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
        scores = (loop._token_logprobs(loop.actor, sequences, attention),
                  loop._token_logprobs(loop.reference, sequences, attention),
                  loop._values(loop.critic, sequences, attention), loop._scores(loop.reward, sequences, attention),
                  loop._baselines(prompt_index))
        update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
        fresh = dataclasses.replace(layout, ledger=CommLedger())
        # cloned now: at tp = 1 the own stage's tensors are the live parameters, which the iteration updates
        weights = {k: v.clone() for k, v in gather_full_state_dict(loop.actor[0], _config(), fresh).items()}
        record = loop.iteration()
        if name == "tp2pp2":
            loop.save(ckpt_dir)
        after = gather_full_state_dict(loop.actor[0], _config(), fresh)
        out[name] = dict(tp_rank=gen.tp_rank, dp_rank=gen.dp_rank, tp_ranks=gen.tp_ranks, exact=exact,
                         received=received, expected=_state_bytes(shards) - _state_bytes(loop.actor[0].state_dict()),
                         own=_state_bytes(loop.actor[0].state_dict()),
                         tokens=greedy.response_ids.numpy(), scores=[t.numpy() for t in scores], update=update,
                         weights={k: v.numpy() for k, v in weights.items()},
                         after={k: v.clone().numpy() for k, v in after.items()},
                         resident_generate=record["resident_bytes_generate"], dp=layout.dp_size,
                         record={k: v for k, v in record.items()
                                 if not k.endswith("_s") and k != "seconds" and not k.startswith("resident_bytes")})
    return out


def test_pipeline_layouts_reshard_score_and_update_like_one_process(tmp_path):
    from engine.model.generation import SamplingParams, generate
    states, loop, rollout, batch = _one_process(seed=8)
    prompts = _prompts(3, seed=11)
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    greedy = SamplingParams(max_new_tokens=6, eos_token_id=[EOS])
    ref_tokens = generate(loop.actor[0], ids, mask, greedy).response_ids
    scored = (rollout.sequences, rollout.attention_mask, rollout.responses, rollout.prompt_index)
    ref_scores = (rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.scores, rollout.baselines)
    ref_update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    ref_weights = {k: v.clone() for k, v in loop.actor[0].state_dict().items()}
    results = run_distributed(_world4_pipeline, 4, states, prompts, scored, batch, str(tmp_path / "ck"), timeout=480)
    for rank, r in enumerate(results):
        t, p = rank % 2, rank // 2  # tp2 x pp2: rank = 2 p + t; pp2 x dp2: rank = 2 p + d
        # generation replica (d f + o) pp + p: a training replica's rows split over offsets, then stages
        assert (r["tp2pp2_gen1"]["tp_rank"], r["tp2pp2_gen1"]["dp_rank"]) == (0, 2 * t + p)
        assert (r["tp2pp2"]["tp_rank"], r["tp2pp2"]["dp_rank"], r["tp2pp2"]["tp_ranks"]) == (t, p, (2 * p, 2 * p + 1))
        assert (r["pp2dp2"]["tp_rank"], r["pp2dp2"]["dp_rank"]) == (0, 2 * t + p)
        for name, case in r.items():
            assert case["exact"], name
            # the analytic minimum: the generation shard minus what the rank already holds
            assert case["received"] == case["expected"] > 0, name
            assert torch.equal(torch.from_numpy(case["tokens"]), ref_tokens), name  # greedy, every layer
            for got, want in zip(case["scores"], ref_scores):
                # fp32: stage boundaries, TP partial sums, pipeline padding rows in the last micro-batch
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
            # the gradient norms pin the gradients' scale (one Adam step moves weights by ~lr sign(g) only)
            for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "actor_grad_norm",
                        "critic_grad_norm"):
                assert case["update"][key] == pytest.approx(ref_update[key], rel=1e-4, abs=1e-6), (name, key)
            for k, w in case["weights"].items():
                # Adam's first step moves a weight by lr g / (|g| + eps): +-lr (1e-3) for a real gradient, a
                # layout-dependent fraction of it for a gradient at fp32 noise level (~eps = 1e-8); a wrong
                # gradient is off by ~lr
                torch.testing.assert_close(torch.from_numpy(w), ref_weights[k], rtol=1e-4, atol=5e-5,
                                           msg=lambda m: f"{name} {k}: {m}")
            assert case["record"]["ppo_steps"] == 2 and case["record"]["response_length"] > 0
            # sampled on the generation copy (gathered over PP and TP siblings): the trainer's log-probs, fp32
            assert case["record"]["rollout_logprob_diff_max"] < 1e-4, name
            if name != "tp2pp2":  # offloading: while sampling the device holds the generation copy alone
                # (pp2dp2, tp_g = tp: this stage's part of it is the actor's flat buffer, padded to a multiple of dp)
                assert 0 <= case["resident_generate"] - (case["received"] + case["own"]) <= 4 * (case["dp"] - 1), name
            # every rank of every stage holds the same global rollout and metrics
            assert case["record"] == results[0][name]["record"], name
    # the tp2 x pp2 checkpoint loads into one process: the same actor weights
    resumed = _loop()
    resumed.load(tmp_path / "ck")
    assert resumed.iterations_done == 1
    for k, w in results[0]["tp2pp2"]["after"].items():
        assert torch.equal(resumed.actor[0].state_dict()[k], torch.from_numpy(w)), k


def _world2_uneven(rank, world_size, states):
    """3 rows over the 2 sampling replicas of pp=2 (the slice padded by repeating the last row), deterministic
    sampling (top_k = 1): the rollout and an iteration."""
    layout = ParallelLayout.build(ParallelDims(pp=2), name="pp2_uneven")
    loop = _loop(_UNEVEN, layout=layout, models=_sharded(states, layout))
    record = loop.iteration()
    return loop.last_rollout.sequences.numpy(), loop.last_rollout.sampler_logprobs.numpy(), record


_UNEVEN = _ppo(top_k=1, rollout_prompts=3, samples_per_prompt=1, mini_batch_size=3, micro_batch_size=1, iterations=1)


def test_uneven_sampling_slices_match_one_process():
    """A rollout whose rows do not divide over the sampling replicas: the same responses as one process."""
    states, loop, _, _ = _one_process(seed=8, config=_UNEVEN)
    record = loop.iteration()
    for sequences, sampler_logprobs, got in run_distributed(_world2_uneven, 2, states, timeout=240):
        assert torch.equal(torch.from_numpy(sequences), loop.last_rollout.sequences)
        torch.testing.assert_close(torch.from_numpy(sampler_logprobs), loop.last_rollout.sampler_logprobs, rtol=0,
                                   atol=1e-5)  # fp32, another layout
        for key in ("reward", "policy_loss", "value_loss"):
            assert got[key] == pytest.approx(record[key], rel=1e-4, abs=1e-6), key
        assert got["rollout_logprob_diff_max"] < 1e-4


def _world2_interleaved(rank, world_size, states, scored, batch):
    """pp=2 x vpp=2 (two chunks per rank, offloading on): scoring, baselines and one update."""
    layout = ParallelLayout.build(ParallelDims(pp=2, vpp=2), name="pp2vpp2")
    # scoring micro-batches of 3 rows: 8 rows -> 3 micro-batches (the last one padded, not a multiple of pp)
    loop = _loop(_ppo(offload=True, score_micro_batch_size=3), layout=layout, models=_sharded(states, layout))
    sequences, attention, responses, prompt_index = scored
    scores = (loop._token_logprobs(loop.actor, sequences, attention),
              loop._values(loop.critic, sequences, attention), loop._scores(loop.reward, sequences, attention),
              loop._baselines(prompt_index))
    five = loop._values(loop.critic, sequences[:5], attention[:5])  # an odd row count (before any update)
    update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    record = loop.iteration()
    return dict(chunks=[len(loop.actor), len(loop.reference)], scores=[t.numpy() for t in scores], update=update,
                steps=record["ppo_steps"], five=five.numpy())


def test_interleaved_pipeline_ppo_matches_one_process():
    states, loop, rollout, batch = _one_process(seed=9)
    ref_update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    scored = (rollout.sequences, rollout.attention_mask, rollout.responses, rollout.prompt_index)
    for r in run_distributed(_world2_interleaved, 2, states, scored, batch, timeout=300):
        assert r["chunks"] == [2, 2] and r["steps"] == 2
        for got, want in zip(r["scores"], (rollout.logprobs, rollout.values, rollout.scores, rollout.baselines)):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=2e-5)  # fp32, as above
        torch.testing.assert_close(torch.from_numpy(r["five"]), rollout.values[:5], rtol=0, atol=2e-5)
        for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "actor_grad_norm", "critic_grad_norm"):
            assert r["update"][key] == pytest.approx(ref_update[key], rel=1e-4, abs=1e-6), key


def _cp_case(layout, states, prompts_greedy, scored, batch, sequence_parallel=False, **ppo) -> dict:
    """One context- or sequence-parallel layout: sampling on its generation copy (cp = 1, no sequence
    parallel), scoring of fixed sequences, the reference baselines, one update on a fixed batch (its losses
    and the actor's weights after it) and a full iteration."""
    from engine.model.generation import SamplingParams, generate
    from engine.parallel.comm import CommLedger
    from engine.parallel.sharding import gather_full_state_dict
    sequences, attention, responses, prompt_index = scored
    loop = _loop(_ppo(max_new_tokens=CP_NEW_TOKENS, **ppo), layout=layout,
                 models=_sharded(states, layout, sequence_parallel))
    gen = loop.generation_layout
    ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
    greedy = generate(loop.generation_model(), ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
    cp_bytes = layout.ledger.received("cp")
    scores = (loop._token_logprobs(loop.actor, sequences, attention),
              loop._token_logprobs(loop.reference, sequences, attention),
              loop._values(loop.critic, sequences, attention), loop._scores(loop.reward, sequences, attention),
              loop._baselines(prompt_index))
    case = dict(gen=(gen.tp_size, gen.dp_rank, gen.dp_size), reshard=layout.ledger.received("reshard"),
                sp=(loop.sequence_parallel, loop.actor_trainer.train.sequence_parallel),
                tokens=greedy.response_ids.numpy(), scores=[t.numpy() for t in scores],
                scored_over_cp=layout.ledger.received("cp") > cp_bytes)
    case["update"] = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    fresh = dataclasses.replace(layout, ledger=CommLedger())
    case["weights"] = {k: v.clone().numpy() for k, v in gather_full_state_dict(loop.actor[0], _config(), fresh).items()}
    record = loop.iteration()
    case["record"] = {k: v for k, v in record.items()
                      if not k.endswith("_s") and k != "seconds" and not k.startswith("resident_bytes")}
    case["sequences"] = loop.last_rollout.sequences.numpy()  # the global rollout: the same on every rank
    return case


# GSPO under cp: prompts left-padded to 26 + 6 new tokens = 4 chunks of 8; every response token is predicted
# in chunk 3 (positions 25-30), which cp rank 0 holds, so rank 1 holds none of them, unless packed (rows of
# 2-3 responses, split over both ranks)
GSPO_CP = dict(max_prompt_length=26, max_new_tokens=6)


def _gspo_update(layout, states, batch, **ppo) -> tuple[dict, dict]:
    """One GSPO update on an off-policy batch (``off_policy``): its metrics and the actor's
    full weights after it."""
    from engine.parallel.sharding import gather_full_state_dict
    loop = _loop(_ppo(**GSPO_CP, policy_loss="gspo", clip_eps=0.1, **ppo), layout=layout,
                 models=_sharded(states, layout))
    update = loop.update(off_policy(batch), 0)
    return update, {k: v.clone().numpy() for k, v in gather_full_state_dict(loop.actor[0], _config(), layout).items()}


def _world2_cp(rank, world_size, states, prompts_greedy, scored, batch, gspo_batch):
    """cp=2 (each sequence split over the 2 ranks), padded and packed rows (``_cp_case``); a reward function
    scores each row once, on one of the cp ranks, and its failure on one rank raises on both."""
    out = {pack: _cp_case(ParallelLayout.build(ParallelDims(cp=2), name=f"cp2_{pack}"), states, prompts_greedy,
                          scored, batch, pack_sequences=pack) for pack in (False, True)}
    # GSPO: each response's ratio needs the log-probs of both cp ranks' tokens (packed: of its segment only);
    # padded, rank 1 holds no response token but must still join each micro-batch's all-reduce
    out["gspo"] = {pack: _gspo_update(ParallelLayout.build(ParallelDims(cp=2), name=f"cp2_gspo_{pack}"), states,
                                      gspo_batch, pack_sequences=pack) for pack in (False, True)}
    # top_k = 1 makes sampling deterministic: a whole iteration is then comparable with one process's
    layout = ParallelLayout.build(ParallelDims(cp=2), name="cp2_topk1")
    loop = _loop(_ppo(max_new_tokens=CP_NEW_TOKENS, top_k=1), layout=layout, models=_sharded(states, layout))
    out["top_k1"] = (loop.iteration(), loop.last_rollout.sequences.numpy())
    # one prompt, 4 samples: each cp rank samples 2 of them with its own seed, so the group has 4 answers
    layout = ParallelLayout.build(ParallelDims(cp=2), name="cp2_group")
    loop = _loop(_ppo(max_new_tokens=CP_NEW_TOKENS, rollout_prompts=1, samples_per_prompt=4), layout=layout,
                 models=_sharded(states, layout))
    out["group"] = loop.rollout(0)[0].responses.numpy()
    responses = scored[2]
    seen = []

    def by_rank(prompt_index, responses, response_mask):  # answers with its rank
        seen.append(prompt_index.tolist())
        return torch.full((len(prompt_index),), float(rank))

    layout = ParallelLayout.build(ParallelDims(cp=2), name="cp2_fn")
    actor, critic, reference, _ = _sharded(states, layout)
    loop = PPOLoop(_ppo(max_new_tokens=CP_NEW_TOKENS), _config(), layout, actor, critic, reference, None, _prompts(),
                   [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=by_rank)
    rows = torch.arange(5)
    out["fn"] = (loop._rule_scores(rows, responses[:5], responses[:5] != PAD).tolist(), seen)

    def fails_on_1(prompt_index, responses, response_mask):
        if rank == 1:
            raise KeyError("checker broke")
        return torch.zeros(len(prompt_index))
    loop.reward_fn = fails_on_1
    try:
        loop._rule_scores(rows, responses[:5], responses[:5] != PAD)
        out["failure"] = None
    except Exception as e:
        out["failure"] = f"{type(e).__name__}: {e}"
    return out


def _world4_cp(rank, world_size, states, prompts_greedy, scored, batch):
    """cp=2 with tp=2 and sequence parallel (sampling at generation_tp=1, offloading on), cp=2 with pp=2, and
    sequence parallel on tp=2 x dp=2 and on tp=2 x pp=2 (stages exchange [b, s / tp, h]) (``_cp_case``)."""
    cases = (("tp2cp2_sp", ParallelDims(tp=2, cp=2), dict(sequence_parallel=True, generation_tp=1, offload=True)),
             ("pp2cp2", ParallelDims(pp=2, cp=2), {}),
             ("tp2dp2_sp", ParallelDims(tp=2, dp=2), dict(sequence_parallel=True, pack_sequences=True)),
             ("tp2pp2_sp", ParallelDims(tp=2, pp=2), dict(sequence_parallel=True)))
    out = {name: _cp_case(ParallelLayout.build(dims, name=name), states, prompts_greedy, scored, batch, **kw)
           for name, dims, kw in cases}
    layout = ParallelLayout.build(ParallelDims(tp=2, dp=2), name="mixed")
    actor, _, reference, reward = _sharded(states, layout, sequence_parallel=True)
    critic = _sharded(states, layout)[1]
    with pytest.raises(ValueError, match=r"the models disagree on sequence parallelism \(\{'actor': True, 'critic': "
                                         r"False, 'reference': True, 'reward': True\}\)"):
        PPOLoop(_ppo(max_new_tokens=CP_NEW_TOKENS), _config(), layout, actor, critic, reference, reward, _prompts(),
                [EOS], PAD)
    return out


def _cp_reference():
    """One process's rollout 0, scores, update and weights at the context-parallel tests' sequence length."""
    from engine.model.generation import SamplingParams, generate
    config = _ppo(max_new_tokens=CP_NEW_TOKENS)  # S = 8 + 8: 2 x cp = 4 chunks of 4 tokens
    states, loop, rollout, batch = _one_process(seed=6, config=config)
    prompts = _prompts(3, seed=13)
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    tokens = generate(loop.actor[0], ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS])).response_ids
    scored = (rollout.sequences, rollout.attention_mask, rollout.responses, rollout.prompt_index)
    update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    weights = {k: v.clone() for k, v in loop.actor[0].state_dict().items()}
    deterministic = _loop(_ppo(max_new_tokens=CP_NEW_TOKENS, top_k=1),
                          models=[copy.deepcopy(m) for m in _models(seed=6)])
    top_k1 = (deterministic.iteration(), deterministic.last_rollout.sequences)
    gspo_batch = _one_process(seed=6, config=_ppo(**GSPO_CP))[3]
    return dict(states=states, rollout=rollout, batch=batch, prompts=prompts, tokens=tokens, scored=scored,
                update=update, weights=weights, top_k1=top_k1, gspo_batch=gspo_batch,
                gspo=_gspo_update(ParallelLayout.single(), states, gspo_batch))


def _check_cp_case(case, ref, name):
    r = ref["rollout"]
    assert torch.equal(torch.from_numpy(case["tokens"]), ref["tokens"]), name  # greedy on the generation copy
    assert case["scored_over_cp"] == ("cp" in name), name
    assert case["sp"] == (name.endswith("_sp"),) * 2, name
    want = (r.logprobs, r.ref_logprobs, r.values, r.scores, r.baselines)
    for i, (got, expected) in enumerate(zip(case["scores"], want)):
        got = torch.from_numpy(got)
        if i < 3:  # per token: read where the response token is real (packed rows hold 0 at padding)
            got, expected = got * r.response_mask, expected * r.response_mask
        # fp32: attention over 2 chunks of the keys, TP partial sums, stage boundaries
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5, msg=lambda m: f"{name} {i}: {m}")
    for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy", "actor_grad_norm",
                "critic_grad_norm"):
        # fp32: each cp rank sums the loss of its chunks, the gradients are summed over the cp group
        assert case["update"][key] == pytest.approx(ref["update"][key], rel=1e-4, abs=1e-6), (name, key)
    for k, w in case["weights"].items():
        # Adam's first step, as in the pipeline test: a wrong gradient is off by ~lr = 1e-3
        torch.testing.assert_close(torch.from_numpy(w), ref["weights"][k], rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{name} {k}: {m}")
    assert case["record"]["ppo_steps"] == 2 and case["record"]["response_length"] > 0
    # the sampling copy (cp = 1, no sequence parallel, KV cache; resharded where tp_g < tp or pp > 1) gives its
    # tokens the training forward's log-probs: fp32 rounding only (a wrongly resharded weight is off by O(0.1))
    assert case["record"]["rollout_logprob_diff_max"] < 1e-4 and case["record"]["rollout_kl"] < 1e-8, name


def test_context_parallel_ppo_matches_one_process():
    ref = _cp_reference()
    results = run_distributed(_world2_cp, 2, ref["states"], ref["prompts"], ref["scored"], ref["batch"],
                              ref["gspo_batch"], timeout=300)
    for rank, r in enumerate(results):
        for pack in (False, True):
            # every rank samples: 2 replicas of one whole model, nothing resharded
            assert r[pack]["gen"] == (1, rank, 2) and r[pack]["reshard"] == 0, pack
            _check_cp_case(r[pack], ref, f"cp2 pack={pack}")
            assert r[pack]["record"] == results[0][pack]["record"], pack  # the same rollout and metrics on both
            assert (r[pack]["sequences"] == results[0][pack]["sequences"]).all(), pack
        record, sequences = r["top_k1"]
        assert torch.equal(torch.from_numpy(sequences), ref["top_k1"][1])
        for key in ("reward", "kl", "response_length", "policy_loss", "value_loss", "approx_kl", "entropy"):
            # fp32, as above
            assert record[key] == pytest.approx(ref["top_k1"][0][key], rel=1e-4, abs=1e-6), key
        assert len({tuple(row) for row in r["group"].tolist()}) == 4  # no two cp ranks drew the same noise
        scores, seen = r["fn"]
        assert scores == [0.0, 0.0, 0.0, 1.0, 1.0]  # rows 0-2 scored on cp rank 0, rows 3-4 on cp rank 1
        assert seen == [[0, 1, 2]] if rank == 0 else [[3, 4, 4]]  # 5 rows padded to 6 by repeating the last
        for pack, (update, weights) in r["gspo"].items():
            for key in ("policy_loss", "approx_kl", "clipfrac", "actor_grad_norm"):  # fp32, as in _check_cp_case
                assert update[key] == pytest.approx(ref["gspo"][0][key], rel=1e-4, abs=1e-6), (pack, key)
            for k, w in weights.items():
                torch.testing.assert_close(torch.from_numpy(w), torch.from_numpy(ref["gspo"][1][k]), rtol=1e-4,
                                           atol=5e-5)
            assert 0 < update["clipfrac"] < 1  # clipped and unclipped responses
    assert results[1]["failure"] == "KeyError: 'checker broke'"
    assert results[0]["failure"].startswith("RuntimeError: the reward function failed on a rank")


def test_context_and_sequence_parallel_ppo_with_tp_pp_dp_match_one_process():
    ref = _cp_reference()
    results = run_distributed(_world4_cp, 4, ref["states"], ref["prompts"], ref["scored"], ref["batch"], timeout=480)
    for r in results:
        for name, case in r.items():
            if name == "tp2dp2_sp":  # sampling at tp 2 on a copy without sequence parallel: no bytes moved
                assert case["gen"][::2] == (2, 2) and case["reshard"] == 0, name
            elif name == "tp2pp2_sp":  # at tp 2, each rank gathering the other stage's layers
                assert case["gen"][::2] == (2, 2) and case["reshard"] > 0, name
            else:  # 4 whole-model sampling replicas, each gathering the other TP shard or the other stage's layers
                assert case["gen"][::2] == (1, 4) and case["reshard"] > 0, name
            _check_cp_case(case, ref, name)
            assert case["record"] == results[0][name]["record"], name
    assert sorted(r["tp2cp2_sp"]["gen"][1] for r in results) == [0, 1, 2, 3]  # one sampling replica per rank


# ---- launcher ------------------------------------------------------------------------------------
def test_launcher_errors(tmp_path, capsys):
    from engine.rlhf.ppo import PPO_LR
    from launch.rlhf import load_rlhf_run, main, read_prompts, validate_rlhf_run
    # a run file without learning-rate sections gets a valid fine-tuning schedule
    run = load_rlhf_run(None, {"checkpoint": {"actor_from": "a", "reward_from": "b"}})
    validate_rlhf_run(run, 1)
    assert run.actor_lr == run.critic_lr == PPO_LR
    assert main(["--iterations", "1"]) == 2
    assert "needs --actor-from" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--mini-batch-size", "5"]) == 2
    assert "mini_batch_size=5 must divide" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--critic-from", "c", "--advantage-estimator", "rloo"]) == 2
    assert "--critic-from c: advantage_estimator='rloo' trains no critic" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--dual-clip", "0.5"]) == 2
    assert "dual_clip=0.5 must be 0 (off) or > 1" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--policy-loss", "cispo", "--dual-clip", "3"]) == 2
    assert "dual_clip=3.0 caps PPO's clipped surrogate; policy_loss=cispo" in capsys.readouterr().err
    from launch.rlhf import build_parser, cli_overrides
    flags = ["--loss-agg-mode", "seq-mean-token-sum-norm", "--dual-clip", "3", "--clip-eps-high", "0.28",
             "--entropy-coef", "0.01", "--eval-interval", "5", "--overlong-buffer", "4", "--mask-truncated",
             "--min-reward-spread", "0.2", "--sampling-rounds", "3", "--critic-warmup", "2",
             "--advantage-estimator", "reinforce++", "--log-samples", "7", "--eval-fraction", "0.1",
             "--reward-fn", "m:f", "--reward-workers", "4", "--prompts", "p.jsonl", "--no-grpo-normalize-std",
             "--eval-samples", "4", "--eval-temperature", "0.7", "--generation-batch-size", "16",
             "--policy-loss", "gspo", "--clip-eps", "3e-4", "--rollout-is-cap", "2", "--rollout-is-level", "geometric",
             "--rollout-is-mode", "mask"]
    run = load_rlhf_run(None, cli_overrides(build_parser().parse_args(flags)))
    ppo = run.ppo
    assert (ppo.loss_agg_mode, ppo.dual_clip, ppo.clip_eps_high) == ("seq-mean-token-sum-norm", 3.0, 0.28)
    assert (ppo.entropy_coef, ppo.eval_interval, ppo.overlong_buffer, ppo.mask_truncated, ppo.min_reward_spread,
            ppo.sampling_rounds, ppo.critic_warmup, ppo.advantage_estimator) == (0.01, 5, 4, True, 0.2, 3, 2,
                                                                               "reinforce++")
    assert (run.log_samples, run.data.eval_fraction, run.reward.function, run.reward.workers) == (7, 0.1, "m:f", 4)
    assert run.data.prompts == "p.jsonl" and run.ppo.grpo_normalize_std is False
    assert (run.ppo.eval_samples, run.ppo.eval_temperature, run.ppo.generation_batch_size) == (4, 0.7, 16)
    assert (run.ppo.policy_loss, run.ppo.clip_eps, run.ppo.rollout_is_cap, run.ppo.rollout_is_level,
            run.ppo.rollout_is_mode) == ("gspo", 3e-4, 2.0, "geometric", "mask")
    assert load_rlhf_run(None).ppo.policy_loss == "ppo" and load_rlhf_run(None).ppo.rollout_is_cap == 0
    # sequence parallel: the flag reaches the run, the sequence must split over tp
    run = load_rlhf_run(None, cli_overrides(build_parser().parse_args(["--sequence-parallel", "--tp", "2",
                                                                         "--max-new-tokens", "31"])))
    assert run.sequence_parallel is True and load_rlhf_run(None).sequence_parallel is False
    off = build_parser().parse_args(["--no-sequence-parallel"])
    assert load_rlhf_run(None, {"sequence_parallel": True, **cli_overrides(off)}).sequence_parallel is False
    assert main(["--actor-from", "a", "--reward-from", "b", "--sequence-parallel"]) == 2
    assert "true needs tp > 1 (it splits the sequence over the TP ranks; tp=1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"sequence parallel splits each rank's 63 tokens \(max_prompt_length \+ "
                                         r"max_new_tokens\) over tp=2: they must be divisible by tp"):
        run.ppo.validate(1, 2, sequence_parallel=True)
    # context parallelism: the flag reaches the run, the world must hold the cp ranks, the sequences must split
    run = load_rlhf_run(None, cli_overrides(build_parser().parse_args(["--cp", "2", "--actor-from", "a",
                                                                         "--reward-from", "b", "--max-new-tokens", "30"])))
    assert run.cp == 2
    with pytest.raises(ValueError, match=r"max_prompt_length \+ max_new_tokens = 62 must be divisible by 4"):
        validate_rlhf_run(run, 2)
    assert main(["--actor-from", "a", "--reward-from", "b", "--cp", "2"]) == 2
    assert "world_size=1 is not divisible by tp=1 x pp=1 x cp=2" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--async-save"]) == 2
    assert "--async-save needs --save DIR" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--save", "s", "--keep-last", "0"]) == 2
    assert "checkpoint.keep_last=0 must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n" + "{oops\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        read_prompts(str(bad))
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected"):
        read_prompts(str(bad))


def launcher_setup(tmp_path):
    """For launch.rlhf subprocess tests: the repository root, the tiny 2-layer config (``tmp_path/model.yaml``),
    random SFT and reward-model checkpoints in ``tmp_path/sft`` and ``tmp_path/rm``, and the environment of a
    fresh (non-torchrun) process."""
    import os
    from pathlib import Path

    from engine.train.checkpoint import save_checkpoint
    root = Path(__file__).resolve().parent.parent
    config = GLMConfig.preset("tiny").replace(num_layers=2)
    (tmp_path / "model.yaml").write_text("preset: tiny\nnum_layers: 2\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    save_checkpoint(tmp_path / "rm", 1, GLMForScalarHead(config), None, ParallelLayout.single(), config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return root, config, env


def test_torchrun_pp2_ppo_iteration_writes_metrics_and_checkpoints(tmp_path):
    """launch.rlhf under torchrun (2 processes, pp=2: sampling on the actor gathered to every layer per rank)
    from language-model and reward checkpoints; then a resume in one process."""
    import subprocess
    import sys

    from engine.train.checkpoint import read_full_model_state
    root, config, env = launcher_setup(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "launch.rlhf", "--model", str(tmp_path / "model.yaml"), "--pp", "2", "--iterations", "2",
           "--rollout-prompts", "2", "--samples-per-prompt", "2", "--mini-batch-size", "4", "--micro-batch-size",
           "2", "--max-new-tokens", "8", "--actor-from", str(tmp_path / "sft"), "--reward-from", str(tmp_path / "rm"),
           "--log-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ppo"), "--save-interval", "1",
           "--keep-last", "1", "--async-save"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    for r in lines:
        assert all(math.isfinite(r[k]) for k in ("reward", "kl", "response_length", "generate_s"))
    for name in ("actor", "critic"):  # saved in the background after each iteration, the newest kept
        assert sorted(p.name for p in (tmp_path / "ppo" / name).iterdir()) == ["latest", "step_000002"]
        saved, state = read_full_model_state(tmp_path / "ppo" / name)
        assert saved == config and ("value_head.weight" in state) == (name == "critic")
    assert "tp=1 pp=2 vpp=1 cp=1 dp=1" in proc.stdout
    # resume the pp=2 run in one process (resharded): one more iteration, numbered 2
    resume = [sys.executable, "-m", "launch.rlhf"] + cmd[cmd.index("launch.rlhf") + 1:]
    resume[resume.index("--pp") + 1], resume[resume.index("--iterations") + 1] = "1", "3"
    resume[resume.index("--log-dir") + 1] = str(tmp_path / "resumed")
    proc = subprocess.run(resume + ["--load", str(tmp_path / "ppo")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    (line,) = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 2 and math.isfinite(line["reward"])
    # a critic-free run (GRPO) from the same checkpoints, context parallel (each 32 + 8 token sequence split over
    # the 2 ranks): three models, no critic checkpoint written
    grpo = cmd[:]
    grpo[grpo.index("--pp")], grpo[grpo.index("--iterations") + 1] = "--cp", "1"
    grpo[grpo.index("--log-dir") + 1], grpo[grpo.index("--save") + 1] = str(tmp_path / "grpo"), str(tmp_path / "g")
    proc = subprocess.run(grpo + ["--advantage-estimator", "grpo", "--pack-sequences"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PPO (grpo)" in proc.stdout and "3 models" in proc.stdout and "value" not in proc.stdout
    assert "tp=1 pp=1 vpp=1 cp=2 dp=1" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["actor"]
    (line,) = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= line["update_rows"] <= 4  # packed: at most the mini-batch's 4 rows
    # tp=2 with sequence parallelism: the models are built with it (the loop reads it from their spec)
    sp = cmd[:]
    sp[sp.index("--pp")], sp[sp.index("--iterations") + 1] = "--tp", "1"
    sp[sp.index("--log-dir") + 1], sp[sp.index("--save") + 1] = str(tmp_path / "sp"), str(tmp_path / "s")
    proc = subprocess.run(sp + ["--sequence-parallel"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tp=2 pp=1 vpp=1 cp=1 dp=1 sequence-parallel" in proc.stdout


def test_keep_last_waits_for_every_model_and_load_takes_a_whole_save(tmp_path, monkeypatch):
    """keep_last prunes a step only once actor and critic both committed a newer one; a save whose critic
    commit failed leaves the actor a step ahead, and load resumes from the newest step both hold. A
    synchronous save waits for an asynchronous one in flight (their temp dirs and commits never race)."""
    import threading

    from engine.train import checkpoint as ckpt
    d = tmp_path / "ck"
    loop = _loop(_ppo(iterations=4))
    commits, release = [], threading.Event()
    commit, persist = ckpt._commit, ckpt._persist
    monkeypatch.setattr(ckpt, "_commit", lambda directory, tmp, name, keep: (commits.append((directory.name, name)),
                                                                            commit(directory, tmp, name, keep))[1])
    monkeypatch.setattr(ckpt, "_persist", lambda *a, **k: (
        release.wait(30) if threading.current_thread() is not threading.main_thread() else None, persist(*a, **k))[1])
    loop.iteration()
    loop.save(d, keep_last=1, async_save=True)  # held back until released
    loop.iteration()
    threading.Timer(0.3, release.set).start()
    loop.save(d, keep_last=1)  # synchronous: waits for the step-1 saves, then writes step 2
    # the two background step-1 commits (either order) come before the synchronous step-2 ones
    assert sorted(commits[:2]) == [("actor", "step_000001"), ("critic", "step_000001")]
    assert commits[2:] == [("actor", "step_000002"), ("critic", "step_000002")]
    assert [ckpt.committed_steps(d / n) for n in ("actor", "critic")] == [[2], [2]]
    # step 3: the critic's commit fails; nothing is pruned, and load resumes from step 2 for both
    loop.iteration()
    monkeypatch.setattr(ckpt, "_commit", lambda directory, tmp, name, keep: (
        (_ for _ in ()).throw(OSError("killed")) if directory.name == "critic" else commit(directory, tmp, name, keep)))
    loop.save(d, keep_last=1, async_save=True)
    with pytest.raises(ckpt.CheckpointError, match="killed"):
        loop.close_savers()
    assert [ckpt.committed_steps(d / n) for n in ("actor", "critic")] == [[2, 3], [2]]
    resumed = _loop(_ppo(iterations=4))
    resumed.load(d)
    assert resumed.iterations_done == 2


def test_save_and_resume_continue_exactly(tmp_path):
    """3 iterations straight == 1, save (asynchronously, while a further iteration runs), a fresh loop
    (other initial actor/critic weights) loads and runs 2 more: identical metrics (bitwise on CPU), since
    prompts and sampling seeds are functions of the iteration and the baseline cache travels with the
    checkpoint."""
    timing = ("generate_s", "score_s", "gather_s", "train_s", "seconds")
    # the running score moments and the adapted KL coefficient travel too
    config = _ppo(iterations=3, normalize_scores=True, kl_target=0.01, kl_horizon=32)
    straight = _loop(config)
    expected = [straight.iteration() for _ in range(3)]
    first = _loop(config)
    first.iteration()
    first.save(tmp_path / "ck", async_save=True)  # written in the background while the loop goes on
    cache, kl_coef = dict(first._baseline_cache), first.kl_coef
    first.iteration()  # changes the weights, baselines and KL coefficient the save copied
    first.close_savers()
    _, _, reference, reward = _models(seed=0)
    actor, critic, _, _ = _models(seed=1)
    second = _loop(config, models=(actor, critic, reference, reward))
    second.load(tmp_path / "ck")
    assert second.iterations_done == 1 and second._baseline_cache == cache
    assert second.kl_coef == kl_coef != config.kl_coef
    resumed = [second.iteration() for _ in range(2)]
    for want, got in zip(expected[1:], resumed):
        assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    from engine.train.checkpoint import CheckpointError, save_checkpoint
    other = _loop(_ppo(iterations=3))
    for name, model, trainer in (("actor", other.actor, other.actor_trainer), ("critic", other.critic,
                                                                               other.critic_trainer)):
        save_checkpoint(tmp_path / "sft" / name, 1, model, trainer.optimizer, ParallelLayout.single(), _config(),
                        extra_state={"mode": "sft"})
    # a fixed KL coefficient is configuration: the resuming run's value holds
    fixed = _loop(_ppo(iterations=3, kl_coef=0.5))
    fixed.load(tmp_path / "ck")
    assert fixed.kl_coef == 0.5
    with pytest.raises(CheckpointError, match="holds a 'sft' checkpoint, not a PPO actor"):
        other.load(tmp_path / "sft")
    save_checkpoint(tmp_path / "weights" / "actor", 1, [actor], None, ParallelLayout.single(), _config())
    with pytest.raises(CheckpointError, match=r"no iteration that actor and critic both committed .*critic \[\]"):
        other.load(tmp_path / "weights")
    save_checkpoint(tmp_path / "weights" / "critic", 1, [critic], None, ParallelLayout.single(), _config())
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        other.load(tmp_path / "weights")


def test_rollout_moves_between_devices_but_its_prompt_index():
    """Rollout.to moves every tensor, the score parts included, but the prompt index (into the host prompt list)."""
    from engine.rlhf.ppo import Rollout
    r = Rollout(*[torch.zeros(2, 3)] * 9, prompt_index=torch.tensor([0, 1]), sampler_logprobs=torch.zeros(2, 3),
                score_parts={"reward_model": torch.ones(2)})
    moved = r.to("meta")
    assert all(getattr(moved, f.name).device.type == "meta" for f in dataclasses.fields(Rollout)
               if f.name not in ("prompt_index", "score_parts"))
    assert moved.prompt_index is r.prompt_index and moved.score_parts["reward_model"].device.type == "meta"
    assert r.to("cpu").sequences is r.sequences  # already there: no copy
