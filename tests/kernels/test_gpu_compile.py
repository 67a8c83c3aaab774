"""Every Triton kernel compiles for sm_80 and sm_90 at its launch configuration, on a machine
without a GPU, and ptxas fits it in the register file without spilling.

The ``compile_specs()`` contract
--------------------------------
A kernel module in ``kernels/`` (listed in ``launch.bench_static.MODULES``) opts in by defining a module-level function
``compile_specs()`` that returns a list of tuples ``(jit_fn, signature, constexprs, name[, options])``:

- ``jit_fn``: the ``@triton.jit`` kernel itself (the module-level object; the test imports the module
  with ``TRITON_INTERPRET=0``, so it is a real ``JITFunction`` there).
- ``signature``: dict, parameter name -> Triton type string, for every parameter that is not a
  ``tl.constexpr``: pointers ``"*fp32" "*fp16" "*bf16" "*i32" "*i64" "*u8"``, scalars ``"i32" "i64"
  "fp32"``. (A constexpr parameter may also appear here with the value ``"constexpr"``.)
- ``constexprs``: dict, parameter name -> value, for every ``tl.constexpr`` parameter (block sizes,
  flags, dtypes such as ``tl.bfloat16``). Every parameter must be in ``signature`` or ``constexprs``.
- ``name``: a short unique label for messages, e.g. ``"rms_norm_fwd_bf16_4096"``.
- ``options`` (optional): the launch options the launcher passes, ``{"num_warps": 8, "num_stages": 3}``;
  Triton's defaults (4 warps, 3 stages) when absent. Register use depends on them: the flash-attention
  forward tile that fits 8 warps spills ~1 KB per thread at 4.

Pick the configurations the launchers really use on GPU (block sizes, flags, dtypes, warps, stages,
with the interpreter-only switches off), a handful per kernel: every spec is compiled twice (~0.5 s
each). ``compile_specs()`` must not touch CUDA or allocate tensors.

How: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``, under which ``@triton.jit`` returns interpreter
objects that cannot be compiled, so all specs are compiled in ONE subprocess with ``TRITON_INTERPRET=0``
by ``python -m launch.bench static`` (launch/bench_static.py, which also prints the table for people):
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
options=options)``. ``attrs`` marks pointers and ``stride*`` integers 16-divisible, as the JIT does at
launch for torch allocations and the model's strides (they are multiples of 16 elements), so the code
compiled here is the code that runs (vectorised loads change register use). The PTX is then assembled
with ``ptxas -v`` for the register and spill report. The compile cache (``~/.triton/cache``) is keyed on
the kernel source, so unchanged kernels are fast.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.bench_static import ARCHS, BLOCK_SHARED_LIMIT, MODULES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-m", "launch.bench", "static", "--module", ",".join(MODULES),
                           "--arch", ",".join(map(str, ARCHS)), "--json", "-"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@REPORT@@")]
    if proc.returncode not in (0, 1) or not marker:  # 1: some spec failed, reported per module below
        pytest.fail(f"compile subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(marker[0][len("@@REPORT@@"):])


def test_at_least_one_module_defines_compile_specs(report):
    with_specs = [m for m, r in report.items() if r["status"] == "ok"]
    assert with_specs, f"no kernel module defines compile_specs(): {report}"
    for m in with_specs:
        assert report[m]["specs"], f"{m}.compile_specs() returned no specs"


@pytest.mark.parametrize("module", MODULES)
def test_module_kernels_compile_to_ptx(report, module):
    entry = report[module]
    if entry["status"] != "ok":
        pytest.skip(f"{module}: {entry['status']}")
    names = [s["name"] for s in entry["specs"]]
    assert len(names) == len(set(names)), f"{module}: spec names are not unique: {names}"
    errors = [f"{s['name']}:\n{s['error']}" for s in entry["specs"] if "error" in s]
    assert not errors, f"{module}: {len(errors)} spec(s) failed to compile:\n" + "\n".join(errors)
    for spec in entry["specs"]:
        for arch in ARCHS:
            got = spec[str(arch)]
            assert got["ptx_chars"] > 0 and got["entry"], f"{module} {spec['name']} sm_{arch}: no kernel in PTX: {got}"
            assert got["target"] is not None and got["target"].startswith(f"sm_{arch}"), \
                f"{module} {spec['name']}: PTX target {got['target']} for arch {arch}"


# A few bytes of spill (a loop-invariant scalar or address) cost nothing measurable; a tile that does not
# fit the register file spills hundreds of bytes per thread and every loop iteration pays local-memory
# traffic (the flash-attention forward at 4 instead of 8 warps: ~1 KB). 64 B separates the two.
_MAX_SPILL_BYTES = 64


@pytest.mark.parametrize("module", MODULES)
def test_launch_configs_fit_registers_and_shared_memory(report, module):
    entry = report[module]
    if entry["status"] != "ok":
        pytest.skip(f"{module}: {entry['status']}")
    problems = []
    for spec in entry["specs"]:
        if "error" in spec:
            continue  # reported by test_module_kernels_compile_to_ptx
        for arch in ARCHS:
            got = spec[str(arch)]
            if "ptxas_error" in got:
                pytest.skip(f"no ptxas here assembles triton's PTX for sm_{arch}: {got['ptxas_error'][:500]}")
            where = f"{spec['name']} sm_{arch} (options {spec['options']}, {got['registers']} registers)"
            if got["spill_stores"] > _MAX_SPILL_BYTES:
                problems.append(f"{where}: spills {got['spill_stores']} B stores / {got['spill_loads']} B loads "
                                f"per thread (limit {_MAX_SPILL_BYTES}): smaller tiles or more warps")
            if got["shared_bytes"] > BLOCK_SHARED_LIMIT[arch]:
                problems.append(f"{where}: {got['shared_bytes']} B shared memory > {BLOCK_SHARED_LIMIT[arch]} B per "
                                "block: fewer stages or smaller tiles")
    assert not problems, f"{module}:\n" + "\n".join(problems)


def test_occupancy_arithmetic():
    from launch.bench_static import occupancy
    # 64 registers x 128 threads = 8K per block: 8 blocks by registers (threads would allow 16)
    assert occupancy(64, 4, 0, 90) == {"blocks_per_sm": 8, "warps_per_sm": 32, "occupancy": 0.5,
                                       "limited_by": "registers"}
    # 154 registers round up to 160 per thread (256 per warp): 40960 for 8 warps, one block fits
    assert occupancy(154, 8, 8192, 90)["blocks_per_sm"] == 1
    # 70 KiB shared: 3 blocks on sm_90 (228 KiB per SM), 2 on sm_80 (164 KiB)
    assert occupancy(104, 4, 70 * 1024, 90)["blocks_per_sm"] == 3
    assert occupancy(104, 4, 70 * 1024, 80) == {"blocks_per_sm": 2, "warps_per_sm": 8, "occupancy": 0.125,
                                                "limited_by": "shared"}
    assert occupancy(16, 1, 0, 90)["limited_by"] == "blocks"  # 32 blocks per SM at most
