"""The README's main job (pretrain -> SFT -> RM -> PPO, then sample and score) runs end to end with few
steps and writes what it promises."""
import json

from engine import GLMForCausalLM, GLMForScalarHead
from launch.demo import main


def test_demo_chain_writes_metrics_checkpoints_and_exports(tmp_path, capsys):
    # an earlier run's lines in the same --out: the files keep them, the summaries ignore them
    stale = {"step": 0, "loss": 123.0, "reward": 99.0, "kl": 0.0}
    for stage in ("pretrain", "sft", "rm", "ppo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(json.dumps(stale) + "\n")
    assert main(["--pretrain-steps", "2", "--sft-steps", "2", "--rm-steps", "2", "--ppo-iterations", "1",
                 "--seq-length", "64", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    for stage in ("pretrain", "sft", "rm"):
        stale_line, *lines = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert stale_line == stale
        assert [r["step"] for r in lines] == [0, 1] and all(r["loss"] > 0 for r in lines), stage
        assert (tmp_path / stage / "ckpt" / "latest").is_file(), stage
    assert "eval_accuracy" in lines[-1]  # the rm stage's held-out accuracy after its last step
    _, ppo = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo["step"] == 0 and all(k in ppo for k in ("reward", "kl", "reward_vs_reference", "kept_fraction"))
    assert (tmp_path / "ppo" / "ckpt" / "actor" / "latest").is_file()
    assert GLMForCausalLM.from_hf(tmp_path / "hf_actor").config.vocab_size == 4096
    assert GLMForScalarHead.from_hf(tmp_path / "hf_rm").config.vocab_size == 4096
    out = capsys.readouterr().out
    assert "123.000" not in out and "+99.000" not in out and f"ppo: reward {ppo['reward']:+.3f} ->" in out
    assert out.count("initialised from the weights in") == 2
    assert out.count("  SFT (reward ") == 3 and out.count("  PPO (reward ") == 3
