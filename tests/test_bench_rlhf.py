"""`python -m launch.bench rlhf` runs (a smoke test of the benchmark's plumbing, not a timing test)."""
import json

import pytest

from launch.bench import main


@pytest.mark.parametrize("offload", [False, True])
def test_rlhf_benchmark_reports_every_phase(tmp_path, offload):
    out = tmp_path / "rlhf.json"
    # with offloading also: packed updates, prompts of 2-8 tokens, 400 of the 4096 ids stop a response, and
    # context parallelism (2 processes: 8 + 4 tokens split over cp = 2)
    assert main(["rlhf", "--layouts", "1,1,1,1,2" if offload else "1,1", "--iterations", "2", "--rollout-prompts", "2", "--mini-batch", "4",
                 "--max-new-tokens", "4", "--prompt-length", "8", "--json", str(out)]
                + (["--offload", "--pack", "--min-prompt-length", "2", "--stop-tokens", "400"] if offload else [])) == 0
    (layout,) = json.loads(out.read_text())["layouts"]
    assert (layout["tp"], layout["dp"], layout["cp"]) == (1, 1, 2 if offload else 1)
    for key in ("generate_s", "score_s", "train_s", "seconds", "generated_tokens_per_s", "trained_tokens_per_s",
                "peak_saved_activation_bytes_update"):
        assert layout[key] > 0, key
    assert 1 <= layout["response_length"] <= 4
    # activations of a 12-token update are a few MiB (4.7 at cp = 1); one model's weights (tiny: 29 MiB) counted
    # among them, as an onload under offloading once made the meter do, would exceed this
    assert layout["peak_saved_activation_bytes_update"] < 16 * 2**20
    # fp32: the sampling copy (KV cache; cp = 1 under cp) and the training forward agree to rounding
    assert 0 <= layout["rollout_logprob_diff_max"] < 1e-4 and 0 <= layout["rollout_kl"] < 1e-8
    assert 1 <= layout["update_rows"] <= 4 if offload else layout["update_rows"] == 4  # packed rows: at most 4
    # offloading: host arenas exist, and sampling holds less than the update (the actor alone vs the actor
    # with its optimizer); without it every phase holds everything and nothing is in host memory
    if offload:
        assert layout["host_bytes"] > 0 and layout["resident_bytes_generate"] < layout["resident_bytes_update"]
    else:
        assert layout["host_bytes"] == 0
        assert layout["resident_bytes_generate"] == layout["resident_bytes_update"]


def test_rlhf_benchmark_with_lora_holds_no_reference_and_no_full_optimizer(tmp_path):
    """--lora-rank --critic-lora: actor, critic and reward weights resident (three models, no reference copy)
    plus the adapters' few optimizer bytes; full fine-tuning holds four models and optimizer state for two."""
    from engine.config import GLMConfig
    from engine.model.lora import LoRAConfig, lora_shapes
    out = tmp_path / "rlhf.json"
    assert main(["rlhf", "--layouts", "1,1", "--iterations", "2", "--rollout-prompts", "2", "--mini-batch", "4",
                 "--max-new-tokens", "4", "--prompt-length", "8", "--lora-rank", "4", "--critic-lora",
                 "--json", str(out)]) == 0
    (layout,) = json.loads(out.read_text())["layouts"]
    config = GLMConfig.preset("tiny")
    lm = 4 * config.num_parameters()  # fp32 bytes
    scalar = lm - 4 * config.vocab_size * config.hidden_size + 4 * config.hidden_size  # value head, no output layer
    # above the three models: actor and critic adapters, each with its gradient and two Adam moments (fp32:
    # 16 bytes a parameter), and the critic's value head's gradient and moments (12 bytes); no alignment padding
    adapters = 2 * sum(a * b for a, b in lora_shapes(config, LoRAConfig(rank=4)).values())
    expected = lm + 2 * scalar + 16 * adapters + 12 * config.hidden_size
    assert layout["resident_bytes_update"] == expected
    assert layout["rollout_logprob_diff_max"] < 1e-4  # the sampler runs the adapters as the trainer does


def test_rlhf_benchmark_refuses_a_critic_lora_without_a_critic():
    with pytest.raises(SystemExit):
        main(["rlhf", "--lora-rank", "4", "--critic-lora", "--advantage-estimator", "grpo"])
    with pytest.raises(SystemExit):
        main(["rlhf", "--critic-lora"])
