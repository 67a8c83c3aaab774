"""The training launcher: torchrun with 4 processes (tp=2, pp=2), config parsing, clear errors, SLURM script."""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train.lr import LRConfig, LRSchedule
from launch.train import load_run_config, main, torchrun_command, validate_run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "runs" / "pretrain.yaml"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _lines(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_tp2_pp2_trains_and_writes_metrics(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "launch.train", "--config", str(CONFIG), "--tp", "2", "--pp", "2", "--train-steps", "3",
           "--global-batch-size", "4", "--micro-batch-size", "1", "--seq-length", "32", "--lr", "3e-3",
           "--log-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _lines(tmp_path)
    assert [d["step"] for d in lines] == [0, 1, 2]
    for d in lines:
        for key in ("loss", "grad_norm", "lr", "tokens_per_s", "bubble_fraction", "bubble_fraction_cpu"):
            assert isinstance(d[key], float) and math.isfinite(d[key]), (key, d)
        assert d["schedule"] == "1f1b" and d["num_microbatches"] == 4 and d["tokens"] == 4 * 32
        assert d["comm_bytes"]["tp"] > 0 and d["comm_bytes"]["pp"] > 0 and "dp" not in d["comm_bytes"]
        assert math.isclose(d["bubble_fraction_analytic"], 1 / 5)
    # lr: 2 warm-up steps to 3e-3 (configs/runs/pretrain.yaml), then cosine over the 3-step run
    assert [d["lr"] for d in lines] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert abs(lines[0]["loss"] - math.log(4096)) < 0.5  # random init over a 4096-token vocabulary
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert json.loads((tmp_path / "config.json").read_text())["parallel"] == {"tp": 2, "pp": 2, "vpp": 1, "cp": 1}


def test_single_process_without_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--train-steps", "1",
           "--global-batch-size", "2", "--micro-batch-size", "1", "--seq-length", "16", "--recompute", "full",
           "--peak-tflops", "0.5", "--log-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = _lines(tmp_path)
    assert line["schedule"] == "no_pipeline" and line["comm_bytes"] == {} and line["num_microbatches"] == 2
    from engine.config import GLMConfig
    from engine.train.observe import flops_per_token
    # --recompute full: MFU counts the model's FLOPs only, HFU adds the recomputed forward
    tflops = line["tokens_per_s"] * flops_per_token(GLMConfig.preset("tiny"), 16, "none") / 1e12
    hw_tflops = line["tokens_per_s"] * flops_per_token(GLMConfig.preset("tiny"), 16, "full") / 1e12
    assert line["model_tflops_per_device"] == pytest.approx(tflops) and line["mfu"] == pytest.approx(tflops / 0.5)
    assert line["hardware_tflops_per_device"] == pytest.approx(hw_tflops)
    assert line["hfu"] == pytest.approx(hw_tflops / 0.5)
    assert line["hfu"] > line["mfu"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard scalars written


@pytest.mark.parametrize("args,needle", [
    (["--tp", "3"], "num_attention_heads=8 is not divisible by tp=3"),
    (["--tp", "2"], "world_size=1 is not divisible by tp=2"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "global_batch_size=6 is not divisible"),
    (["--recompute", "none", "--lr", "-1"], "lr=-1.0"),
    (["--cp", "2"], "world_size=1 is not divisible by tp=1 x pp=1 x cp=2"),
    (["--cp", "2", "--seq-length", "30"], "seq_length=30 divisible by 2 x cp = 4"),
    (["--async-save"], "--async-save needs --save DIR"),
    (["--sequence-parallel"], "sequence_parallel=True needs tp > 1"),
    (["--pack-pairs"], "reward.pack packs preference pairs: mode rm with pp=1 (got mode pretrain"),
])
def test_bad_configuration_exits_2_with_clear_message(args, needle, capsys):
    assert main(["--config", str(CONFIG), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.train: error:") and needle in err and "Traceback" not in err


def test_bad_layout_from_the_command_line_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--pp", "3"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "launch.train: error:" in proc.stderr and "pp=3" in proc.stderr and "Traceback" not in proc.stderr


def test_config_composition_and_overrides(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("model: {preset: tiny, num_layers: 4}\nparallel: {tp: 2, pp: 2, vpp: 2}\n"
                        "train: {global_batch_size: 8, micro_batch_size: 1, layers_per_stage: [1, 1, 1, 1]}\n"
                        "optim: {betas: [0.9, 0.99]}\n")
    run = load_run_config(run_yaml, {"train": {"seq_length": 64}, "lr": {"lr": 1e-3}, "log_dir": "x"})
    assert run.model.num_layers == 4 and run.parallel.vpp == 2 and run.train.seq_length == 64
    assert run.train.layers_per_stage == (1, 1, 1, 1) and run.optim.betas == (0.9, 0.99) and run.lr.lr == 1e-3
    dims = validate_run(run, world_size=8)
    assert dims.dp == 2
    with pytest.raises(ValueError, match=r"multiple of pp=2"):  # dp = 8: one micro-batch per DP rank
        validate_run(run, world_size=32)
    rm_cp = load_run_config(None, {"mode": "rm", "parallel": {"cp": 2}})
    with pytest.raises(ValueError, match="context parallelism is for pretrain and sft"):
        validate_run(rm_cp, world_size=2)
    run_yaml.write_text("train: {global_batch_size: 8, bogus: 1}\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        load_run_config(run_yaml)
    run_yaml.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainer'\]"):
        load_run_config(run_yaml)


def test_slurm_script_parses_and_builds_the_torchrun_command():
    script = ROOT / "launch" / "slurm_train.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(_env(), SLURM_NNODES="4", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="1234", MASTER_ADDR="node-001")
    train_args = ["--config", "configs/runs/pretrain.yaml", "--tp", "8", "--pp", "2", "--log-dir", "runs/a b"]
    proc = subprocess.run(["bash", str(script), "--print-cmd", *train_args], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    printed = shlex.split(proc.stdout)
    expected = ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] + torchrun_command(
        4, 8, "node-001:29500", "1234", train_args)
    assert printed == expected


def test_lr_schedule_warmup_cosine_floor():
    sched = LRSchedule(LRConfig(lr=1.0, min_lr=0.1, warmup_steps=4, style="cosine"), train_steps=14)
    assert [sched(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sched(9) == pytest.approx(0.1 + 0.9 * 0.5)   # half-way through the decay: cos(pi / 2) = 0
    assert sched(14) == pytest.approx(0.1) and sched(100) == pytest.approx(0.1)
    linear = LRSchedule(LRConfig(lr=1.0, min_lr=0.0, warmup_steps=0, style="linear"), train_steps=10)
    assert [linear(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="min_lr=2.0 exceeds lr=1.0"):
        LRSchedule(LRConfig(lr=1.0, min_lr=2.0))
    with pytest.raises(ValueError, match="decay_steps=2 is before the end of warm-up"):
        LRSchedule(LRConfig(warmup_steps=5, decay_steps=2))


def _train(tmp_path, name, *extra, nproc=1):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = prefix + ["-m", "launch.train", "--config", str(CONFIG), "--model", "tiny", "--global-batch-size", "2",
                    "--micro-batch-size", "1", "--seq-length", "16", "--log-dir", str(tmp_path / name), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_save_and_resume_continue_the_same_run(tmp_path):
    """4 steps straight == 2 steps, save, a new process loads and runs 2 more (bitwise on CPU) saving
    asynchronously; a resume at tp=2 continues from the same weights (fp32 rounding of the TP split only)."""
    ck = str(tmp_path / "ck")
    straight = _train(tmp_path, "straight", "--train-steps", "4")
    first = _train(tmp_path, "first", "--train-steps", "2", "--save", ck)
    second = _train(tmp_path, "second", "--train-steps", "4", "--load", ck, "--save", ck, "--save-interval", "1",
                    "--keep-last", "1", "--async-save")  # written in the background, the last one waited for
    for proc in (straight, first, second):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in second.stdout
    full = [d["loss"] for d in _lines(tmp_path / "straight")]
    assert [d["loss"] for d in _lines(tmp_path / "first")] == full[:2]
    assert [d["loss"] for d in _lines(tmp_path / "second")] == full[2:]
    assert sorted(p.name for p in Path(ck).iterdir()) == ["latest", "step_000004"]  # keep-last 1
    tp2 = _train(tmp_path, "tp2", "--train-steps", "5", "--load", ck, "--tp", "2", nproc=2)
    assert tp2.returncode == 0, tp2.stdout + tp2.stderr
    (line,) = _lines(tmp_path / "tp2")
    assert line["step"] == 4 and math.isfinite(line["loss"])


def test_context_parallel_run_resumes_and_matches_one_process(tmp_path):
    """Two steps on cp=2 from a one-process checkpoint (optimizer state loaded into the dp x cp shards of
    the distributed optimizer) equal the same two steps on one process (fp32: summation order only, rel
    1e-5); the cp=2 checkpoint records cp, and one process resumed from it takes the same next step as
    from the one-process run's checkpoint."""
    ck, ck_cp = str(tmp_path / "ck"), str(tmp_path / "ck_cp")
    first = _train(tmp_path, "first", "--train-steps", "1", "--save", ck, "--distributed-optimizer")
    assert first.returncode == 0, first.stdout + first.stderr
    one = _train(tmp_path, "one", "--train-steps", "3", "--load", ck, "--save", str(tmp_path / "ck_one"),
                 "--distributed-optimizer")
    cp2 = _train(tmp_path, "cp2", "--train-steps", "3", "--load", ck, "--save", ck_cp, "--cp", "2",
                 "--distributed-optimizer", "--async-save", nproc=2)
    for proc in (one, cp2):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cp=2" in cp2.stdout
    got, want = _lines(tmp_path / "cp2"), _lines(tmp_path / "one")
    assert [d["step"] for d in got] == [d["step"] for d in want] == [1, 2]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["comm_bytes"]["cp"] > 0 and a["comm_bytes"]["dp"] > 0  # K/V gathers; grads over the dp x cp ranks
    from engine.train.checkpoint import read_manifest
    assert read_manifest(ck_cp)["layout"] == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "world_size": 2, "cp": 2}
    resumed = _train(tmp_path, "resumed", "--train-steps", "4", "--load", ck_cp)
    straight = _train(tmp_path, "straight", "--train-steps", "4", "--load", str(tmp_path / "ck_one"))
    for proc in (resumed, straight):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = _lines(tmp_path / "resumed")
    (want,) = _lines(tmp_path / "straight")
    assert line["step"] == want["step"] == 3 and line["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_load_from_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    proc = _train(tmp_path, "run", "--train-steps", "1", "--load", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert "no checkpoint found" in proc.stderr and "Traceback" not in proc.stderr


def test_close_after_error_reports_without_masking(capsys):
    """While a training error propagates, waiting for the checkpoint save in flight may fail too: that
    failure is printed, and the training error stays the one raised."""
    from launch.runtime import close_after_error

    def failing_close():
        raise RuntimeError("the save failed as well")
    with pytest.raises(ValueError, match="the step failed"):
        try:
            raise ValueError("the step failed")
        except ValueError:
            close_after_error(failing_close, "launch.train")
            raise
    assert "launch.train: while handling an error, closing also failed: RuntimeError: the save failed as well" \
        in capsys.readouterr().err
