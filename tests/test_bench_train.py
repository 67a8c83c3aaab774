"""`python -m launch.bench train` runs (a smoke test of the benchmark's plumbing, not a timing test)."""
import json

from engine.config import GLMConfig
from engine.parallel import ParallelDims
from engine.parallel.accounting import analytic_step_bytes
from launch.bench import main


def test_train_benchmark_runs_a_context_parallel_layout(tmp_path):
    out = tmp_path / "train.json"
    assert main(["train", "--layouts", "1,1,1 1,1,1,1,2", "--seq", "16", "--global-batch", "2", "--steps", "2",
                 "--dtypes", "", "--mm-size", "64", "--json", str(out)]) == 0
    one, cp2 = json.loads(out.read_text())["layouts"]
    assert (one["cp"], cp2["cp"]) == (1, 2) and one["comm_bytes"] == {}
    assert one["tokens_per_s"] > 0 and cp2["tokens_per_s"] > 0
    # the step's bytes are the analytic ones for that layout (K/V gathers over cp, gradients over dp x cp)
    dims = ParallelDims(cp=2, dp=1).validate(2)
    want = analytic_step_bytes(GLMConfig.preset("tiny"), dims, 0, global_batch_size=2, micro_batch_size=1,
                               seq_length=16)
    assert set(cp2["comm_bytes"]) == set(want) == {"cp", "dp"}
    for group, nbytes in want.items():
        assert abs(cp2["comm_bytes"][group] - nbytes) <= 1e-9 * nbytes, group
