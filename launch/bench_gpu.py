"""GPU validation on a lent GPU machine: ``python -m launch.bench gpu [options]``.

One command, one JSON, within a time budget (the device tool allows 600 s per command, and the
machine has no network, so everything it needs must already be in the repository or carried):

1. build: when ``kernels._cuda_ops`` (csrc/) does not import and torch has CUDA, ``python setup.py
   build_ext --inplace`` for this GPU's architecture only (``TORCH_CUDA_ARCH_LIST`` unless already
   set; ninja when present). A failed or timed-out build is recorded and the run goes on.
2. environment: torch, triton, CUDA, nvcc, driver, GPU name and SM count, which optional backends
   import (liger_kernel, apex, transformer_engine, flash_attn, kernels._cuda_ops).
3. tests: ``pytest tests/kernels`` with ``TRITON_INTERPRET=0`` (the kernels run on the GPU), plus the
   GPU-only tests outside it (``GPU_TESTS``: the offloader against the CUDA allocator), in a
   subprocess with a timeout; the full log and a junit XML go next to the JSON, the failures into it.
4. benchmarks: the device's copy / matmul rates, then every op of ``launch.bench kernels``; the
   ``torch.compile`` rows run last (compiling costs tens of seconds per op), and an implementation
   that would start with too little budget left is recorded as skipped with the reason.

The JSON is rewritten (atomically) after every stage and before every timed implementation, with
``"in_progress"`` naming what was running, so a run killed at the limit still leaves its results.

Files, in ``$OUT`` when that variable is set (the device tool brings that folder back), else in the
current directory; ``--json`` moves all four: ``bench-gpu.json``, ``bench-gpu-build.log``,
``bench-gpu-tests.log``, ``bench-gpu-tests.xml``.

Without a GPU the run refuses (exit 2) unless ``--device cpu`` is given: a CPU rehearsal of the same
stages (the build is skipped for a CPU torch; Triton kernel tests skip with the interpreter off).
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

import torch

from launch import bench_kernels as bk

ROOT = Path(__file__).resolve().parents[1]

# Budget defaults. One device command may run 600 s; 510 leaves room for interpreter start-up and
# imports (before the clock starts), the last implementation overrunning its check (it may start
# with 60 s left), and writing the files.
DEFAULT_BUDGET_S = 510.0
# Building csrc for one architecture: three sources, torch's headers make cuda_ops.cpp the slow one
# (expected ~1 min with ninja; not yet measured on the lent machine).
DEFAULT_BUILD_TIMEOUT_S = 240.0
# What the tests leave for the benchmarks: device rates plus our kernels and torch at full size.
DEFAULT_BENCH_RESERVE_S = 150.0
MIN_TESTS_TIMEOUT_S = 60.0
# One kernel test that runs longer than this is failed by pytest-timeout (when installed) so one hang
# does not use up the whole tests stage; the GPU compile test compiles every spec twice, ~1 min.
PER_TEST_TIMEOUT_S = 180
# An implementation starts only with this much budget left. torch.compile's first call compiles the
# forward and backward graphs (tens of seconds per op), so it needs more; it also runs last.
IMPL_MIN_LEFT_S = {"torch.compile": 60.0}
DEFAULT_IMPL_MIN_LEFT_S = 15.0
DEFERRED_IMPLS = ("torch.compile",)
OPTIONAL_BACKENDS = {  # module -> distribution name for the version
    "liger_kernel": "liger-kernel", "apex": "apex", "transformer_engine": "transformer-engine",
    "flash_attn": "flash-attn", "kernels._cuda_ops": None}
TAIL_CHARS = 4000


class Budget:
    """Seconds left of ``total_s``, counted from construction."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        if total_s <= 0:
            raise ValueError(f"--budget-s must be positive, got {total_s}")
        self.total_s = float(total_s)
        self._clock = clock
        self._start = clock()

    def spent(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return self.total_s - self.spent()


def default_json_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "bench-gpu.json" if out else Path("bench-gpu.json")


def companion_paths(json_path: Path) -> dict:
    stem = json_path.with_suffix("") if json_path.suffix == ".json" else json_path
    return {"build_log": Path(f"{stem}-build.log"), "tests_log": Path(f"{stem}-tests.log"),
            "tests_xml": Path(f"{stem}-tests.xml")}


def write_json(path: Path, report: dict) -> None:
    """Write-then-rename, so a run killed mid-write leaves the previous complete JSON."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` with stdout+stderr streamed into ``log_path`` (complete even if we are killed).
    On timeout the child's whole process group is killed (pytest's workers, nvcc under ninja)."""
    # Own process group, same session: the device tool ends a command's leftover processes unless
    # they started a new session, so a killed run cannot leave pytest or nvcc running on the GPU.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, **group)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
            log.write(f"\n[launch.bench gpu] killed after the {timeout_s:.0f} s timeout\n")
    return {"returncode": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------------
# Stage 1: build the CUDA extension
# ------------------------------------------------------------------------------------------------

def cuda_ops_import_error() -> Optional[str]:
    """None when ``kernels._cuda_ops`` imports, else why not. Goes through ``kernels._cuda.load_cuda_ops``
    so that, after a build, this process's ``backend="cuda"`` rows use the new library too (a failed
    import leaves nothing cached in sys.modules, so the retry loads it)."""
    from kernels import _cuda
    if _cuda.load_cuda_ops():
        return None
    exc = _cuda._IMPORT_ERROR
    return f"{type(exc).__name__}: {exc}"[:500]


def cuda_arch_list(device) -> str:
    """TORCH_CUDA_ARCH_LIST if the caller set it, else this GPU's architecture alone (e.g. "9.0"):
    building for one architecture instead of setup.py's default two halves the nvcc time."""
    preset = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if preset:
        return preset
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def build_command() -> list[str]:
    return [sys.executable, "setup.py", "build_ext", "--inplace"]


def build_env(arch_list: str) -> dict:
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list)
    # torch's BuildExtension uses ninja only if `ninja` is on PATH; the pip-installed one sits next to
    # this interpreter, which is not always on PATH when python3 is called by its full name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def build_stage(device, log_path: Path, timeout_s: float, skip: bool = False, runner=run_logged) -> dict:
    """Build ``kernels._cuda_ops`` in place when it does not import; never raises."""
    if skip:
        return {"skipped": "--skip-build"}
    if torch.version.cuda is None:
        return {"skipped": f"torch {torch.__version__} has no CUDA: setup.py does not build the extension"}
    before = cuda_ops_import_error()
    if before is None:
        return {"skipped": "kernels._cuda_ops already imports", "ok": True}
    arch = cuda_arch_list(device)
    cmd = build_command()
    env = build_env(arch)
    res = {"reason": before, "command": shlex.join(cmd), "TORCH_CUDA_ARCH_LIST": arch,
           "ninja": shutil.which("ninja", path=env["PATH"]) is not None, "timeout_s": round(timeout_s),
           "log": str(log_path)}
    print(f"[build] kernels._cuda_ops does not import ({before[:120]}); {res['command']} "
          f"(TORCH_CUDA_ARCH_LIST={arch}, ninja {'yes' if res['ninja'] else 'no'}, timeout {timeout_s:.0f} s)",
          flush=True)
    try:
        res.update(runner(cmd, log_path, timeout_s, env))
    except Exception as exc:  # the build must never stop the tests and benchmarks that follow
        res["error"] = f"{type(exc).__name__}: {exc}"[:500]
    res["tail"] = _tail(log_path, 3000)
    # Checked whatever the return code: setup.py also builds the data helpers, and their failure
    # alone would fail the command after kernels._cuda_ops was built.
    res["import_error"] = cuda_ops_import_error()
    res["ok"] = res["import_error"] is None
    status = "ok" if res["ok"] else ("timed out" if res.get("timed_out") else "FAILED")
    print(f"[build] {status} in {res.get('seconds', 0)} s (log {log_path})", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# Stage 2: environment
# ------------------------------------------------------------------------------------------------

def _command_output(cmd: list[str], timeout_s: float = 20.0) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except Exception:  # not installed, or hung
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _module_status(module: str, dist: Optional[str]) -> dict:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # broken installs raise all sorts, not only ImportError
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    version = getattr(mod, "__version__", None)
    if version is None and dist:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(dist)
        except Exception:
            version = None
    return {"importable": True, "version": version}


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    env["triton"] = _module_status("triton", "triton").get("version")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   gpu_memory_GiB=round(props.total_memory / 2 ** 30, 1))
    smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    env["driver"] = smi.splitlines()[0].split(",")[1].strip() if smi and smi.count(",") >= 1 else None
    if env["driver"] is None:  # no nvidia-smi on PATH: the kernel module's own line
        try:
            env["driver"] = Path("/proc/driver/nvidia/version").read_text(errors="replace").splitlines()[0][:200]
        except (OSError, IndexError):
            pass
    nvcc = shutil.which("nvcc") or (str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    out = _command_output([nvcc, "--version"]) if nvcc else None
    env["nvcc"] = next((line for line in (out or "").splitlines() if "release" in line), None)
    env["optional_backends"] = {m: _module_status(m, d) for m, d in OPTIONAL_BACKENDS.items()}
    return env


# ------------------------------------------------------------------------------------------------
# Stage 3: kernel tests
# ------------------------------------------------------------------------------------------------

# GPU-only tests outside tests/kernels (they skip on a CPU machine, so CI never runs them)
GPU_TESTS = ("tests/test_rlhf_offload.py::test_offloading_frees_the_allocators_device_memory",)


def pytest_command(xml_path: Path, extra: list[str], per_test_timeout_s: Optional[int]) -> list[str]:
    # -v: every test's id is written when it starts, so a log cut off by the timeout names the test
    # that was running; -rfE lists failures and errors at the end; junit XML for the full record.
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", *GPU_TESTS, "-v", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={xml_path}", "--durations=15"]
    if per_test_timeout_s:
        cmd += [f"--timeout={per_test_timeout_s}"]
    return cmd + list(extra)


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
# A -v line: the test id (parametrize ids may hold spaces, e.g. "(3, 37, 100)"), then the result once
# the test is done; a line cut off by the timeout has the id alone.
_TEST_LINE = re.compile(r"^(tests/\S*?::.*?)(?:\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*)?$")


def summarize_pytest_log(log: str) -> dict:
    """Counts from pytest's last summary line, failures from the -v result lines, and the last test
    that started (the one running when a timeout cut the log)."""
    summary = next((ln.strip("= ") for ln in reversed(log.splitlines()) if _COUNT.search(ln) and " in " in ln), "")
    counts = {}
    for n, kind in _COUNT.findall(summary):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    failures, last = [], None
    for line in log.splitlines():
        m = _TEST_LINE.match(line.rstrip())
        if not m:
            continue
        last = m.group(1).strip()
        if m.group(2) in ("FAILED", "ERROR"):
            failures.append({"test": last, "kind": m.group(2).lower()})
    return {"summary": summary, "counts": counts, "failures": failures, "last_test_started": last}


def junit_failures(xml_path: Path, limit: int = 100) -> Optional[list]:
    """Failed / errored test cases with their message, or None if there is no readable XML."""
    try:
        root = ET.parse(xml_path).getroot()
    except Exception:  # not written (killed by the timeout) or truncated
        return None
    out = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                test = f"{case.get('classname', '')}::{case.get('name', '')}"
                out.append({"test": test, "kind": kind, "message": (el.get("message") or "")[:400]})
    return out[:limit]


def tests_stage(log_path: Path, xml_path: Path, timeout_s: float, extra_args: list[str],
                runner=run_logged) -> dict:
    per_test = PER_TEST_TIMEOUT_S if importlib.util.find_spec("pytest_timeout") else None
    cmd = pytest_command(xml_path, extra_args, per_test)
    # "0", not unset: tests/conftest.py only sets a default of "1"; unbuffered so the log is complete
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    res = {"command": shlex.join(cmd), "timeout_s": round(timeout_s), "per_test_timeout_s": per_test,
           "log": str(log_path), "junit_xml": str(xml_path)}
    print(f"[tests] {res['command']} (TRITON_INTERPRET=0, timeout {timeout_s:.0f} s)", flush=True)
    if xml_path.exists():
        xml_path.unlink()  # a stale XML from an earlier run must not pass for this one's
    try:
        res.update(runner(cmd, log_path, timeout_s, env))
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:500]
    log = _tail(log_path, 10 ** 9)
    res.update(summarize_pytest_log(log))
    from_xml = junit_failures(xml_path)
    if from_xml is not None:
        res["failures"] = from_xml
    res["tail"] = log[-TAIL_CHARS:]
    res["ok"] = res.get("returncode") == 0
    state = "timed out" if res.get("timed_out") else f"rc {res.get('returncode')}"
    print(f"[tests] {state} in {res.get('seconds', 0)} s: {res['summary'] or '(no summary line)'}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# Stage 4: benchmarks within the budget
# ------------------------------------------------------------------------------------------------

def budget_reason(budget: Budget, impl: str) -> Optional[str]:
    need = IMPL_MIN_LEFT_S.get(impl, DEFAULT_IMPL_MIN_LEFT_S)
    left = budget.left()
    if left < need:
        return (f"time budget: {max(left, 0):.0f} s of {budget.total_s:.0f} s left; "
                f"{impl} starts only with >= {need:.0f} s")
    return None


def run_benchmarks(ops: list[str], shapes, device, dtype, repeats: int, rates: dict, budget: Budget,
                   checkpoint: Callable[[list, str], None]) -> list[dict]:
    """Every op without the deferred implementations, then the deferred ones (torch.compile) per op.
    ``checkpoint(rows, in_progress)`` is called before each implementation and after each op."""
    by_op: dict = {op: [] for op in ops}

    def all_rows():
        return [r for op in ops for r in by_op[op]]

    for pass_name, keep in (("main", lambda n: n not in DEFERRED_IMPLS), ("deferred", lambda n: n in DEFERRED_IMPLS)):
        for op in ops:
            reason = budget_reason(budget, "*")
            if reason:
                by_op[op].append({"op": op, "impl": "*" if pass_name == "main" else "/".join(DEFERRED_IMPLS),
                                  "skipped": reason})
                continue

            def before(name, op=op):
                checkpoint(all_rows(), f"benchmark {op} / {name}")
                return budget_reason(budget, name)

            checkpoint(all_rows(), f"benchmark {op} ({pass_name})")
            by_op[op].extend(bk.run_op(op, shapes, device, dtype, repeats, rates, only=keep, budget_skip=before))
            checkpoint(all_rows(), "")
    return all_rows()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bk.add_arguments(p)
    p.add_argument("--json", default=None, help="result file (default $OUT/bench-gpu.json if OUT is set, "
                   "else bench-gpu.json); the logs go next to it")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all stages together (default %(default)s)")
    p.add_argument("--build-timeout-s", type=float, default=DEFAULT_BUILD_TIMEOUT_S)
    p.add_argument("--tests-timeout-s", type=float, default=None,
                   help="default: what the budget has left minus --bench-reserve-s (at least 60 s)")
    p.add_argument("--bench-reserve-s", type=float, default=DEFAULT_BENCH_RESERVE_S,
                   help="budget kept for the benchmarks when the tests start (default %(default)s)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-k rms_norm\"")
    args = p.parse_args(argv)
    ops, device, dtype, shapes, repeats = bk.parse_selection(p, args)
    if device.type != "cuda" and args.device is None:
        print("launch.bench gpu: no CUDA device here, nothing to validate (pass --device cpu for a CPU "
              "rehearsal of the same stages)", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    json_path = Path(args.json) if args.json else default_json_path()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files = companion_paths(json_path)
    torch.manual_seed(0)
    command = "python -m launch.bench gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    report = bk.describe_run(device, args, shapes, command)
    report.update(budget_s=budget.total_s, files={k: str(v) for k, v in files.items()}, stage_seconds={})

    def save(stage: str) -> None:
        report["in_progress"] = stage
        report["budget_spent_s"] = round(budget.spent(), 1)
        write_json(json_path, report)

    def timed(stage: str, fn):
        save(stage)
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            report["stage_seconds"][stage] = round(time.monotonic() - t0, 1)

    if device.type == "cuda":  # a hang past the budget prints every thread's stack before the kill
        faulthandler.dump_traceback_later(budget.total_s + 30, exit=False)

    build_timeout = max(30.0, min(args.build_timeout_s, budget.left() / 2))
    report["build"] = timed("build", lambda: build_stage(device, files["build_log"], build_timeout, args.skip_build))
    report["environment"] = timed("environment", lambda: environment(device))
    if args.skip_tests:
        report["kernel_tests"] = {"skipped": "--skip-tests"}
    else:
        tests_timeout = args.tests_timeout_s or max(MIN_TESTS_TIMEOUT_S, budget.left() - args.bench_reserve_s)
        report["kernel_tests"] = timed("tests", lambda: tests_stage(
            files["tests_log"], files["tests_xml"], tests_timeout, shlex.split(args.pytest_args)))

    print(f"device {report['device']} ({device.type}), torch {torch.__version__}, triton {report['triton']}, "
          f"dtype {args.dtype}, shapes {report['shapes']}, budget left {budget.left():.0f} s", flush=True)
    try:
        rates = timed("device rates", lambda: bk.device_rates(device, args.small, repeats))
        report["device_rates"] = rates
    except Exception as exc:  # without the rates the rows cannot be normalised: record and stop there
        report["device_rates"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        rates = None
    if rates is not None:
        def checkpoint(rows, stage):
            report["results"] = rows
            save(stage)

        try:
            report["results"] = timed("benchmarks", lambda: run_benchmarks(
                ops, shapes, device, dtype, repeats, rates, budget, checkpoint))
        except Exception as exc:  # e.g. a sticky CUDA error: keep the rows so far, the table and the summary
            report["benchmarks_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"[benchmarks] stopped: {report['benchmarks_error']}", file=sys.stderr, flush=True)
    save("")
    faulthandler.cancel_dump_traceback_later()

    print()
    if report.get("results"):
        bk.print_rows(report["results"])
    print()
    _print_summary(report, json_path)
    build_ok = report["build"].get("ok", True)
    tests_ok = report["kernel_tests"].get("ok", True)
    return 0 if (build_ok and tests_ok and rates is not None and "benchmarks_error" not in report) else 1


def _print_summary(report: dict, json_path: Path) -> None:
    """Last lines of the output: what the device tool's output tail must show."""
    b = report["build"]
    if "skipped" in b:
        print(f"build: {b['skipped']}")
    else:
        state = "ok" if b.get("ok") else ("TIMED OUT" if b.get("timed_out") else "FAILED")
        why = f": {b['import_error']}" if b.get("import_error") else ""
        print(f"build: {state} (rc {b.get('returncode')}) in {b.get('seconds')} s, TORCH_CUDA_ARCH_LIST "
              f"{b.get('TORCH_CUDA_ARCH_LIST')} ({b.get('log')}){why}")
    env = report["environment"]
    backends = ", ".join(f"{m} {'yes' if s['importable'] else 'no'}" for m, s in env["optional_backends"].items())
    print(f"environment: {env.get('gpu', 'cpu')}, SMs {env.get('sm_count')}, driver {env.get('driver')}, "
          f"CUDA {env.get('torch_cuda')}, triton {env.get('triton')}; {backends}")
    t = report["kernel_tests"]
    if "skipped" in t:
        print(f"kernel tests: {t['skipped']}")
    else:
        state = "TIMED OUT" if t.get("timed_out") else f"rc {t.get('returncode')}"
        print(f"kernel tests: {state} in {t.get('seconds')} s: {t.get('summary')}")
        for f in t.get("failures", [])[:15]:
            print(f"  {f['kind'].upper()} {f['test']} {f.get('message', '')[:150]}")
        if t.get("timed_out"):
            print(f"  last test started: {t.get('last_test_started')}")
    print(f"budget: {report['budget_spent_s']} of {report['budget_s']:.0f} s; stages {report['stage_seconds']}")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    sys.exit(main())
