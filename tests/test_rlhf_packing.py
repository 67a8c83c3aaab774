"""Packed PPO updates: ``pack_padded_rows`` moves every sequence intact, and a packed update equals the
padded one (an iteration on one process; the same batch packed on two DP ranks) while computing fewer
rows.

Tolerances (fp32): packing changes which other tokens share a row, and attention masks them out exactly
(masked keys add exact zeros), so losses and gradients differ only in summation order and blocking:
1e-5 relative on losses and grad norms (observed ~1e-7). Weights after one Adam step of lr 1e-3: 1e-5
absolute, 1% of a step (Adam's first step is lr g / (|g| + eps), so an element whose gradient is tiny moves
by up to lr x its gradient's relative rounding error: observed 1.5e-6 on one of 4096 elements), except
the key bias, whose gradient is pure rounding noise (see ``_compare``). A sequence attending across a boundary, a
shifted position or a lost label changes the loss at O(1e-2) or more.
"""
import dataclasses

import pytest
import torch

from engine.parallel import ParallelDims, ParallelLayout
from engine.train.batches import pack_padded_rows
from engine.train.objectives import IGNORE_INDEX
from engine.train.step import TrainConfig
from tests._dist import run_distributed
from tests.test_rlhf_ppo import _config, _loop, _models, _one_process, _ppo, off_policy


def test_pack_padded_rows_moves_each_sequence_intact():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 1, 1, 0]])
    ids = torch.arange(30).view(5, 6)
    labels = torch.where(mask.bool(), ids + 100, IGNORE_INDEX)
    out = pack_padded_rows({"input_ids": ids, "attention_mask": mask, "labels": labels}, row_multiple=2,
                           fill={"labels": IGNORE_INDEX})
    # first fit decreasing: row 2 (5 tokens) opens packed row 0, row 0 (3) packed row 1, where row 1 (2) joins
    # it; row 4 (2) fits in neither; row 3 is empty and left out; then padded to a multiple of 2 rows
    assert out["input_ids"].tolist() == [[13, 14, 15, 16, 17, 0], [2, 3, 4, 6, 7, 0], [27, 28, 0, 0, 0, 0],
                                         [0] * 6]
    assert out["segment_ids"].tolist() == [[0, 0, 0, 0, 0, -1], [0, 0, 0, 1, 1, -1], [0, 0, -1, -1, -1, -1],
                                           [-1] * 6]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0] * 6]
    assert torch.equal(out["attention_mask"], (out["segment_ids"] >= 0).long())
    assert torch.equal(out["labels"], torch.where(out["segment_ids"] >= 0, out["input_ids"] + 100, IGNORE_INDEX))
    # keep leaves rows out; given positions move with their tokens
    kept = pack_padded_rows({"input_ids": ids, "attention_mask": mask, "position_ids": ids}, keep=torch.tensor(
        [False, True, True, True, False]))
    assert kept["input_ids"].tolist() == [[13, 14, 15, 16, 17, 0], [6, 7, 0, 0, 0, 0]]
    assert torch.equal(kept["position_ids"], kept["input_ids"])


def test_pack_padded_rows_refuses_bad_input():
    mask = torch.tensor([[1, 0, 1, 0]])
    with pytest.raises(ValueError, match="row 0's attention_mask has holes"):
        pack_padded_rows({"input_ids": torch.zeros(1, 4), "attention_mask": mask})
    with pytest.raises(ValueError, match="needs the batch's attention_mask"):
        pack_padded_rows({"input_ids": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match=r"labels \(1, 3\) must be \[rows, seq\] = \[1, 4\]"):
        pack_padded_rows({"attention_mask": torch.ones(1, 4), "labels": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="row_multiple=0"):
        pack_padded_rows({"attention_mask": torch.ones(1, 4)}, row_multiple=0)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        pack_padded_rows({"attention_mask": torch.ones(2, 4)}, keep=torch.ones(2))
    labels = torch.tensor([[5, -100, -100, -100], [7, 1, 2, -100]])  # row 1 has a label on padding
    with pytest.raises(ValueError, match="row 1 holds labels values other than the fill -100 on padding"):
        pack_padded_rows({"attention_mask": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]]), "labels": labels},
                         fill={"labels": -100})
    from engine.rlhf.ppo import PPOLoop
    from tests.test_rlhf_ppo import EOS, PAD
    with pytest.raises(ValueError, match=r"prompts \[1, 3, 5, 7\] are empty; every prompt needs at least one token"):
        PPOLoop(_ppo(), _config(), ParallelLayout.single(), *_models(), [[3, 4], []] * 4, [EOS], PAD)


def test_variable_rows_granularity():
    train = TrainConfig(global_batch_size=8, micro_batch_size=2, variable_rows=True)
    assert train.row_multiple(ParallelDims(dp=2)) == 2  # no pipeline: equal shares, a short last micro-batch
    assert train.row_multiple(ParallelDims(pp=2, dp=2)) == 4  # stages exchange one activation shape
    assert train.row_multiple(ParallelDims(pp=2, vpp=2, dp=2)) == 8  # interleaved: a multiple of pp micro-batches
    loop = _loop(_ppo(pack_sequences=True))
    trainer = loop.actor_trainer
    rows = {k: torch.zeros(3, loop.seq_length, dtype=torch.long) for k in trainer.objective.batch_keys}
    rows["labels"].fill_(IGNORE_INDEX)
    rows["labels"][:, 3] = 1
    mbs, n = trainer.microbatches(rows)
    assert [len(mb["labels"]) for mb in mbs] == [2, 1] and n == 3
    dp2 = TrainConfig(global_batch_size=4, micro_batch_size=2, seq_length=loop.seq_length, variable_rows=True)
    trainer.train = dp2  # as a dp = 2 rank would check it
    trainer.layout = dataclasses.replace(trainer.layout, dims=ParallelDims(dp=2, world_size=2))
    with pytest.raises(ValueError, match="a global batch of 3 rows does not split evenly over dp=2"):
        trainer.microbatches(rows)
    # packed rows reaching an objective that would drop their segment ids are refused, not silently unpacked
    from engine.rlhf.objectives import PolicyObjective

    class Unpacked(PolicyObjective):
        optional_keys = ()
    packed = {k: torch.zeros(2, loop.seq_length, dtype=torch.long) for k in (*trainer.objective.batch_keys,
                                                                             "segment_ids")}
    with pytest.raises(ValueError, match="holds packed sequences \\(segment_ids\\), which the policy objective"):
        trainer.microbatches(packed, Unpacked())


def _updated(loop) -> tuple[dict, dict]:
    record = loop.iteration()
    weights = {name: {k: v.clone() for k, v in getattr(loop, name)[0].state_dict().items()}
               for name in ("actor", "critic") if getattr(loop, name)}
    return record, weights


def _compare(packed, padded):
    (rec_a, w_a), (rec_b, w_b) = packed, padded
    for key in ("policy_loss", "actor_grad_norm", "approx_kl", "entropy", "value_loss", "critic_grad_norm"):
        if key in rec_b:
            assert rec_a[key] == pytest.approx(rec_b[key], rel=1e-5, abs=1e-9), key
    c = _config()
    keys = slice(c.num_attention_heads * c.kv_channels, (c.num_attention_heads + c.num_kv_groups) * c.kv_channels)
    for name in w_b:
        for k in w_b[name]:
            a, b = w_a[name][k].clone(), w_b[name][k].clone()
            if k.endswith("attention.qkv.bias"):
                # the key bias's gradient is zero in exact arithmetic (softmax ignores a per-query constant),
                # so it is rounding noise that Adam's normalised step turns into moves of up to lr: bounded by
                # one step, 1e-3 (the other rows are checked tightly)
                torch.testing.assert_close(a[keys], b[keys], rtol=0, atol=1e-3)
                a[keys], b[keys] = 0, 0
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m: f"{name}.{k}: {m}")
    assert rec_a["update_rows"] < rec_b["update_rows"] == 4  # fewer rows computed per step


def test_packed_scoring_equals_the_padded_scoring():
    """The rollout's log-probs (actor and reference), values and scores, and the reference baselines, from
    packed rows: those of the padded rows at every real position (fp32, summation order only)."""
    config = _ppo(iterations=1, max_prompt_length=16)
    padded = _loop(config, models=_models(seed=2))
    packed = _loop(dataclasses.replace(config, pack_sequences=True), models=_models(seed=2))
    a, _ = padded.rollout(0)
    b, _ = packed.rollout(0)
    assert torch.equal(a.sequences, b.sequences)  # sampling is not packed: the same tokens
    mask = a.response_mask.bool()
    for name in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(b, name)[mask], getattr(a, name)[mask], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    for name in ("scores", "baselines"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert (a.scores - a.baselines).abs().max() > 1e-3  # real, distinct numbers (a wrong row would show)


def test_packed_update_equals_the_padded_update():
    """One iteration, actor and critic: packed scoring and packed update steps vs padded ones."""
    # rows of 16 + 6 tokens hold prompts of 3-7 and responses of up to 6 tokens: two sequences fit a row
    padded = _updated(_loop(_ppo(iterations=1, max_prompt_length=16), models=_models(seed=2)))
    packed = _updated(_loop(_ppo(iterations=1, max_prompt_length=16, pack_sequences=True), models=_models(seed=2)))
    assert packed[0]["reward"] == pytest.approx(padded[0]["reward"], rel=1e-5)  # the same rollout, scored packed
    _compare(packed, padded)


@pytest.mark.parametrize("mode", ["gspo", "cispo"])
def test_gspo_and_cispo_packed_updates_equal_the_padded_ones(mode):
    """GSPO's per-response ratios from packed rows (two responses share a row: a ratio taken over the row
    would mix them) and CISPO's weights: the padded update's losses and weights; and not PPO's."""
    config = _ppo(max_prompt_length=16, policy_loss=mode, clip_eps=0.1)
    _, padded_loop, _, batch = _one_process(seed=4, config=config)
    batch = off_policy(batch)

    def updated(loop):
        return (loop.update({k: v.clone() for k, v in batch.items()}, 0),
                {name: {k: v.clone() for k, v in getattr(loop, name)[0].state_dict().items()}
                 for name in ("actor", "critic")})

    def fresh(**kw):
        return _loop(dataclasses.replace(config, **kw), models=_models(seed=4))

    padded = updated(padded_loop)
    packed = updated(fresh(pack_sequences=True))
    assert packed[0]["update_rows"] < padded[0]["update_rows"]  # rows were shared
    _compare(packed, padded)
    ppo = updated(fresh(policy_loss="ppo"))[0]
    assert abs(ppo["policy_loss"] - padded[0]["policy_loss"]) > 1e-3, (mode, ppo, padded[0])


def _dp2_packed_update(rank, world_size, states, batch):
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    layout = ParallelLayout.build(ParallelDims(dp=2))
    models = [cls(_config()) for cls in (GLMForCausalLM, GLMForScalarHead, GLMForCausalLM, GLMForScalarHead)]
    for model, state in zip(models, states):
        model.load_state_dict(state)
    loop = _loop(_ppo(pack_sequences=True, micro_batch_size=1, max_prompt_length=16, **_SEQ_MEAN), layout=layout,
                 models=models)
    update = loop.update({k: v.clone() for k, v in batch.items()}, 0)
    return update, {name: {k: v.clone() for k, v in getattr(loop, name)[0].state_dict().items()}
                    for name in ("actor", "critic")}


# per-response loss weights (computed over the whole mini-batch, moved with the packed tokens) and the clip options
_SEQ_MEAN = dict(loss_agg_mode="seq-mean-token-mean", clip_eps_high=0.28, dual_clip=3.0)


def test_packed_update_on_two_dp_ranks_equals_one_padded_process():
    """The same PPO batch: padded on one process vs packed on dp = 2 (each DP rank takes its packed rows),
    with the loss averaged per response (seq-mean-token-mean)."""
    states, loop, _, batch = _one_process(seed=4, config=_ppo(max_prompt_length=16, **_SEQ_MEAN))
    for row, trained in enumerate([6, 2, 4, 1, 6, 3, 5, 6]):  # responses of several lengths: weights differ
        batch["labels"][row, 16 - 1 + trained:] = -100
    padded = (loop.update({k: v.clone() for k, v in batch.items()}, 0),
              {name: {k: v.clone() for k, v in getattr(loop, name)[0].state_dict().items()}
               for name in ("actor", "critic")})
    for packed in run_distributed(_dp2_packed_update, 2, states, batch, timeout=300):
        _compare(packed, padded)


def _scored(loop, rollout) -> dict:
    r = rollout
    return {"logprobs": loop._token_logprobs(loop.actor, r.sequences, r.attention_mask),
            "values": loop._values(loop.critic, r.sequences, r.attention_mask),
            "scores": loop._scores(loop.reward, r.sequences, r.attention_mask)}


def _packed_scoring_world(rank, world_size, states, rollout):
    from tests.test_rlhf_ppo import _sharded
    out = {}
    for name, dims in (("tp2", ParallelDims(tp=2)), ("pp2", ParallelDims(pp=2))):
        layout = ParallelLayout.build(dims, name=name)
        loop = _loop(_ppo(pack_sequences=True, max_prompt_length=16, score_micro_batch_size=3), layout=layout,
                     models=_sharded(states, layout))
        out[name] = _scored(loop, rollout)
    return out


def test_packed_scoring_on_tp2_and_pp2_equals_one_padded_process():
    """Packed scoring forwards on TP = 2 (vocab-parallel log-probs) and PP = 2 (forward-only schedule, the
    last micro-batch of 3 packed rows padded, results broadcast from the last stage) against one process
    scoring the padded rows."""
    states, loop, rollout, _ = _one_process(seed=6, config=_ppo(max_prompt_length=16))
    want = _scored(loop, rollout)
    mask = rollout.response_mask.bool()
    for result in run_distributed(_packed_scoring_world, 2, states, rollout, timeout=300):
        for case, got in result.items():
            for name in ("logprobs", "values"):
                torch.testing.assert_close(got[name][mask], want[name][mask], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{case} {name}: {m}")
            torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-5)


def test_packing_is_on_in_the_run_config_and_the_command_line_turns_it_off():
    from pathlib import Path

    from launch.rlhf import build_parser, cli_overrides, load_rlhf_run
    config = Path(__file__).resolve().parents[1] / "configs" / "runs" / "ppo.yaml"
    assert load_rlhf_run(config).ppo.pack_sequences is True
    off = cli_overrides(build_parser().parse_args(["--no-pack-sequences"]))
    assert off["ppo"] == {"pack_sequences": False} and load_rlhf_run(config, off).ppo.pack_sequences is False
    assert "pack_sequences" not in cli_overrides(build_parser().parse_args([])).get("ppo", {})
