"""Rule-based and remote rewards (engine.rlhf.rewards) and the PPO features built around them: a function sees
each row's decoded prompt, response and record, and a service each batch; their scores are the rollout's (added
to a reward model's when both), identical on every rank of a model-parallel group; a reward that favours some
first tokens makes them likelier; dynamic sampling draws until enough prompts pass; held-out evaluation scores
actor against reference (one or k answers per prompt); launch.rlhf runs with --reward-fn or --reward-url and no
reward model, and configs/runs/grpo.yaml runs end to end."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.model.generation import SamplingParams, generate
from engine.parallel import ParallelDims, ParallelLayout
from engine.rlhf.ppo import PPOLoop, left_pad_prompts
from engine.rlhf.rewards import FunctionReward, final_answer, load_reward_fn, math_answer, normalize_answer
from tests._dist import run_distributed
from tests.test_rlhf_ppo import EOS, LR, OPTIM, PAD, _config, _models, _ppo, _prompts


def _decode(ids) -> str:
    return " ".join(str(i) for i in ids)


def _row_fn(prompt: str, response: str, sample) -> float:
    """A score that depends on all three arguments: the response's token count, plus the record's bonus,
    plus a hundredth of the prompt's first token."""
    return len(response.split()) + sample["bonus"] + int(prompt.split()[0]) / 100


def _function_reward(prompts, fn=_row_fn) -> FunctionReward:
    texts = [_decode(p) for p in prompts]
    return FunctionReward(fn, _decode, texts, [{"prompt": t, "bonus": 10.0 * i} for i, t in enumerate(texts)])


def _expected(prompts, rollout, loop) -> torch.Tensor:
    """_row_fn by hand on each row of the rollout (prompt numbering: the list given to the loop)."""
    out = []
    for row, index in enumerate(rollout.prompt_index.tolist()):
        origin = int(loop.prompt_source[index])
        n = int(rollout.response_mask[row].sum())
        out.append(n + 10.0 * origin + prompts[origin][0] / 100)
    return torch.tensor(out)


# ---- the module ------------------------------------------------------------------------------------------
def test_load_reward_fn_by_module_or_file_and_its_errors(tmp_path):
    assert load_reward_fn("engine.rlhf.rewards:math_answer") is math_answer
    path = tmp_path / "my_reward.py"
    (tmp_path / "my_reward_helpers.py").write_text("VALUE = 2.5\n")  # imported from beside the file
    path.write_text("from my_reward_helpers import VALUE\ndef score(prompt, response, sample):\n    return VALUE\n"
                    "LIMIT = 3\n")
    assert load_reward_fn(f"{path}:score")("p", "r", {}) == 2.5
    (tmp_path / "broken.py").write_text("raise RuntimeError('no sandbox here')\n")
    for spec, needle in [("engine.rlhf.rewards", "expected 'package.module:function'"),
                         ("a:b:c", "expected"),
                         (f"{tmp_path / 'absent.py'}:score", "no file"),
                         (f"{tmp_path / 'broken.py'}:score", "running .*broken.py failed: RuntimeError: no sandbox"),
                         ("no_such_module_xyz:f", "importing no_such_module_xyz failed: ModuleNotFoundError"),
                         ("engine.rlhf.rewards:absent", "has no attribute 'absent'"),
                         (f"{path}:LIMIT", "is a int, not a function")]:
        with pytest.raises(ValueError, match=needle):
            load_reward_fn(spec)


@pytest.mark.parametrize("text, answer", [
    ("so the total is \\boxed{\\frac{1}{2}} apples", "\\frac{1}{2}"),
    ("first \\boxed{3}, then \\boxed{4}", "4"),
    ("\\boxed{7 unclosed, but 12 is the last number", "12"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72\nextra", "72"),
    ("#### 72 clips", "72"),
    ("#### Paris", "Paris"),
    ("pages 10-12", "12"),
    ("she has 3,4", "4"),
    ("1,000,000 grains", "1,000,000"),
    ("12 eggs, 3 eaten, 4 baked: 5 left", "5"),
    ("-3.5 degrees", "-3.5"),
    ("no numbers at all", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_math_answer_normalises_both_sides():
    assert normalize_answer(" $1,000.0. ") == "1000" and normalize_answer("0.50") == "0.5"
    assert normalize_answer("123456789012345678") != normalize_answer("123456789012345679")  # exact, not float
    assert normalize_answer("Paris.") == "paris"
    assert math_answer("q", "#### 1,000", {"answer": 1000}) == 1.0
    assert math_answer("q", "it is \\boxed{Paris}", {"answer": "paris"}) == 1.0
    assert math_answer("q", "about 999", {"answer": "1000"}) == 0.0
    assert math_answer("q", "no idea", {"answer": "1000"}) == 0.0
    with pytest.raises(KeyError, match="needs an 'answer' field"):
        math_answer("q", "1", {"prompt": "q"})


def test_function_reward_decodes_the_masked_response_and_rejects_bad_scores():
    seen = []

    def fn(prompt, response, sample):
        seen.append((prompt, response, sample["prompt"]))
        return 1
    reward = FunctionReward(fn, _decode, ["p0", "p1"], name="fn")
    scores = reward(torch.tensor([1, 0]), torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 1.0]
    assert seen == [("p1", "5 6", "p1"), ("p0", "7", "p0")]  # padding left out; records follow prompts
    rows = (torch.tensor([0]), torch.tensor([[5]]), torch.tensor([[1]]))
    for bad, error, needle in [(lambda *a: float("nan"), ValueError, "returned nan for row 0 .*finite"),
                               (lambda *a: "good", ValueError, "returned 'good' \\(str\\) .*must return a number"),
                               (lambda *a: 1 / 0, RuntimeError,
                                "reward function bad failed on row 0 \\(prompt 0: 'p0', response '5'\\): "
                                "ZeroDivisionError")]:
        with pytest.raises(error, match=needle):
            FunctionReward(bad, _decode, ["p0"], name="bad")(*rows)
    # ids beyond the tokenizer's vocabulary (a padded model vocabulary) have no text: left out
    wide = FunctionReward(fn, _decode, ["p0"], vocab_size=7)
    seen.clear()
    wide(torch.tensor([0]), torch.tensor([[5, 9, 6]]), torch.tensor([[1, 1, 1]]))
    assert seen == [("p0", "5 6", "p0")]

    def strict_decode(ids):
        raise ValueError(f"token ids {ids} are outside the vocabulary")
    with pytest.raises(RuntimeError, match="failed on row 0 \\(prompt 0: 'p0', decoding the response\\): ValueError"):
        FunctionReward(fn, strict_decode, ["p0"], name="fn")(*rows)
    # workers: rows scored at once (four calls meet at a barrier, which one thread at a time never passes)
    barrier = threading.Barrier(4, timeout=60)

    def meets(prompt, response, sample):
        barrier.wait()
        return len(response.split())
    together = FunctionReward(meets, _decode, ["p0", "p1"], workers=4)
    got = together(torch.tensor([0, 1, 0, 1]), torch.tensor([[5, 6], [7, 0], [8, 9], [1, 0]]),
                   torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]]))
    assert got.tolist() == [2.0, 1.0, 2.0, 1.0]  # in row order
    with pytest.raises(RuntimeError, match="failed on row 0 .*ZeroDivisionError"):
        FunctionReward(lambda *a: 1 / 0, _decode, ["p0"], workers=2)(torch.tensor([0, 0]), torch.tensor([[5], [6]]),
                                                                      torch.tensor([[1], [1]]))
    with pytest.raises(ValueError, match="workers=0 must be a positive integer"):
        FunctionReward(fn, _decode, ["a"], workers=0)
    # fields a function declares it reads are checked on every record up front
    with pytest.raises(ValueError, match=r"reads the fields \['answer'\] of each prompt record, but 1 of 2 records "
                                         r"lack one \(the first: record 1, fields \['prompt'\]\)"):
        FunctionReward(math_answer, _decode, ["a", "b"], [{"prompt": "a", "answer": 1}, {"prompt": "b"}])

    def one_field(prompt, response, sample):
        return 0.0
    one_field.required_fields = "answer"  # a single name, not its letters
    FunctionReward(one_field, _decode, ["a"], [{"prompt": "a", "answer": 1}])
    with pytest.raises(ValueError, match="2 prompts but 1 sample records"):
        FunctionReward(fn, _decode, ["a", "b"], [{}])
    with pytest.raises(ValueError, match=r"must be \[n\], \[n, T\] and \[n, T\]"):
        reward(torch.tensor([0, 1]), torch.tensor([[5]]), torch.tensor([[1]]))


class _RewardService:
    """A local reward service on a free port, in a thread: answers {"rewards": [len(response words) + bonus]}, or
    what ``script`` says for its next requests ("500", "404", "junk", "short")."""

    def __init__(self):
        import http.server
        self.script, self.requests = [], []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.requests.append(body)
                action = service.script.pop(0) if service.script else "ok"
                if action == "garbage":  # not HTTP at all
                    self.wfile.write(b"garbage\r\n\r\n")
                    return
                if action == "stall":  # longer than the client's timeout
                    time.sleep(1.0)
                if action in ("500", "404", "429"):
                    self.send_response(int(action))
                    self.end_headers()
                    self.wfile.write(b"scorer busy")
                    return
                rewards = [len(r.split()) + rec.get("bonus", 0) for r, rec in zip(body["responses"], body["records"])]
                payload = {"junk": b"<html>", "short": json.dumps({"rewards": rewards[:-1]}).encode()}.get(
                    action, json.dumps({"rewards": rewards}).encode())
                self.send_response(200)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_reward_posts_the_batch_and_reports_service_failures():
    from engine.rlhf.rewards import RemoteReward
    service = _RewardService()
    try:
        reward = RemoteReward(service.url, _decode, ["p0", "p1"], [{"bonus": 10}, {"bonus": 20}], backoff=0.0)
        rows = (torch.tensor([1, 0]), torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
        assert reward(*rows).tolist() == [22.0, 11.0]
        assert service.requests[-1] == {"prompts": ["p1", "p0"], "responses": ["5 6", "7"],
                                        "records": [{"bonus": 20}, {"bonus": 10}]}  # one request, padding left out
        service.script = ["500", "429"]  # retried until it answers
        assert reward(*rows).tolist() == [22.0, 11.0] and len(service.requests) == 4
        service.script = ["garbage", "stall"]  # a reply that is not HTTP, a reply too late: retried too
        hasty = RemoteReward(service.url, _decode, ["p0", "p1"], [{"bonus": 10}, {"bonus": 20}], backoff=0.0,
                             timeout=0.3)
        assert hasty(*rows).tolist() == [22.0, 11.0] and len(service.requests) == 7
        for script, error, needle in [(["500"] * 4, RuntimeError, "answered HTTP 500: scorer busy"),
                                      (["404"], RuntimeError, "answered HTTP 404"),
                                      (["junk"], ValueError, "answered non-JSON"),
                                      (["short"], ValueError, "expected .*rewards.* with 2 numbers")]:
            service.script = list(script)
            with pytest.raises(error, match=needle):
                reward(*rows)
    finally:
        service.close()
    with pytest.raises(RuntimeError, match="unreachable after 2 attempts"):
        RemoteReward(service.url, _decode, ["p0", "p1"], retries=1, backoff=0.0, timeout=5)(*rows)
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        RemoteReward("localhost:8000", _decode, ["p0"])
    with pytest.raises(ValueError, match="prompt record 1 cannot be sent as JSON"):
        RemoteReward("http://x", _decode, ["p0", "p1"], [{"a": 1.0}, {"a": float("nan")}])


# ---- in the PPO loop --------------------------------------------------------------------------------------
def test_ppo_scored_by_a_function_alone():
    """GRPO with a reward function and no reward model: the rollout's scores are the function's on each row's
    decoded prompt, response and record, with the caller's prompt numbering (a prompt too long for the
    loop is left out, shifting the loop's own); no reward model is resident; an iteration trains."""
    prompts = [list(range(3, 13))] + _prompts()  # 10 tokens > max_prompt_length 8: left out
    actor, _, reference, _ = _models(seed=3)
    loop = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), ParallelLayout.single(), actor, None, reference, None,
                   prompts, [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=_function_reward(prompts))
    assert loop.dropped_prompts == 1 and loop.prompt_source.tolist() == list(range(1, 13))
    assert sorted(loop.offloader.groups) == ["actor", "actor.optim", "reference"]
    rollout, times = loop.rollout(0)
    assert torch.equal(rollout.scores, _expected(prompts, rollout, loop))
    assert rollout.score_parts == {} and times["reward_fn_s"] > 0
    record = loop.iteration()
    assert record["ppo_steps"] == 2 and math.isfinite(record["policy_loss"])
    with pytest.raises(ValueError, match="needs a reward: a reward model, a reward function"):
        PPOLoop(_ppo(advantage_estimator="grpo"), _config(), ParallelLayout.single(), actor, None, reference, None,
                prompts, [EOS], PAD)


def test_reward_model_and_function_add_up_also_for_the_reference_baseline():
    """Both sources: each row's score is the reward model's plus the function's (the parts are reported), and
    a prompt's reference baseline is the same sum for the reference model's greedy answer."""
    prompts = _prompts()
    loop = PPOLoop(_ppo(), _config(), ParallelLayout.single(), *_models(seed=4), prompts, [EOS], PAD, OPTIM, OPTIM,
                   LR, LR, reward_fn=_function_reward(prompts))
    rollout, _ = loop.rollout(0)
    parts = rollout.score_parts
    assert sorted(parts) == ["reward_function", "reward_model"]
    assert torch.equal(parts["reward_function"], _expected(prompts, rollout, loop))
    rm = loop._scores(loop.reward, rollout.sequences, rollout.attention_mask)
    torch.testing.assert_close(parts["reward_model"], rm, rtol=0, atol=1e-6)  # another micro-batching
    assert torch.equal(rollout.scores, parts["reward_model"] + parts["reward_function"])
    p = int(rollout.prompt_index[0])
    ids, mask = left_pad_prompts([prompts[p]], 8, PAD)
    greedy = generate(loop.reference[0], ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS],
                                                                   pad_token_id=PAD))
    resp, resp_mask = loop._pad_response(greedy.response_ids, greedy.response_mask)
    rm_ref = loop._scores(loop.reward, torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1))
    fn_ref = int(resp_mask.sum()) + 10.0 * p + prompts[p][0] / 100
    assert loop._baseline_cache[p] == pytest.approx(float(rm_ref) + fn_ref, abs=1e-5)
    batch, stats = loop.advantages(rollout)
    assert stats["reward_model"] == pytest.approx(parts["reward_model"].mean().item())
    assert stats["reward_function"] == pytest.approx(parts["reward_function"].mean().item())


def test_resuming_with_another_reward_recomputes_the_reference_baselines(tmp_path):
    """The reference baselines and score statistics are saved with the reward that made them: a run resumed
    with the same reward keeps them, one resumed with another (here: a function added) starts them over."""
    prompts = _prompts()

    def loop(reward_fn=None, source="reward model rm"):
        return PPOLoop(_ppo(normalize_scores=True), _config(), ParallelLayout.single(), *_models(seed=9), prompts,
                       [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=reward_fn, reward_source=source)
    first = loop()
    first.iteration()
    first.save(tmp_path)
    assert first._baseline_cache and first.score_moments.count > 0
    same = loop()
    same.load(tmp_path)
    assert same._baseline_cache == first._baseline_cache and same.score_moments.count == first.score_moments.count
    other = loop(_function_reward(prompts), "reward model rm + function f")
    with pytest.warns(UserWarning, match="saved with reward 'reward model rm', resumed with 'reward model rm \\+ "
                                         "function f': the reference baselines are recomputed"):
        other.load(tmp_path)
    assert other._baseline_cache == {} and other.score_moments.count == 0 and other.iterations_done == 1
    shifted = PPOLoop(_ppo(normalize_scores=True), _config(), ParallelLayout.single(), *_models(seed=9), prompts[1:],
                      [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_source="reward model rm")  # e.g. one prompt held out
    with pytest.warns(UserWarning, match="saved with another prompt list"):
        shifted.load(tmp_path)
    assert shifted._baseline_cache == {} and shifted.score_moments.count == first.score_moments.count


def _length_if_even_prompt(prompt, response, sample) -> float:
    """Responses to even-numbered prompts score their length (they differ: the spread filter passes them
    mostly); odd-numbered prompts score 0 whatever the answer (always filtered)."""
    return float(len(response.split())) if sample["bonus"] % 20 == 0 else 0.0


def test_dynamic_sampling_draws_until_enough_prompts_pass(tmp_path, monkeypatch):
    """sampling_rounds: rollouts of the next prompts until rollout_prompts of them pass the spread filter; the
    iteration's rollout holds the first passing groups, in draw order, exactly as sampled and scored; each
    finished round waits in host memory and only the picked rows return to the device; the draw counter is
    saved and resumed."""
    from engine.rlhf.ppo import Rollout
    moves = []
    real_to = Rollout.to
    monkeypatch.setattr(Rollout, "to", lambda self, device: (moves.append(str(device)), real_to(self, device))[1])
    from engine.rlhf.core import reward_spread_filter
    prompts = _prompts(24, seed=5)
    config = _ppo(advantage_estimator="grpo", rollout_prompts=4, samples_per_prompt=2, mini_batch_size=8,
                  min_reward_spread=0.5, sampling_rounds=4)

    def loop():
        actor, _, reference, _ = _models(seed=14)
        return PPOLoop(config, _config(), ParallelLayout.single(), actor, None, reference, None, prompts,
                       list(range(2, 24)), PAD, OPTIM, OPTIM, LR, LR,
                       reward_fn=_function_reward(prompts, _length_if_even_prompt))
    first = loop()
    plain = loop()  # the same draws one at a time, as a reference
    rounds_times = []
    one_round = first.rollout
    first.rollout = lambda draw: (lambda out: (rounds_times.append(out[1]), out)[1])(one_round(draw))
    rollout, times = first.dynamic_rollout()
    del first.rollout
    assert moves == ["cpu"] * times["sampling_rounds"] + [str(first.device)]  # every round offloaded, one back
    for key in ("generate_s", "score_s", "reward_fn_s"):  # summed over the rounds
        assert times[key] == pytest.approx(sum(t[key] for t in rounds_times))
    rounds = times["sampling_rounds"]
    draws = [plain.rollout(d)[0] for d in range(rounds)]
    passing = [reward_spread_filter(r.scores.view(4, 2), 0.5) for r in draws]
    assert rounds >= 2 and first.prompt_draws == rounds and sum(int(p.sum()) for p in passing[:-1]) < 4
    groups = [(d, g) for d, p in enumerate(passing) for g in range(4) if p[g]]
    groups += [(d, g) for d, p in enumerate(passing) for g in range(4) if not p[g]]
    for place, (d, g) in enumerate(groups[:4]):
        rows = slice(2 * place, 2 * place + 2)
        source = slice(2 * g, 2 * g + 2)
        for name in ("sequences", "responses", "scores", "logprobs", "prompt_index"):
            assert torch.equal(getattr(rollout, name)[rows], getattr(draws[d], name)[source]), (name, place)
    n_pass = sum(int(p.sum()) for p in passing)
    assert times["passing_fraction"] == n_pass / (4 * rounds)
    _, stats = first.advantages(rollout)
    assert stats["kept_fraction"] == min(n_pass, 4) / 4
    record = first.iteration()  # the next iteration draws on from where this one stopped
    assert first.prompt_draws == rounds + record["sampling_rounds"] and record["ppo_steps"] == 1
    first.save(tmp_path)
    resumed = loop()
    resumed.load(tmp_path)
    assert resumed.prompt_draws == first.prompt_draws and resumed.iterations_done == 1
    # a checkpoint from before dynamic sampling (no draw counter) resumes at one draw per iteration
    manifest = tmp_path / "actor" / "step_000001" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["extra_state"]["prompt_draws"]
    manifest.write_text(json.dumps(data))
    old = loop()
    old.load(tmp_path)
    assert old.prompt_draws == old.iterations_done == 1


# ---- evaluation on held-out prompts ------------------------------------------------------------------------
def _greedy_scored(loop, model, prompts, origin):
    """Scores (reward model + _row_fn) and lengths of a model's greedy answers, computed here directly."""
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    out = generate(model, ids, mask, SamplingParams(max_new_tokens=6, eos_token_id=[EOS], pad_token_id=PAD))
    resp, resp_mask = loop._pad_response(out.response_ids, out.response_mask)
    rm = loop._scores(loop.reward, torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1))
    fn = torch.tensor([int(m.sum()) + 10.0 * o + p[0] / 100 for m, o, p in zip(resp_mask, origin, prompts)])
    return rm + fn, resp_mask.sum(1).float()


def test_evaluate_scores_greedy_answers_against_the_reference():
    """evaluate(): the actor's and the reference's greedy answers to the held-out prompts, scored by the reward
    model plus the function (which numbers held-out prompts after the training ones); equal models tie on
    every prompt (win rate 0.5); after updates the actor's scores move and the reference's are reused. With
    eval_interval=2, iterations 0 and 2 carry the evaluation."""
    prompts, held_out = _prompts(), _prompts(5, seed=3)
    actor, critic, reference, reward = _models(seed=10)
    with torch.no_grad():  # a reference unlike the actor: its answers score differently
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loop = PPOLoop(_ppo(iterations=3, eval_interval=2), _config(), ParallelLayout.single(), actor, critic, reference,
                   reward, prompts, [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=_function_reward(prompts + held_out),
                   eval_prompts=held_out)
    origin = range(len(prompts), len(prompts) + 5)
    first = loop.evaluate()
    scores, lengths = _greedy_scored(loop, loop.actor[0], held_out, origin)
    ref_scores, _ = _greedy_scored(loop, loop.reference[0], held_out, origin)
    assert first["eval_reward"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert first["eval_reference_reward"] == pytest.approx(ref_scores.mean().item(), abs=1e-5)
    assert abs(first["eval_reference_reward"] - first["eval_reward"]) > 1e-3  # the two are told apart
    wins = ((scores > ref_scores).float() + 0.5 * (scores == ref_scores).float()).mean().item()
    assert first["eval_win_rate"] == pytest.approx(wins) and first["eval_response_length"] == lengths.mean().item()
    cached = loop._eval_reference
    records = [loop.iteration() for _ in range(3)]
    assert ["eval_reward" in r for r in records] == [True, False, True]
    assert records[0]["eval_reward"] == pytest.approx(first["eval_reward"], abs=1e-6)  # nothing trained yet
    assert records[0]["resident_bytes_eval"] > 0
    after = loop.evaluate()
    assert loop._eval_reference is cached  # computed once
    scores, _ = _greedy_scored(loop, loop.actor[0], held_out, origin)
    assert after["eval_reward"] == pytest.approx(scores.mean().item(), abs=1e-5)
    wins = ((scores > ref_scores).float() + 0.5 * (scores == ref_scores).float()).mean().item()
    assert after["eval_win_rate"] == pytest.approx(wins)
    # sampled answers (k = 3): at a temperature of 1e-4 every sample is the greedy answer, so the means equal the
    # greedy ones; at 1: the best of 3 is at least the mean, and the same iteration gives the same samples
    cold = PPOLoop(_ppo(advantage_estimator="grpo", eval_samples=3, eval_temperature=1e-4), _config(), ParallelLayout.single(), loop.actor[0],
                   None, loop.reference[0], loop.reward[0], prompts, [EOS], PAD, OPTIM, OPTIM, LR, LR,
                   reward_fn=_function_reward(prompts + held_out), eval_prompts=held_out)
    greedy = {k: v for k, v in loop.evaluate().items() if k != "eval_s"}
    sampled = cold.evaluate()
    for key, value in greedy.items():
        assert sampled[key] == pytest.approx(value, abs=1e-5), key
    assert sampled["eval_best_reward"] == pytest.approx(greedy["eval_reward"], abs=1e-5)
    # win rate: scores within fp32 rounding of the reference's are ties (identical answers scored in batches of
    # other sizes differ by ~1e-7)
    assert cold.evaluate()["eval_win_rate"] == greedy["eval_win_rate"]
    actor_scores = _greedy_scored(cold, cold.actor[0], held_out, origin)[0]
    cold._eval_reference = actor_scores + 5e-6 * actor_scores.abs().clamp(min=1.0)  # within 1e-5, beyond an ulp
    assert not torch.equal(cold._eval_reference, actor_scores)
    assert cold.evaluate()["eval_win_rate"] == 0.5
    hot = PPOLoop(_ppo(advantage_estimator="grpo", eval_samples=3), _config(), ParallelLayout.single(), loop.actor[0], None, loop.reference[0],
                  loop.reward[0], prompts, [EOS], PAD, OPTIM, OPTIM, LR, LR,
                  reward_fn=_function_reward(prompts + held_out), eval_prompts=held_out)
    one, two = hot.evaluate(), hot.evaluate()
    assert one["eval_best_reward"] >= one["eval_reward"] and one["eval_reward"] != greedy["eval_reward"]
    assert {k: v for k, v in one.items() if k != "eval_s"} == {k: v for k, v in two.items() if k != "eval_s"}
    with pytest.raises(ValueError, match="eval_interval=2 needs eval_prompts"):
        PPOLoop(_ppo(eval_interval=2), _config(), ParallelLayout.single(), *_models(), prompts, [EOS], PAD)
    with pytest.raises(ValueError, match="1 of 2 eval prompts are empty or longer than max_prompt_length=8"):
        PPOLoop(_ppo(), _config(), ParallelLayout.single(), *_models(), prompts, [EOS], PAD,
                eval_prompts=[[5, 6], list(range(3, 13))])


def _even_first_token(prompt, response, sample) -> float:
    tokens = response.split()
    return float(bool(tokens) and int(tokens[0]) % 2 == 0)


def _even_mass(actor, prompts) -> float:
    """Mean probability of an even first response token over the prompts."""
    ids, mask = left_pad_prompts(prompts, 8, PAD)
    with torch.no_grad():
        probs = actor(ids, mask)[:, -1].float().softmax(-1)
    return probs[:, 0::2].sum(-1).mean().item()


def test_grpo_on_a_function_reward_moves_the_policy_toward_it():
    """The reward's sign reaches the update: rewarding an even first token raises its probability over
    the training prompts after a few GRPO iterations, and rewarding an odd one lowers it (from the same
    start). A fixed seed makes the run deterministic; each direction is the opposite of the other."""
    prompts = _prompts()
    masses = {}
    for name, fn in (("even", _even_first_token), ("odd", lambda *a: 1.0 - _even_first_token(*a))):
        actor, _, reference, _ = _models(seed=6)
        # one-token responses: every trained token is the rewarded choice
        config = _ppo(advantage_estimator="grpo", iterations=6, rollout_prompts=6, samples_per_prompt=4,
                      max_new_tokens=1, mini_batch_size=24, micro_batch_size=4, kl_coef=0.0)
        lr = type(LR)(lr=1e-2, min_lr=1e-2)
        loop = PPOLoop(config, _config(), ParallelLayout.single(), actor, None, reference, None, prompts, [EOS],
                       PAD, OPTIM, OPTIM, lr, lr, reward_fn=_function_reward(prompts, fn))
        before = _even_mass(loop.actor[0], prompts)
        for _ in range(config.iterations):
            loop.iteration()
        masses[name] = (before, _even_mass(loop.actor[0], prompts))
    (b_even, a_even), (b_odd, a_odd) = masses["even"], masses["odd"]
    assert b_even == b_odd  # the same start
    # measured +0.145 / -0.085 (torch 2.13 CPU); 0.05 leaves room for other builds' rounding, and is far
    # above the fp32 noise of a 64-way softmax sum
    assert a_even > b_even + 0.05 and a_odd < b_odd - 0.05, masses


def _rank_fn(prompt, response, sample) -> float:
    """Differs per process: a non-deterministic function stands for sandboxes, judges, timeouts."""
    return float(torch.distributed.get_rank()) * 1000 + len(response.split())


def _fails_on_rank_0(prompt, response, sample) -> float:
    if torch.distributed.get_rank() == 0:
        raise ConnectionError("sandbox unreachable")
    return 0.0


def _world2_reward_fn(rank, world_size, states):
    from tests.test_rlhf_ppo import _sharded
    prompts = _prompts()
    out = {}
    for name, dims in (("tp2", ParallelDims(tp=2)), ("pp2", ParallelDims(pp=2)), ("dp2", ParallelDims(dp=2))):
        layout = ParallelLayout.build(dims, name=name)
        actor, _, reference, _ = _sharded(states, layout)
        loop = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), layout, actor, None, reference, None, prompts,
                       [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=_function_reward(prompts, _rank_fn))
        rollout, _ = loop.rollout(0)
        out[name] = (rollout.scores.tolist(), rollout.response_mask.sum(1).tolist())
        if name != "tp2":  # evaluation over 5 held-out prompts: sliced over dp=2 (padded), sampled on pp=2
            actor, _, reference, reward = _sharded(states, layout)
            loop = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), layout, actor, None, reference, reward,
                           prompts, [EOS], PAD, OPTIM, OPTIM, LR, LR, eval_prompts=_prompts(5, seed=3))
            out[f"{name}_eval"] = loop.evaluate()
            # 5 x 2 sampled rows over the replicas; at a temperature of 1e-4 they are the greedy answers
            loop.config = dataclasses.replace(loop.config, eval_samples=2, eval_temperature=1e-4)
            out[f"{name}_eval2"] = loop.evaluate()
            if name == "dp2":  # one prompt, 2 samples: one per replica, each with its own noise
                loop.config = dataclasses.replace(loop.config, eval_temperature=1.0)
                loop.eval_prompts, loop._eval_reference = loop.eval_prompts[:1], None
                out["dp2_two_samples"] = loop.evaluate()
    # a function that fails on the rank that runs it: every rank of the group raises, none waits
    layout = ParallelLayout.build(ParallelDims(tp=2), name="failing")
    actor, _, reference, _ = _sharded(states, layout)
    loop = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), layout, actor, None, reference, None, prompts,
                   [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=_function_reward(prompts, _fails_on_rank_0))
    try:
        loop.rollout(0)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    # on dp=2 it fails in replica 0 only: replica 1 raises too instead of waiting in the rollout's all-gather; in
    # evaluate() as well (the same flag), with a reward model and the failing function together
    layout = ParallelLayout.build(ParallelDims(dp=2), name="failing_dp")
    for phase in ("rollout", "evaluate"):
        actor, _, reference, reward = _sharded(states, layout)
        loop = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), layout, actor, None, reference, reward, prompts,
                       [EOS], PAD, OPTIM, OPTIM, LR, LR, reward_fn=_function_reward(prompts + _prompts(5, seed=3),
                                                                                    _fails_on_rank_0),
                       eval_prompts=_prompts(5, seed=3))
        try:
            loop.rollout(0) if phase == "rollout" else loop.evaluate()
        except Exception as e:
            out[f"dp_{phase}_error"] = f"{type(e).__name__}: {e}"
    return out


def test_function_scores_are_computed_once_per_model_parallel_group():
    """tp=2 and pp=2: rank 0 runs the function and rank 1 receives its scores (rank 1's own would differ);
    dp=2: each replica's first rank scores its own rows. Also: evaluate() on dp=2 and pp=2 equals one
    process."""
    models = _models(seed=8)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    results = run_distributed(_world2_reward_fn, 2, states, timeout=240)
    actor, _, reference, reward = models
    single = PPOLoop(_ppo(advantage_estimator="grpo"), _config(), ParallelLayout.single(), actor, None, reference,
                     reward, _prompts(), [EOS], PAD, OPTIM, OPTIM, LR, LR, eval_prompts=_prompts(5, seed=3)).evaluate()
    for r in results:
        two = r["dp2_two_samples"]
        assert two["eval_best_reward"] > two["eval_reward"] + 1e-4  # the two samples differ: two seeds
        for case in ("dp2_eval", "pp2_eval", "dp2_eval2", "pp2_eval2"):
            for key in ("eval_reward", "eval_reference_reward", "eval_win_rate", "eval_response_length"):
                # fp32, other reduction orders over stages; the greedy tokens are the same
                assert r[case][key] == pytest.approx(single[key], abs=1e-5), (case, key)
    for case in ("tp2", "pp2"):
        assert results[0][case] == results[1][case]
        scores, lengths = results[0][case]
        assert scores == [float(n) for n in lengths]  # rank 0's: 0 * 1000 + tokens
    for r in results:
        scores, lengths = r["dp2"]
        half = len(scores) // 2
        assert scores == [float(n) for n in lengths[:half]] + [1000.0 + n for n in lengths[half:]]
    assert results[0]["error"].startswith("RuntimeError: reward function _fails_on_rank_0 failed on row 0")
    assert "ConnectionError: sandbox unreachable" in results[0]["error"]
    assert results[1]["error"] == ("RuntimeError: the reward function failed on a rank that scores this rank's rows "
                                   "(rank 0; its error is in that rank's output)")
    for phase in ("rollout", "evaluate"):
        assert "ConnectionError: sandbox unreachable" in results[0][f"dp_{phase}_error"], phase
        assert results[1][f"dp_{phase}_error"] == ("RuntimeError: scoring failed on another DP replica (its error is in "
                                                   "that replica's output); every replica stops with it"), phase


# ---- launch.rlhf -------------------------------------------------------------------------------------------
def test_split_eval_holds_out_only_prompts_that_fit():
    from launch.rlhf import RLHFData, split_eval
    records = [{"prompt": str(i)} for i in range(10)]
    fits = [i % 3 != 0 for i in range(10)]  # 0, 3, 6, 9 too long
    for seed in range(20):
        train, held = split_eval(records, RLHFData(eval_fraction=0.3), seed, fits)
        assert len(held) == 2 and all(fits[int(r["prompt"])] for r in held)
        assert sorted(train + held, key=lambda r: int(r["prompt"])) == records
    with pytest.raises(ValueError, match="eval_fraction=0.9 of the 2 prompts that fit max_prompt_length leaves none"):
        split_eval(records[:3], RLHFData(eval_fraction=0.9), 0, [True, True, False])

def test_launcher_with_a_reward_function_and_no_reward_model(tmp_path, capsys):
    """launch.rlhf --reward-fn file.py:function (PPO with a critic started from the actor): the function gets
    each prompt's JSONL record; the logged reward is its mean. Bad specs and a missing reward are refused."""
    from launch.rlhf import main
    assert main(["--actor-from", "a"]) == 2
    assert "and a reward: --reward-from" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-fn", "engine.rlhf.rewards:nothing"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    for flags in (["--eval-interval", "2"], ["--eval-fraction", "0.1"]):
        assert main(["--actor-from", "a", "--reward-from", "b", *flags]) == 2
        assert "evaluation needs both held-out prompts" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-from", "b", "--eval-fraction", "0.1", "--eval-prompts", "e.jsonl",
                 "--eval-interval", "1"]) == 2
    assert "give data.eval_prompts or data.eval_fraction, not both" in capsys.readouterr().err

    root, env = _tiny_sft(tmp_path)
    # prompts 3 and 4 are conversations (an earlier exchange before the question)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "points": i} if i < 3 else
                                                               {"messages": history + [{"role": "user", "content":
                                                                                        f"What is {i} + 1?"}],
                                                                "points": i}) + "\n" for i in range(5)))
    (tmp_path / "points.py").write_text("def points(prompt, response, sample):\n"
                                        "    assert prompt.startswith('What is')\n"
                                        "    return sample['points']\n")
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(f"data:\n  prompts: {tmp_path / 'prompts.jsonl'}\n")
    cmd = [sys.executable, "-m", "launch.rlhf", "--config", str(config_file), "--model", str(tmp_path / "model.yaml"),
           "--iterations", "1", "--rollout-prompts", "4", "--samples-per-prompt", "2", "--mini-batch-size", "8",
           "--micro-batch-size", "2", "--max-new-tokens", "4", "--ptx-coef", "0", "--actor-from", str(tmp_path / "sft"),
           "--reward-fn", f"{tmp_path / 'points.py'}:points", "--log-dir", str(tmp_path / "run"),
           "--eval-fraction", "0.2", "--eval-interval", "1", "--log-samples", "3", "--save", str(tmp_path / "ck"),
           "--reward-workers", "2"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 models, reward function" in proc.stdout and "4 prompts + 1 held out" in proc.stdout
    line, final = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the 4 training prompts once each (twice sampled) and the held-out one: their points sum to 0 + ... + 4
    assert line["reward"] * 4 + line["eval_reward"] == 10 and line["eval_reward"] in range(5)
    assert line["reward_fn_s"] >= 0 and math.isfinite(line["value_loss"])
    assert final["step"] == 1 and final["eval_reward"] == line["eval_reward"] and final["eval_win_rate"] == 0.5
    assert proc.stdout.count("eval ") == 2
    # resuming the finished run trains nothing and adds no second final evaluation
    proc = subprocess.run(cmd + ["--load", str(tmp_path / "ck")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout + proc.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["row"] for s in samples] == [0, 1, 2] and all(s["step"] == 0 for s in samples)
    for s in samples:  # the decoded prompt is one of the training questions, scored by its points
        (i,) = [i for i in range(5) if f"What is {i} + 1?" in s["prompt"]]
        assert s["score"] == i and 0 <= s["response_tokens"] <= 4 and isinstance(s["response"], str)


def test_prompt_records_questions_system_messages_and_conversations(tmp_path):
    """read_prompts takes a question (with an optional system message) or a conversation ending in a user turn;
    prompt_ids is the chat template up to the assistant tag; prompt_text is what a reward function receives (the
    last user turn); malformed records name file:line and what is wrong."""
    from engine.data.tokenizer import default_tokenizer
    from launch.rlhf import prompt_ids, prompt_text, read_prompts
    tokenizer = default_tokenizer()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 2?"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Why?", "system": "Answer in French."},
        {"messages": history, "answer": "4"}, {"prompt": history[1:2]}, {"prompt": "Hi", "system": ""})) + "\n")
    one, system, chat, verl, empty_system = read_prompts(str(path))
    assert prompt_ids(empty_system, tokenizer) == tokenizer.encode_prompt("Hi")  # "" (or null): no system message
    assert prompt_ids(one, tokenizer) == tokenizer.encode_prompt("What is 1 + 1?")
    assert prompt_ids(system, tokenizer) == tokenizer.encode_prompt("Why?", system="Answer in French.")
    assert prompt_ids(chat, tokenizer) == tokenizer.encode_chat(history, add_generation_prompt=True)[0]
    assert prompt_ids(verl, tokenizer) == tokenizer.encode_prompt("Hi")
    assert tokenizer.decode(prompt_ids(chat, tokenizer)).count("Hello") == 1  # the history is in the prompt
    assert [prompt_text(r) for r in (one, system, chat, verl)] == ["What is 1 + 1?", "Why?", "What is 2 + 2?", "Hi"]
    bad = [({"messages": history[:3]}, "the conversation ends with a assistant turn; it must end with the user"),
           ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
           ({"messages": [{"role": "user"}]}, 'expected {"prompt": non-empty string} or a conversation'),
           ({"messages": []}, "expected"), ({"prompt": ""}, "expected"), ({"prompt": "x", "system": False},
                                                                        '"system" must be a string'),
           ({"prompt": "x", "messages": history}, 'give "prompt" or "messages", not both'),
           ({"messages": history, "system": "s"}, "a conversation carries its system message as its first turn"),
           ({"messages": [{"role": "user", "content": "Hi", "metadata": None}]}, '"metadata" of a message must be'),
           ({"messages": [{"role": "user", "content": ""}]}, "the last turn's content is empty")]
    for record, needle in bad:
        path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"p.jsonl:2: {needle}")):
            read_prompts(str(path))


def test_launcher_with_a_reward_service(tmp_path, capsys):
    """launch.rlhf --reward-url: GRPO scored by a reward service (one request per scoring batch: the rollout and
    the held-out evaluation), no reward model; the records reach the service; bad settings are refused."""
    from launch.rlhf import main
    assert main(["--actor-from", "a", "--reward-fn", "m:f", "--reward-url", "http://x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["--actor-from", "a", "--reward-url", "x:8000"]) == 2
    assert "must start with http:// or https://" in capsys.readouterr().err
    root, env = _tiny_sft(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Name {i} things.", "bonus": i}) + "\n"
                                                    for i in range(5)))
    service = _RewardService()
    try:
        cmd = [sys.executable, "-m", "launch.rlhf", "--model", str(tmp_path / "model.yaml"), "--iterations", "1",
               "--rollout-prompts", "2", "--samples-per-prompt", "2", "--mini-batch-size", "4", "--micro-batch-size",
               "2", "--max-new-tokens", "4", "--ptx-coef", "0", "--actor-from", str(tmp_path / "sft"),
               "--advantage-estimator", "grpo", "--prompts", str(tmp_path / "prompts.jsonl"), "--reward-url",
               service.url, "--eval-prompts", str(tmp_path / "prompts.jsonl"), "--eval-interval", "1",
               "--log-dir", str(tmp_path / "run")]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    finally:
        service.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"2 models, reward service {service.url}" in proc.stdout
    # evaluations of the actor at the start and the end, the reference's once, and one rollout: a batch each
    assert sorted(len(r["responses"]) for r in service.requests) == [4, 5, 5, 5]
    rollout = [r for r in service.requests if len(r["responses"]) == 4][0]
    assert all(rec["prompt"] == p and "bonus" in rec for rec, p in zip(rollout["records"], rollout["prompts"]))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    expected = sum(len(r.split()) + rec["bonus"] for r, rec in zip(rollout["responses"], rollout["records"])) / 4
    assert line["reward"] == pytest.approx(expected)


def _tiny_sft(tmp_path):
    """A random 2-layer tiny SFT checkpoint in tmp_path/sft (model YAML tmp_path/model.yaml); the repository root
    and a subprocess environment."""
    from engine.config import GLMConfig
    from engine.model.glm import GLMForCausalLM
    from engine.train.checkpoint import save_checkpoint
    config = GLMConfig.preset("tiny").replace(num_layers=2)
    (tmp_path / "model.yaml").write_text("preset: tiny\nnum_layers: 2\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    root = Path(__file__).resolve().parent.parent
    return root, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))


def test_grpo_preset_runs_a_verifiable_task(tmp_path):
    """configs/runs/grpo.yaml (GRPO, math_answer, no reward model, dynamic sampling, overlong punishment,
    held-out evaluation) runs from an SFT checkpoint and a prompts file with answers, shrunk to CPU size. A
    random model answers nothing right: every group ties, so dynamic sampling uses all its rounds and the
    iteration trains nothing, which the metrics show."""
    from launch.rlhf import load_rlhf_run, validate_rlhf_run
    root, env = _tiny_sft(tmp_path)
    preset = load_rlhf_run(root / "configs" / "runs" / "grpo.yaml", {"checkpoint": {"actor_from": "sft"}})
    validate_rlhf_run(preset, 1)  # valid as shipped, with no reward model
    assert (preset.ppo.advantage_estimator, preset.reward.function) == ("grpo", "engine.rlhf.rewards:math_answer")

    (tmp_path / "math.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)})
                                                 + "\n" for i in range(12)))
    cmd = [sys.executable, "-m", "launch.rlhf", "--config", str(root / "configs" / "runs" / "grpo.yaml"),
           "--model", str(tmp_path / "model.yaml"), "--actor-from", str(tmp_path / "sft"),
           "--prompts", str(tmp_path / "math.jsonl"), "--iterations", "1", "--rollout-prompts", "2",
           "--samples-per-prompt", "4", "--mini-batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "8",
           "--overlong-buffer", "4", "--eval-interval", "1", "--log-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PPO (grpo)" in proc.stdout and "2 models, reward function engine.rlhf.rewards:math_answer" in proc.stdout
    assert "11 prompts + 1 held out" in proc.stdout
    line, final = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if line["reward"] == 0.0:  # (so on torch 2.13 CPU: no right answer among the 24 sampled)
        assert line["sampling_rounds"] == 3 and line["passing_fraction"] == 0.0 and line["ppo_steps"] == 0
    assert 1 <= line["sampling_rounds"] <= 3 and line["overlong_penalty"] <= 0 and 0 <= final["eval_win_rate"] <= 1
