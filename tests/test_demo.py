"""The README's main job (pretrain -> SFT -> RM -> PPO, then sample and score) runs end to end with few
steps and writes what it promises."""
import json

from engine import GLMForCausalLM, GLMForScalarHead
from launch.demo import main


def test_demo_chain_writes_metrics_checkpoints_and_exports(tmp_path, capsys):
    assert main(["--pretrain-steps", "2", "--sft-steps", "2", "--rm-steps", "2", "--ppo-iterations", "1",
                 "--seq-length", "64", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    for stage in ("pretrain", "sft", "rm"):
        lines = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [0, 1] and all(r["loss"] > 0 for r in lines), stage
        assert (tmp_path / stage / "ckpt" / "latest").is_file(), stage
    assert "eval_accuracy" in lines[-1]  # the rm stage's held-out accuracy after its last step
    (ppo,) = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo["step"] == 0 and all(k in ppo for k in ("reward", "kl", "reward_vs_reference", "kept_fraction"))
    assert (tmp_path / "ppo" / "ckpt" / "actor" / "latest").is_file()
    assert GLMForCausalLM.from_hf(tmp_path / "hf_actor").config.vocab_size == 4096
    assert GLMForScalarHead.from_hf(tmp_path / "hf_rm").config.vocab_size == 4096
    out = capsys.readouterr().out
    assert out.count("initialised from the weights in") == 2
    assert out.count("  SFT (reward ") == 3 and out.count("  PPO (reward ") == 3
