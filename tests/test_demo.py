"""The README's main job runs end to end (few steps) and writes what it promises."""
import json

from engine import GLMForCausalLM
from launch.demo import main


def test_demo_runs_and_writes_metrics_and_checkpoint(tmp_path, capsys):
    assert main(["--steps", "3", "--batch-size", "2", "--seq-length", "32", "--max-new-tokens", "4",
                 "--out", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in lines)
    model = GLMForCausalLM.from_hf(tmp_path / "hf")
    assert model.config.vocab_size == 4096
    assert ">>> The import statement" in capsys.readouterr().out
