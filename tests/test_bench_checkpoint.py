"""`python -m launch.bench checkpoint` runs (a smoke test of the benchmark's plumbing, not a timing test)."""
import json

import pytest

from launch.bench import main


def test_checkpoint_benchmark_reports_sync_and_async_saves(tmp_path):
    out = tmp_path / "ck.json"
    assert main(["checkpoint", "--saves", "1", "--dir", str(tmp_path / "d"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["saves"] == 1 and r["checkpoint_bytes"] > 0
    assert r["sync_s"] > 0 and 0 < r["async_blocked_s"] <= r["async_written_s"]
    # both ways committed a checkpoint of the same step, keep_last=1
    for mode in ("sync", "async"):
        assert sorted(p.name for p in (tmp_path / "d" / mode).iterdir()) == ["latest", "step_000001"], mode


def test_checkpoint_benchmark_refuses_zero_saves(capsys):
    with pytest.raises(SystemExit):
        main(["checkpoint", "--saves", "0"])
    assert "--saves must be >= 1" in capsys.readouterr().err
