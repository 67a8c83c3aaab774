"""Every Triton kernel compiles to PTX for sm_80 and sm_90, on a machine without a GPU.

The ``compile_specs()`` contract
--------------------------------
A kernel module in ``kernels/`` (listed in MODULES below) opts in by defining a module-level function
``compile_specs()`` that returns a list of 4-tuples ``(jit_fn, signature, constexprs, name)``:

- ``jit_fn``: the ``@triton.jit`` kernel itself (the module-level object; the test imports the module
  with ``TRITON_INTERPRET=0``, so it is a real ``JITFunction`` there).
- ``signature``: dict, parameter name -> Triton type string, for every parameter that is not a
  ``tl.constexpr``: pointers ``"*fp32" "*fp16" "*bf16" "*i32" "*i64" "*u8"``, scalars ``"i32" "i64"
  "fp32"``. (A constexpr parameter may also appear here with the value ``"constexpr"``.)
- ``constexprs``: dict, parameter name -> value, for every ``tl.constexpr`` parameter (block sizes,
  flags, dtypes such as ``tl.bfloat16``). Every parameter must be in ``signature`` or ``constexprs``.
- ``name``: a short unique label for messages, e.g. ``"rms_norm_fwd_bf16_4096"``.

Pick the configurations the launchers really use on GPU (block sizes, flags, dtypes, with the
interpreter-only switches off), a handful per kernel: every spec is compiled twice (~0.5 s each).
``compile_specs()`` must not touch CUDA or allocate tensors. ``num_warps`` is left at its default.

How: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``, under which ``@triton.jit`` returns interpreter
objects that cannot be compiled, so all specs are compiled in ONE subprocess with ``TRITON_INTERPRET=0``:
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``.
The compile cache (``~/.triton/cache``) is keyed on the kernel source, so unchanged kernels are fast.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = ["kernels.rms_norm", "kernels.swiglu", "kernels.rotary", "kernels.flash_attention",
           "kernels.cross_entropy", "kernels.adamw"]
ARCHS = [80, 90]
ROOT = Path(__file__).resolve().parents[2]

_COMPILE_SCRIPT = r"""
import importlib, inspect, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

modules, archs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
report = {}
for mod_name in modules:
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            report[mod_name] = {"status": "absent"}
            continue
        raise
    if not hasattr(mod, "compile_specs"):
        report[mod_name] = {"status": "no compile_specs"}
        continue
    results = []
    specs = mod.compile_specs()
    for spec in specs:
        entry = {"name": repr(spec)[:200] if not (isinstance(spec, tuple) and len(spec) == 4) else spec[3]}
        results.append(entry)
        try:
            if not (isinstance(spec, tuple) and len(spec) == 4):
                raise TypeError("a spec must be a 4-tuple (jit_fn, signature, constexprs, name)")
            fn, signature, constexprs, name = spec
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                raise TypeError(f"jit_fn is a {type(fn).__name__}, not a triton.jit function")
            constexprs = dict(constexprs)
            signature = {k: v for k, v in signature.items() if v != "constexpr"}
            params = list(fn.arg_names)
            unknown = sorted((set(signature) | set(constexprs)) - set(params))
            missing = [p for p in params if p not in signature and p not in constexprs]
            if unknown or missing:
                raise ValueError(f"parameters unknown to the kernel {unknown}, not given {missing}")
            for arch in archs:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm.get("ptx", "")
                entry[str(arch)] = {"ptx_chars": len(ptx),
                                    "target": next((l.split()[1] for l in ptx.splitlines() if l.startswith(".target")), None),
                                    "entry": (".entry " + fn.__name__) in ptx}
        except Exception:
            entry["error"] = traceback.format_exc(limit=3)[-3000:]
    report[mod_name] = {"status": "ok", "specs": results}
print("@@REPORT@@" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(MODULES), json.dumps(ARCHS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@REPORT@@")]
    if proc.returncode != 0 or not marker:
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
