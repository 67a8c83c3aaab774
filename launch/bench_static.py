"""Static GPU resources of every Triton kernel at its launch configuration, without a GPU.

    python -m launch.bench static [--arch 80,90] [--module kernels.flash_attention] [--json FILE]

Each kernel module's ``compile_specs()`` (contract: tests/kernels/test_gpu_compile.py) lists its
kernels at the block sizes, warps and stages its launcher uses on GPU. Every spec is compiled with
``triton.compile`` for each architecture (pointers and ``stride*`` integers marked 16-divisible, as the
JIT specializes them at launch for torch allocations), its PTX assembled with ``ptxas -v``, and the
report gives registers per thread, spill bytes, shared memory per block and the resulting occupancy:
resident blocks per SM = min(register file / (registers x threads), shared memory per SM / shared
per block, 2048 threads / threads, 32), in warps per SM. A register-bound kernel that spills, or an
occupancy of one block of 4 warps, is what to fix before timing on a GPU. The numbers are ptxas's,
not measured: register allocation granularity (256 per warp) is applied, launch overheads are not.

Runs with the Triton interpreter off (``TRITON_INTERPRET=0`` is forced before triton is imported,
so run it as its own process: the test suite does so in a subprocess).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

MODULES = ["kernels.rms_norm", "kernels.swiglu", "kernels.rotary", "kernels.flash_attention",
           "kernels.flash_decode", "kernels.cross_entropy", "kernels.adamw"]
ARCHS = [80, 90]

# Per-SM limits (CUDA occupancy tables, compute capability 8.0 and 9.0): 64K 32-bit registers,
# 2048 threads, 32 blocks; shared memory per SM and the opt-in maximum per block.
SM_REGISTERS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32
SM_SHARED = {80: 167936, 90: 233472}
BLOCK_SHARED_LIMIT = {80: 166912, 90: 232448}
_SPEC_OPTIONS = {"num_warps", "num_stages"}


def ptxas_candidates() -> list[str]:
    """ptxas binaries to try, newest first: triton ships its own (names vary by version) and the PTX
    it emits may need a newer one than the CUDA toolkit's."""
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = [os.path.join(bundled, n) for n in ("ptxas-blackwell", "ptxas")] + [shutil.which("ptxas")]
    return [n for n in names if n and os.path.exists(n)]


def ptxas_report(ptx: str, arch: int) -> dict:
    """``{"registers", "spill_stores", "spill_loads", "ptxas"}`` from ``ptxas -v``, or ``{"ptxas_error"}``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        errors = []
        for exe in ptxas_candidates():
            proc = subprocess.run([exe, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            regs = re.findall(r"Used (\d+) registers", proc.stderr)
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
            if proc.returncode != 0 or not regs or not spills:
                errors.append(f"{exe}: rc {proc.returncode}: {proc.stderr.strip()[-300:]}")
                continue
            return {"registers": int(regs[0]), "spill_stores": int(spills[0][0]), "spill_loads": int(spills[0][1]),
                    "ptxas": exe}
        return {"ptxas_error": "; ".join(errors) or "no ptxas found"}


def occupancy(registers: int, num_warps: int, shared_bytes: int, arch: int) -> dict:
    """Resident blocks and warps per SM, and what limits them."""
    threads = 32 * num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    limits = {"threads": SM_THREADS // threads, "blocks": SM_BLOCKS}
    if registers:
        limits["registers"] = SM_REGISTERS // (regs_per_warp * num_warps)
    if shared_bytes:
        limits["shared"] = SM_SHARED[arch] // shared_bytes
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * threads / SM_THREADS, "limited_by": min(limits, key=limits.get)}


def _launch_attrs(fn, signature: dict) -> dict:
    """16-byte divisibility for pointers and strides: what the JIT specializes at launch."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if a in signature and (signature[a].startswith("*") or a.startswith("stride"))}


def compile_spec(spec, archs) -> dict:
    """One ``compile_specs()`` entry -> ``{"name", "options", "<arch>": {...}}`` or with ``"error"``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    well_formed = isinstance(spec, tuple) and len(spec) in (4, 5)
    entry = {"name": spec[3] if well_formed else repr(spec)[:200]}
    try:
        if not well_formed:
            raise TypeError("a spec must be a tuple (jit_fn, signature, constexprs, name[, options])")
        fn, signature, constexprs, _ = spec[:4]
        options = dict(spec[4]) if len(spec) == 5 else {}
        if set(options) - _SPEC_OPTIONS:
            raise ValueError(f"options may set {sorted(_SPEC_OPTIONS)}, got {sorted(set(options) - _SPEC_OPTIONS)}")
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise TypeError(f"jit_fn is a {type(fn).__name__}, not a triton.jit function")
        constexprs = dict(constexprs)
        signature = {k: v for k, v in signature.items() if v != "constexpr"}
        params = list(fn.arg_names)
        unknown = sorted((set(signature) | set(constexprs)) - set(params))
        missing = [p for p in params if p not in signature and p not in constexprs]
        if unknown or missing:
            raise ValueError(f"parameters unknown to the kernel {unknown}, not given {missing}")
        entry["options"] = options
        for arch in archs:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_launch_attrs(fn, signature))
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            ptx = compiled.asm.get("ptx", "")
            got = {"ptx_chars": len(ptx),
                   "target": next((l.split()[1] for l in ptx.splitlines() if l.startswith(".target")), None),
                   "entry": (".entry " + fn.__name__) in ptx, "shared_bytes": compiled.metadata.shared,
                   "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                   **ptxas_report(ptx, arch)}
            if "registers" in got:
                got.update(occupancy(got["registers"], got["num_warps"], got["shared_bytes"], arch))
            entry[str(arch)] = got
    except Exception:
        entry["error"] = traceback.format_exc(limit=3)[-3000:]
    return entry


def compile_report(modules=MODULES, archs=ARCHS) -> dict:
    """``{module: {"status": "ok", "specs": [...]}}`` (or status "absent" / "no compile_specs")."""
    os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build compilable kernels (set before import)
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
        report[mod_name] = {"status": "ok", "specs": [compile_spec(s, archs) for s in mod.compile_specs()]}
    return report


def print_table(report: dict, archs) -> None:
    print(f"{'kernel':44s} {'arch':>5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem KiB':>8} "
          f"{'blk/SM':>6} {'warps/SM':>8}  limit")
    for mod, entry in report.items():
        if entry["status"] != "ok":
            print(f"{mod}: {entry['status']}")
            continue
        for spec in entry["specs"]:
            if "error" in spec:
                print(f"{spec['name']:44s} ERROR {spec['error'].strip().splitlines()[-1]}")
                continue
            for arch in archs:
                g = spec[str(arch)]
                if "ptxas_error" in g:
                    print(f"{spec['name']:44s} sm_{arch} ptxas failed: {g['ptxas_error'][:120]}")
                    continue
                print(f"{spec['name']:44s} {'sm_' + str(arch):>5} {g['num_warps']:>5} {g['num_stages']:>6} "
                      f"{g['registers']:>5} {g['spill_stores']:>7} {g['shared_bytes'] / 1024:>8.1f} "
                      f"{g['blocks_per_sm']:>6} {g['warps_per_sm']:>8}  {g['limited_by']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench static", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities x10")
    p.add_argument("--module", default=",".join(MODULES), help="comma-separated kernel modules")
    p.add_argument("--json", default=None, help="write the report here ('-': stdout, after a marker line)")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        p.error(f"--arch takes integers such as 80,90, got {args.arch!r}")
    unsupported = [a for a in archs if a not in SM_SHARED]
    if unsupported:
        p.error(f"--arch {unsupported}: occupancy limits are known for {sorted(SM_SHARED)}")
    report = compile_report([m.strip() for m in args.module.split(",")], archs)
    if args.json == "-":
        print("@@REPORT@@" + json.dumps(report))
    else:
        print_table(report, archs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {args.json}")
    failed = [s["name"] for e in report.values() if e["status"] == "ok" for s in e["specs"] if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
