"""`python -m launch.bench rlhf` runs (a smoke test of the benchmark's plumbing, not a timing test)."""
import json

from launch.bench import main


def test_rlhf_benchmark_reports_every_phase(tmp_path):
    out = tmp_path / "rlhf.json"
    assert main(["rlhf", "--layouts", "1,1", "--iterations", "2", "--rollout-prompts", "2", "--mini-batch", "4",
                 "--max-new-tokens", "4", "--prompt-length", "8", "--json", str(out)]) == 0
    (layout,) = json.loads(out.read_text())["layouts"]
    assert (layout["tp"], layout["dp"]) == (1, 1)
    for key in ("generate_s", "score_s", "train_s", "seconds", "generated_tokens_per_s", "trained_tokens_per_s"):
        assert layout[key] > 0, key
    assert 1 <= layout["response_length"] <= 4
