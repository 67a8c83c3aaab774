"""`python -m launch.bench model` runs (a smoke test of the benchmark's plumbing, not a timing test)."""
import json

import pytest

from launch.bench import main


def test_model_benchmark_reports_forward_generation_and_rollout(tmp_path):
    out = tmp_path / "model.json"
    assert main(["model", "--configs", "tiny", "--batch", "4", "--seq", "8", "--new-tokens", "6", "--repeats", "1",
                 "--stop-tokens", "1500", "--samples-per-prompt", "2", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["config"] == "tiny" and r["new_tokens"] == 6
    for key in ("forward_tokens_per_s", "generate_tokens_per_s"):
        assert r[key]["engine"] > 0 and r[key]["transformers"] > 0, key
    rollout = r["rollout"]
    assert 1 <= rollout["mean_length"] <= rollout["max_length"] <= 6
    assert rollout["tokens_per_s"]["compact"] > 0 and rollout["tokens_per_s"]["no_compact"] > 0
    assert rollout["samples_per_prompt"] == 2 and rollout["shared_prefill_tokens_per_s"]["per_row"] > 0


def test_model_benchmark_refuses_negative_stop_tokens(capsys):
    with pytest.raises(SystemExit):
        main(["model", "--stop-tokens", "-1"])
    assert "--stop-tokens must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model", "--batch", "4", "--samples-per-prompt", "3", "--stop-tokens", "10"])
    assert "--samples-per-prompt 3 must be >= 1 and divide --batch 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model", "--samples-per-prompt", "2"])
    assert "add --stop-tokens K" in capsys.readouterr().err
