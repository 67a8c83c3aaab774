"""PPO with a LoRA actor whose reference is itself with the adapters off (``PPOLoop(reference=None)``):
the same numbers as an explicit reference copy of the base model, one model fewer resident, and the
same on a tp2 x pp2 layout that samples on a resharded generation copy (adapters resharded with their
weights; the reference's copy without them)."""
import copy
import dataclasses

import pytest
import torch

from engine.model.glm import GLMForCausalLM, GLMForScalarHead
from engine.model.lora import LoRAConfig, add_lora, adapters, has_lora
from engine.parallel import ParallelDims, ParallelLayout
from engine.rlhf.ppo import PPOLoop, left_pad_prompts
from tests._dist import run_distributed
from tests.test_rlhf_ppo import EOS, LR, OPTIM, PAD, _config, _ppo, _prompts

LORA = LoRAConfig(rank=4, alpha=8.0)


def _lora_models(seed=0):
    """Actor (adapters with random B, so it differs from its base), critic, reward, and the base actor."""
    torch.manual_seed(seed)
    actor, critic, reward = GLMForCausalLM(_config()), GLMForScalarHead(_config()), GLMForScalarHead(_config())
    base = copy.deepcopy(actor)
    add_lora(actor, LORA, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a in adapters(actor):
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.3)
    return actor, critic, reward, base


def _lora_loop(models, reference, config=None, layout=None) -> PPOLoop:
    actor, critic, reward, _ = models
    return PPOLoop(config or _ppo(), _config(), layout or ParallelLayout.single(), actor, critic, reference, reward,
                   _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR)


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_actor_with_adapters_off_is_the_reference():
    """Two iterations (rollout with reference baselines and reference log-probs, GAE update) with
    ``reference=None`` equal, bitwise, the same run with an explicit reference copy of the base weights:
    the adapters-off forward is the plain forward. The copy's bytes are all the run saves."""
    models = _lora_models()
    with_copy = _lora_loop(copy.deepcopy(models), copy.deepcopy(models[3]))
    shared = _lora_loop(copy.deepcopy(models), None)
    assert shared.reference is shared.actor and "reference" not in shared.offloader.groups
    records = [(with_copy.iteration(), shared.iteration()) for _ in range(2)]
    for a, b in records:
        for key in ("reward", "reward_vs_reference", "reference_reward", "kl", "policy_loss", "value_loss",
                    "actor_grad_norm", "approx_kl", "response_length"):
            assert a[key] == b[key], key
        assert a["kl"] != 0  # the actor is not its reference (random B)
        # one model fewer on the device while scoring
        assert a["resident_bytes_score"] - b["resident_bytes_score"] == _model_bytes(models[3])
    for (name, p), q in zip(with_copy.actor[0].state_dict().items(), shared.actor[0].state_dict().values()):
        assert torch.equal(p, q), name
    start = models[0].state_dict()
    after = shared.actor[0].state_dict()
    assert all(torch.equal(after[n], start[n]) for n in start if ".lora." not in n)  # the base stays frozen
    assert all(not torch.equal(after[n], start[n]) for n in start if ".lora.B" in n)  # the adapters train


def test_reference_none_needs_adapters():
    actor, critic, reward, _ = _lora_models()
    with pytest.raises(ValueError, match="reference=None needs an actor with LoRA adapters"):
        PPOLoop(_ppo(), _config(), ParallelLayout.single(), GLMForCausalLM(_config()), critic, None, reward,
                _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR)


def _sharded_lora(states, layout):
    from engine.parallel.pipeline import build_model_chunks
    from engine.parallel.sharding import load_full_into
    out = []
    for cls, state, lora in ((GLMForCausalLM, states[0], True), (GLMForScalarHead, states[1], False),
                             (GLMForScalarHead, states[2], False)):
        chunks = build_model_chunks(_config(), layout, model_cls=cls, seed=None)
        if lora:
            add_lora(chunks, LORA, layout)
        for chunk in chunks:
            load_full_into(chunk, state, layout)
        out.append(chunks[0] if len(chunks) == 1 else chunks)
    return out


def _world4(rank, world_size, states, prompts_greedy, scored, batch):
    from engine.model.generation import SamplingParams, generate
    from engine.parallel.comm import CommLedger
    from engine.parallel.sharding import gather_full_state_dict
    out = {}
    sequences, attention, prompt_index = scored
    for name, dims, tp_g in (("tp2pp2_gen1", ParallelDims(tp=2, pp=2), 1), ("tp2pp2", ParallelDims(tp=2, pp=2), None),
                             ("tp4_gen2", ParallelDims(tp=4), 2)):  # tp4: the 2 KV heads replicated over 2 ranks
        layout = ParallelLayout.build(dims, name=name)
        actor, critic, reward = _sharded_lora(states, layout)
        loop = PPOLoop(_ppo(generation_tp=tp_g, offload=True), _config(), layout, actor, critic, None, reward,
                       _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR)
        ids, mask = left_pad_prompts(prompts_greedy, 8, PAD)
        model = loop.generation_model()
        greedy = generate(model, ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS]))
        base_copy = loop.generation_model(adapters=False)
        with loop._as_model("reference"):
            ref_logprobs = loop._token_logprobs(loop.reference, sequences, attention)
        scores = (loop._token_logprobs(loop.actor, sequences, attention), ref_logprobs, loop._baselines(prompt_index))
        update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
        weights = gather_full_state_dict(loop.actor[0], _config(), dataclasses.replace(layout, ledger=CommLedger()))
        record = loop.iteration()
        out[name] = dict(tokens=greedy.response_ids.numpy(), adapters=has_lora(model), base_adapters=has_lora(base_copy),
                         scores=[t.numpy() for t in scores], update=update,
                         weights={k: v.clone().numpy() for k, v in weights.items()},
                         diff=record["rollout_logprob_diff_max"], steps=record["ppo_steps"])
    return out


def test_tp2_pp2_and_tp4_lora_ppo_match_one_process():
    """tp2 x pp2 and tp4 (replicated KV heads, sampling at tp_g = 2): greedy decoding on the generation copy
    (tp2 x pp2 at tp_g = 1: adapters resharded to whole ones; tp_g = 2), the
    reference's log-probs and its baseline answers (sampled on a copy without the adapters), one update on
    a fixed batch and a full iteration, against one process. Tolerances as
    test_rlhf_ppo.test_pipeline_layouts_reshard_score_and_update_like_one_process (fp32, another reduction
    order: 2e-5 on log-probs, 1e-4 relative on update statistics, Adam's +-lr steps on weights)."""
    from engine.model.generation import SamplingParams, generate
    models = _lora_models(seed=3)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models[:3]]
    loop = _lora_loop(models, None)
    rollout, _ = loop.rollout(0)
    batch, _ = loop.advantages(rollout)
    prompts = _prompts(3, seed=11)
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    ref_tokens = generate(loop.actor[0], ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS])).response_ids
    scored = (rollout.sequences, rollout.attention_mask, rollout.prompt_index)
    ref_scores = (rollout.logprobs, rollout.ref_logprobs, rollout.baselines)
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() > 1e-2  # the adapters matter
    ref_update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    ref_weights = {k: v.clone() for k, v in loop.actor[0].state_dict().items()}
    results = run_distributed(_world4, 4, states, prompts, scored, batch, timeout=480)
    for rank, r in enumerate(results):
        for name, case in r.items():
            assert case["adapters"] and not case["base_adapters"], name
            assert torch.equal(torch.from_numpy(case["tokens"]), ref_tokens), name
            for got, want in zip(case["scores"], ref_scores):
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
            for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "actor_grad_norm", "critic_grad_norm"):
                assert case["update"][key] == pytest.approx(ref_update[key], rel=1e-4, abs=1e-6), (name, key)
            assert case["weights"].keys() == ref_weights.keys()
            for k, w in case["weights"].items():
                torch.testing.assert_close(torch.from_numpy(w), ref_weights[k], rtol=1e-4, atol=5e-5,
                                           msg=lambda m: f"{name} {k}: {m}")
            assert case["steps"] == 2 and case["diff"] < 1e-4, name  # sampler (adapters resharded) == trainer


def test_launcher_lora_actor_and_critic_save_and_resume(tmp_path):
    """launch.rlhf --lora-rank --critic-lora: one model fewer (the reference), adapters saved with each
    model's checkpoint over frozen base weights, a resume continues them and one without the adapters is
    refused; --critic-lora needs --lora-rank and a critic."""
    import json
    import subprocess
    import sys

    from engine.train.checkpoint import read_full_model_state, read_manifest
    from launch.rlhf import load_rlhf_run, validate_rlhf_run
    from tests.test_rlhf_ppo import launcher_setup
    root, _, env = launcher_setup(tmp_path)

    def run(name, *flags):
        cmd = [sys.executable, "-m", "launch.rlhf", "--model", str(tmp_path / "model.yaml"), "--rollout-prompts", "2",
               "--samples-per-prompt", "2", "--mini-batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens",
               "8", "--actor-from", str(tmp_path / "sft"), "--reward-from", str(tmp_path / "rm"), "--log-dir",
               str(tmp_path / name), *flags]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    lora = ("--lora-rank", "4", "--critic-lora")
    proc = run("first", "--iterations", "1", "--save", str(tmp_path / "ppo"), *lora)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 models, LoRA rank 4 on the actor and critic (reference: the actor with its adapters off)" in proc.stdout
    for name, start in (("actor", "sft"), ("critic", "rm")):  # the critic starts from the reward model
        manifest = read_manifest(tmp_path / "ppo" / name)
        assert manifest["lora"] == {"rank": 4, "scale": 4.0, "targets": ["dense", "down", "gate_up", "qkv"]}, name
        _, base = read_full_model_state(tmp_path / start)
        _, state = read_full_model_state(tmp_path / "ppo" / name)
        assert all(torch.equal(state[n], base[n]) for n in base if n != "value_head.weight"), name
        if name == "critic":  # trained with the adapters
            assert not torch.equal(state["value_head.weight"], base["value_head.weight"])
        assert any(state[n].abs().max() > 0 for n in state if n.endswith(".lora.B")), name
    proc = run("second", "--iterations", "2", "--load", str(tmp_path / "ppo"), *lora)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout + proc.stderr
    (line,) = [json.loads(x) for x in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 1
    proc = run("plain", "--iterations", "2", "--load", str(tmp_path / "ppo"))
    assert proc.returncode == 2 and "saved with LoRA adapters" in proc.stderr, proc.stderr
    preset = str(root / "configs" / "runs" / "ppo.yaml")
    ck = {"actor_from": "a", "reward_from": "r"}
    with pytest.raises(ValueError, match="true needs lora.rank > 0"):
        validate_rlhf_run(load_rlhf_run(preset, {"checkpoint": ck, "critic_lora": True}), 1)
    with pytest.raises(ValueError, match="advantage_estimator='grpo' trains no critic"):
        validate_rlhf_run(load_rlhf_run(preset, {"checkpoint": ck, "critic_lora": True, "lora": {"rank": 2},
                                                 "ppo": {"advantage_estimator": "grpo"}}), 1)
    with pytest.raises(ValueError, match="unknown lora keys"):
        load_rlhf_run(preset, {"lora": {"rank": 2, "dropout": 0.1}})
