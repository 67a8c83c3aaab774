"""``python -m launch.bench gpu`` (launch/bench_gpu.py) on a machine without a GPU.

Nobody can try the GPU run before a lent machine runs it once, within one 600 s command, so every
part that does not need the GPU is checked here: the build command and what a failed, crashed or
timed-out build leaves in the report; the pytest stage's timeout, log and failure parsing; the time
budget skipping implementations; the JSON written after every stage; the CUDA-event timing loop
(against fake events). The CPU rehearsal (``--device cpu``) runs the same stages end to end.
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import bench_gpu as bg
from launch import bench_kernels as bk

PY = sys.executable


def _fake_cuda_torch(monkeypatch, import_error="ModuleNotFoundError: No module named 'kernels._cuda_ops'"):
    """A torch that says it has CUDA, an extension that does not import, a GPU of compute capability 9.0."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(bg, "cuda_ops_import_error", lambda: import_error)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)


# ------------------------------------------------------------------------------------------------
# Build stage
# ------------------------------------------------------------------------------------------------

def test_build_command_targets_this_gpu_only(monkeypatch):
    _fake_cuda_torch(monkeypatch)
    assert bg.build_command() == [PY, "setup.py", "build_ext", "--inplace"]
    assert bg.cuda_arch_list("cuda") == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # the caller's choice wins
    assert bg.cuda_arch_list("cuda") == "8.0;9.0"
    env = bg.build_env("9.0")
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(PY).parent)  # the venv's ninja is found


def test_failed_build_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    _fake_cuda_torch(monkeypatch)
    seen = {}

    def failing_runner(cmd, log_path, timeout_s, env):
        seen.update(cmd=cmd, env=env, timeout_s=timeout_s)
        Path(log_path).write_text("building 'kernels._cuda_ops'\nnvcc fatal : Unsupported gpu architecture\n")
        return {"returncode": 1, "timed_out": False, "seconds": 0.5}

    log = tmp_path / "build.log"
    res = bg.build_stage("cuda", log, 120.0, runner=failing_runner)
    assert res["ok"] is False and res["returncode"] == 1
    assert "nvcc fatal" in res["tail"] and res["log"] == str(log)
    assert res["command"].endswith("setup.py build_ext --inplace") and res["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert seen["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and seen["timeout_s"] == 120.0
    assert "No module named" in res["reason"]
    json.dumps(res)  # goes into the report as is


def test_build_runner_crash_is_recorded(monkeypatch, tmp_path):
    _fake_cuda_torch(monkeypatch)

    def crashing_runner(cmd, log_path, timeout_s, env):
        raise FileNotFoundError("no such interpreter")

    res = bg.build_stage("cuda", tmp_path / "build.log", 60.0, runner=crashing_runner)
    assert res["ok"] is False and "FileNotFoundError" in res["error"]


def test_build_with_a_real_failing_and_a_hanging_subprocess(monkeypatch, tmp_path):
    _fake_cuda_torch(monkeypatch)
    monkeypatch.setattr(bg, "build_command", lambda: [PY, "-c", "print('compiling rms_norm.cu'); raise SystemExit(3)"])
    res = bg.build_stage("cuda", tmp_path / "build.log", 60.0)
    assert res["ok"] is False and res["returncode"] == 3 and not res["timed_out"]
    assert "compiling rms_norm.cu" in res["tail"]

    hang = "import time; print('nvcc', flush=True); time.sleep(60)"
    monkeypatch.setattr(bg, "build_command", lambda: [PY, "-c", hang])
    t0 = time.monotonic()
    res = bg.build_stage("cuda", tmp_path / "build2.log", 1.0)
    assert time.monotonic() - t0 < 30
    assert res["ok"] is False and res["timed_out"] is True and res["returncode"] is None
    assert "nvcc" in res["tail"] and "killed after the 1 s timeout" in res["tail"]


def test_build_succeeds_but_extension_still_does_not_import(monkeypatch, tmp_path):
    _fake_cuda_torch(monkeypatch, import_error="ImportError: undefined symbol")
    res = bg.build_stage("cuda", tmp_path / "b.log", 60.0,
                         runner=lambda cmd, log, t, env: {"returncode": 0, "timed_out": False, "seconds": 1.0})
    assert res["ok"] is False and "undefined symbol" in res["import_error"]


def test_extension_that_imports_after_a_failed_command_counts(monkeypatch, tmp_path):
    # e.g. the data helpers failed after kernels._cuda_ops was built: the CUDA rows can still run
    _fake_cuda_torch(monkeypatch)
    answers = iter(["ModuleNotFoundError: no kernels._cuda_ops", None])
    monkeypatch.setattr(bg, "cuda_ops_import_error", lambda: next(answers))
    res = bg.build_stage("cuda", tmp_path / "b.log", 60.0,
                         runner=lambda cmd, log, t, env: {"returncode": 1, "timed_out": False, "seconds": 1.0})
    assert res["ok"] is True and res["returncode"] == 1 and res["import_error"] is None


def test_build_skipped_without_cuda_torch_or_when_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA" in bg.build_stage("cpu", tmp_path / "b.log", 60.0)["skipped"]
    assert bg.build_stage("cpu", tmp_path / "b.log", 60.0, skip=True) == {"skipped": "--skip-build"}
    _fake_cuda_torch(monkeypatch, import_error=None)
    assert bg.build_stage("cuda", tmp_path / "b.log", 60.0)["ok"] is True  # already built: nothing to do


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting for a reaper has already exited


def test_timeout_kills_the_whole_process_group(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('grandchild', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    log = tmp_path / "log"
    res = bg.run_logged([PY, "-c", script], log, 2.0, dict(os.environ))
    assert res["timed_out"] and res["returncode"] is None
    pid = int(log.read_text().split("grandchild ")[1].split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the test's grandchild survived the timeout"


# ------------------------------------------------------------------------------------------------
# Tests stage
# ------------------------------------------------------------------------------------------------

V_LOG = """$ python -m pytest tests/kernels -v
tests/kernels/test_rms_norm.py::test_a[cuda-bf16] PASSED                    [ 10%]
tests/kernels/test_rms_norm.py::test_b[plain-(3, 37, 100)-cuda] FAILED      [ 20%]
tests/kernels/test_swiglu.py::test_c ERROR                                  [ 30%]
tests/kernels/test_swiglu.py::test_d SKIPPED (needs a GPU)                  [ 40%]
=========================== short test summary info ============================
FAILED tests/kernels/test_rms_norm.py::test_b[plain-(3, 37, 100)-cuda] - AssertionError: y max err
==== 1 failed, 1 passed, 1 skipped, 1 error in 12.34s ====
"""


def test_pytest_log_summary_counts_and_failures():
    s = bg.summarize_pytest_log(V_LOG)
    assert s["summary"] == "1 failed, 1 passed, 1 skipped, 1 error in 12.34s"
    assert s["counts"] == {"failed": 1, "passed": 1, "skipped": 1, "errors": 1}
    assert s["failures"] == [
        {"test": "tests/kernels/test_rms_norm.py::test_b[plain-(3, 37, 100)-cuda]", "kind": "failed"},
        {"test": "tests/kernels/test_swiglu.py::test_c", "kind": "error"}]
    # cut off by the timeout: no summary; the last id written is the test that was running
    cut = "tests/kernels/test_a.py::test_x PASSED  [ 1%]\ntests/kernels/test_flash.py::test_hangs[(2, 3)-cuda] "
    s = bg.summarize_pytest_log(cut)
    assert s["summary"] == "" and s["counts"] == {} and s["failures"] == []
    assert s["last_test_started"] == "tests/kernels/test_flash.py::test_hangs[(2, 3)-cuda]"


def test_junit_failures(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite>'
                   '<testcase classname="tests.kernels.test_rms_norm" name="test_ok"/>'
                   '<testcase classname="tests.kernels.test_rms_norm" name="test_bad">'
                   '<failure message="y off by 3x"/></testcase>'
                   '<testcase classname="tests.kernels.test_swiglu" name="test_err">'
                   '<error message="CUDA error"/></testcase>'
                   '</testsuite></testsuites>')
    assert bg.junit_failures(xml) == [
        {"test": "tests.kernels.test_rms_norm::test_bad", "kind": "failure", "message": "y off by 3x"},
        {"test": "tests.kernels.test_swiglu::test_err", "kind": "error", "message": "CUDA error"}]
    assert bg.junit_failures(tmp_path / "missing.xml") is None
    (tmp_path / "cut.xml").write_text("<testsuites><testsu")
    assert bg.junit_failures(tmp_path / "cut.xml") is None


def test_tests_stage_timeout_is_recorded(tmp_path):
    def hung_runner(cmd, log_path, timeout_s, env):
        assert env["TRITON_INTERPRET"] == "0" and "tests/kernels" in cmd
        Path(log_path).write_text("tests/kernels/test_a.py::test_x PASSED [ 1%]\ntests/kernels/test_b.py::test_y ")
        return {"returncode": None, "timed_out": True, "seconds": 300.0}

    res = bg.tests_stage(tmp_path / "t.log", tmp_path / "t.xml", 300.0, [], runner=hung_runner)
    assert res["ok"] is False and res["timed_out"] and res["timeout_s"] == 300
    assert res["last_test_started"] == "tests/kernels/test_b.py::test_y"
    assert "--junitxml=" in res["command"] and " -v " in res["command"]


# ------------------------------------------------------------------------------------------------
# Budget, benchmarks, JSON
# ------------------------------------------------------------------------------------------------

def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bg.default_json_path() == tmp_path / "bench-gpu.json"
    monkeypatch.delenv("OUT")
    assert bg.default_json_path() == Path("bench-gpu.json")
    files = bg.companion_paths(tmp_path / "run1.json")
    assert files == {"build_log": tmp_path / "run1-build.log", "tests_log": tmp_path / "run1-tests.log",
                     "tests_xml": tmp_path / "run1-tests.xml"}


class FrozenClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_budget_skips_compile_first_and_runs_it_last():
    clock = FrozenClock()
    budget = bg.Budget(40.0, clock=clock)  # 40 s left: enough for a plain implementation, not to compile
    checkpoints = []
    rates = {"copy_GBps": 10.0, "matmul_TFLOPs": 0.1}
    rows = bg.run_benchmarks(["rms_norm"], bk.SMALL, torch.device("cpu"), torch.float32, 2, rates, budget,
                             lambda rows, stage: checkpoints.append((len(rows), stage)))
    impls = [r["impl"] for r in rows]
    assert impls[-1] == "torch.compile" and impls.count("torch.compile") == 1
    assert "fwd_ms" in rows[0] and rows[0]["impl"] == "torch"
    assert "time budget" in rows[-1]["skipped"] and ">= 60 s" in rows[-1]["skipped"]
    stages = [s for _, s in checkpoints]
    assert "benchmark rms_norm / torch" in stages and "benchmark rms_norm / torch.compile" in stages

    clock.now += 39.0  # 1 s left: every op is skipped without being built
    rows = bg.run_benchmarks(["rms_norm", "swiglu"], bk.SMALL, torch.device("cpu"), torch.float32, 2, rates, budget,
                             lambda rows, stage: None)
    assert [r["op"] for r in rows] == ["rms_norm", "rms_norm", "swiglu", "swiglu"]
    assert all("time budget" in r["skipped"] for r in rows)


def test_rms_norm_case_routes_other_backends_through_kernels_rms_norm():
    case = bk.CASES["rms_norm"](bk.SMALL, torch.device("cpu"), torch.float32)
    for name in ("cuda", "apex", "transformer_engine", "liger"):
        assert name in case.skipped, case.skipped  # on CPU every one of them says why it is absent
    assert "needs a CUDA device" in case.skipped["transformer_engine"]


def test_cuda_event_timing_loop_with_fake_events(monkeypatch):
    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ms = bk._cuda_median_ms(lambda: (calls.append(1), time.sleep(0.002)), torch.device("cpu"))
    assert 1.5 < ms < 50
    # 1 + 3 + warm-up (25 ms of ~2 ms calls) + timed (100 ms of ~2 ms calls, at least 10)
    assert 4 + 2 + bk._CUDA_CALLS[0] <= len(calls) <= 4 + 20 + 60


def test_cpu_rehearsal_writes_every_stage(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    rc = bg.main(["--device", "cpu", "--small", "--op", "rms_norm", "--dtype", "fp32", "--repeats", "2",
                  "--pytest-args", "-k 'test_rms_norm and test_bad_inputs_name_tensor_and_shape'"])
    report = json.loads((out / "bench-gpu.json").read_text())
    assert rc == 0, report["kernel_tests"]
    assert report["in_progress"] == "" and report["budget_s"] == bg.DEFAULT_BUDGET_S
    assert "has no CUDA" in report["build"]["skipped"]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and set(env["optional_backends"]) == set(bg.OPTIONAL_BACKENDS)
    tests = report["kernel_tests"]
    assert tests["ok"] and tests["counts"]["passed"] == 1 and tests["failures"] == []
    assert (out / "bench-gpu-tests.log").read_text().count("PASSED") == 1
    assert (out / "bench-gpu-tests.xml").exists()
    assert {r["impl"] for r in report["results"]} >= {"torch", "triton", "torch.compile", "transformer_engine"}
    assert set(report["stage_seconds"]) == {"build", "environment", "tests", "device rates", "benchmarks"}
    assert sorted(p.name for p in out.iterdir()) == ["bench-gpu-tests.log", "bench-gpu-tests.xml", "bench-gpu.json"]


def test_a_benchmark_stage_crash_keeps_the_report_and_fails_the_run(tmp_path, monkeypatch, capsys):
    """E.g. a sticky CUDA error raised outside one implementation's try: the rows so far, the summary
    and the final JSON survive, the error is recorded and the exit code says so."""
    def crash(ops, shapes, device, dtype, repeats, rates, budget, checkpoint):
        checkpoint([{"op": "rms_norm", "impl": "torch", "skipped": "stand-in row"}], "benchmark rms_norm")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bg, "run_benchmarks", crash)
    path = tmp_path / "r.json"
    rc = bg.main(["--device", "cpu", "--small", "--op", "rms_norm", "--skip-tests", "--json", str(path)])
    report = json.loads(path.read_text())
    assert rc == 1 and "illegal memory access" in report["benchmarks_error"] and report["in_progress"] == ""
    assert report["results"] == [{"op": "rms_norm", "impl": "torch", "skipped": "stand-in row"}]
    assert "illegal memory access" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu_unless_cpu_is_asked(tmp_path):
    assert bg.main(["--json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_bench_dispatches_gpu_suite():
    from launch import bench
    assert bench.SUITES["gpu"] == "launch.bench_gpu"


def test_failed_build_fails_the_run_but_benchmarks_still_run(monkeypatch, tmp_path, capsys):
    failed = {"command": "python setup.py build_ext --inplace", "returncode": 1, "timed_out": False, "seconds": 3.0,
              "TORCH_CUDA_ARCH_LIST": "9.0", "log": "b.log", "import_error": "ModuleNotFoundError: x", "ok": False}
    monkeypatch.setattr(bg, "build_stage", lambda *args, **kwargs: dict(failed))
    rc = bg.main(["--device", "cpu", "--small", "--op", "swiglu", "--dtype", "fp32", "--repeats", "2",
                  "--skip-tests", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and report["build"] == failed
    assert any("fwd_ms" in r for r in report["results"])
    assert "build: FAILED (rc 1) in 3.0 s" in capsys.readouterr().out
