"""csrc/: the CUDA sources compile with plain nvcc (sm_80, sm_90), include only CUDA headers and
export the launchers glm_ops.h declares; cuda_ops.cpp passes a syntax check against torch's
headers; the Python glue in kernels/_cuda.py works against the ops' schemas (fake tensors); and
backend="cuda" without the built extension fails with an error that says how to build it.

With a GPU and the extension built (`pip install -e .` on a CUDA machine) the RMSNorm and AdamW
ops are also checked numerically against the references.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from _tolerance import assert_within_torch_error
from kernels._cuda import cuda_ops_available, rms_norm_cuda
from kernels.adamw import FusedAdamW, fused_adamw_step

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = (80, 90)
LAUNCHERS = {"adamw.cu": ["glm_adamw_step"], "rms_norm.cu": ["glm_rms_norm_fwd", "glm_rms_norm_bwd"]}


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate) / "bin" / "nvcc"
        if candidate and path.exists():
            return str(path)
    return None


def _cuda_include_dir():
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        inc = Path(candidate) / "include"
        if candidate and (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, in $CUDA_HOME/bin or "
                                "/usr/local/cuda/bin: the CUDA sources cannot be compile-checked here")


def test_csrc_has_the_sources_setup_py_builds():
    setup = (REPO / "setup.py").read_text()
    for name in ("cuda_ops.cpp", "adamw.cu", "rms_norm.cu"):
        assert (CSRC / name).exists(), f"csrc/{name} is missing"
        assert f"csrc/{name}" in setup, f"setup.py does not build csrc/{name}"
    assert {p.name for p in CU_FILES} >= set(LAUNCHERS)


def _local_includes(path: Path, seen=None) -> dict:
    """{file: [included names]} for path and the project headers it includes (recursively)."""
    seen = {} if seen is None else seen
    names = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)
    seen[path.name] = names
    for name in names:
        local = CSRC / name
        if local.exists() and name not in seen:
            _local_includes(local, seen)
    return seen


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_include_only_cuda_and_standard_headers(cu):
    """The .cu files must build with plain nvcc: no torch/ATen/c10/pybind11 headers, directly or
    through the project headers they include."""
    for source, names in _local_includes(cu).items():
        for name in names:
            allowed = (name.startswith(("cuda", "stdint", "cstdint", "cstddef", "cmath"))
                       or (CSRC / name).exists())
            assert allowed, f"{source} includes <{name}>: only CUDA, C/C++ standard and csrc/ headers are allowed"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_plain_nvcc(cu, arch, tmp_path):
    obj = tmp_path / f"{cu.stem}.sm_{arch}.o"
    res = subprocess.run([NVCC, "-c", f"-arch=sm_{arch}", "-o", str(obj), str(cu)], cwd=CSRC,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc -c -arch=sm_{arch} {cu.name} failed:\n{res.stdout}\n{res.stderr}"
    assert obj.stat().st_size > 0
    nm = shutil.which("nm")
    if nm and cu.name in LAUNCHERS:  # the extern "C" launchers glm_ops.h declares are defined here
        symbols = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True).stdout
        for fn in LAUNCHERS[cu.name]:
            assert re.search(rf"\bT {fn}$", symbols, flags=re.M), f"{cu.name} does not export {fn} (C linkage)"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_torch_extension_flags(cu, tmp_path):
    """The flags torch's BuildExtension and setup.py add (no implicit half/bf16 conversions or
    operators, fast math) must not break the sources."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        torch_flags = list(COMMON_NVCC_FLAGS)
    except Exception:  # noqa: BLE001  (the constant moved: use the values of torch 2.4-2.13)
        torch_flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                       "--expt-relaxed-constexpr"]
    cmd = [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", *torch_flags,
           "-o", str(tmp_path / f"{cu.stem}.o"), str(cu)]
    res = subprocess.run(cmd, cwd=CSRC, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


def _syntax_check_command():
    """(g++ command, None) for a syntax-only check of cuda_ops.cpp, or (None, why it cannot run)."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        return None, "no g++/c++ on PATH"
    try:
        from torch.utils.cpp_extension import include_paths
        torch_includes = include_paths()
    except Exception as exc:  # noqa: BLE001  (any failure means: cannot check here)
        return None, f"torch's include paths are unavailable ({exc!r})"
    torch_root = Path(torch_includes[0])
    if not (torch_root / "c10" / "cuda" / "CUDAGuard.h").exists():
        return None, "this torch ships no c10/cuda headers"
    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        return None, ("CUDA runtime headers (cuda_runtime_api.h) not found in $CUDA_HOME/include or "
                      "/usr/local/cuda/include")
    py_inc = sysconfig.get_paths()["include"]
    if not (Path(py_inc) / "Python.h").exists():
        return None, f"Python.h not found in {py_inc} (python headers not installed)"
    cmd = [gxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC)]
    # CPU wheels of torch omit the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; the macro
    # below is torch's own switch for building without it.
    if not (torch_root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in list(torch_includes) + [str(cuda_inc), py_inc]:
        cmd += ["-isystem", inc]  # their own warnings are not ours
    return cmd + [str(CSRC / "cuda_ops.cpp")], None


def test_cuda_ops_cpp_syntax_against_torch_headers():
    cmd, why = _syntax_check_command()
    if cmd is None:
        pytest.skip(f"cuda_ops.cpp cannot be syntax-checked here: {why}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"g++ -fsyntax-only cuda_ops.cpp failed:\n{res.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------
# The Python glue against the ops' schemas, without the compiled extension: a subprocess defines
# glm_engine::* from the schema strings in cuda_ops.cpp (no kernels), stands in an empty module for
# kernels._cuda_ops, and runs kernels/_cuda.py's fake implementations and autograd.Function on
# fake CUDA tensors. Schema typos, fake/schema mismatches and shape bugs in the glue show up here.
# ------------------------------------------------------------------------------------------------

_GLUE_SCRIPT = r'''
import re, sys, types
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
src = open(sys.argv[1]).read()
schemas = [re.sub(r'"\s*"', "", s) for s in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', src)]
schemas = [s.strip().strip('"') for s in schemas]
assert len(schemas) == 3, schemas
lib = torch.library.Library("glm_engine", "DEF")
for s in schemas:
    lib.define(s)
sys.modules["kernels._cuda_ops"] = types.ModuleType("kernels._cuda_ops")
from kernels import _cuda
from kernels.adamw import fused_adamw_step
assert _cuda.cuda_ops_available()
with FakeTensorMode():
    for xd, wd in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        # the public wrapper, forward (fake CUDA tensors: a CPU-only torch cannot run autograd on them)
        x = torch.empty(2, 3, 40, device="cuda", dtype=xd)
        w = torch.empty(40, device="cuda", dtype=wd)
        y, h = _cuda.rms_norm_cuda(x, w, 1e-5, residual=torch.empty_like(x))
        assert y.shape == x.shape and y.dtype == wd and h.shape == x.shape, (y.shape, y.dtype)
        assert _cuda.rms_norm_cuda(x, w, 1e-5).shape == x.shape
        # the autograd.Function, forward and backward, on fake CPU tensors
        x = torch.empty(2, 3, 40, dtype=xd, requires_grad=True)
        w = torch.empty(40, dtype=wd, requires_grad=True)
        y = _cuda.RMSNormCudaFunction.apply(x, w, 1e-5)
        assert y.shape == x.shape and y.dtype == wd, (y.shape, y.dtype)
        dx, dw = torch.autograd.grad(y.sum(), [x, w])
        assert dx.shape == x.shape and dx.dtype == xd and dw.shape == w.shape and dw.dtype == wd
    ps = [torch.empty(4097, device="cuda", dtype=torch.bfloat16), torch.empty(3, 5, device="cuda", dtype=torch.float32)]
    gs = [torch.empty_like(p) for p in ps]
    ms = [torch.empty(p.shape, device="cuda") for p in ps]
    vs = [torch.empty(p.shape, device="cuda") for p in ps]
    ws = [torch.empty(p.shape, device="cuda") for p in ps]
    fused_adamw_step(ps, gs, ms, vs, ws, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3,
                     grad_scale=torch.ones(1, device="cuda"), backend="cuda")
    fused_adamw_step(ps, gs, ms, vs, None, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3,
                     grad_scale=2.0, backend="cuda")
try:
    _cuda.rms_norm_cuda(torch.zeros(2, 4), torch.ones(4), 1e-5)
    raise SystemExit("CPU tensors were accepted by backend='cuda'")
except RuntimeError as exc:
    assert "needs CUDA tensors" in str(exc), exc
print("GLUE-OK")
'''


@pytest.mark.skipif(cuda_ops_available(), reason="the real extension is loaded; the GPU tests cover the glue")
def test_python_glue_against_op_schemas_with_fake_tensors():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _GLUE_SCRIPT, str(CSRC / "cuda_ops.cpp")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "GLUE-OK" in res.stdout, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------
# backend="cuda" without the extension
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(cuda_ops_available(), reason="the extension kernels._cuda_ops is built and importable")
def test_cuda_backend_without_extension_says_how_to_build_it():
    p, g, m, v = [torch.zeros(8)], [torch.ones(8)], [torch.zeros(8)], [torch.zeros(8)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    expected = r"kernels\._cuda_ops.*not available.*torch has CUDA.*pip install -e \."
    with pytest.raises(RuntimeError, match=expected):
        fused_adamw_step(p, g, m, v, backend="cuda", **hyper)
    with pytest.raises(RuntimeError, match=expected):
        rms_norm_cuda(torch.zeros(2, 4), torch.ones(4), 1e-5)
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match=expected):
        FusedAdamW([param], backend="cuda").step()


# ------------------------------------------------------------------------------------------------
# Numerics of the compiled ops (GPU with the extension built)
# ------------------------------------------------------------------------------------------------

needs_cuda_ops = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_ops_available()),
                                    reason="needs a GPU and the built extension kernels._cuda_ops")


@needs_cuda_ops
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 37, 100), (3, 4100), (300, 24)], ids=str)
def test_rms_norm_cuda_within_2x_torch_error(x_dtype, w_dtype, shape):
    from kernels.rms_norm import rms_norm_reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device="cuda", dtype=x_dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device="cuda", dtype=w_dtype)
    dy = torch.randn(shape, generator=g).to(device="cuda", dtype=w_dtype)

    def run(fn, cast):
        xl, wl = cast(x).clone().requires_grad_(), cast(w).clone().requires_grad_()
        y = fn(xl, wl)
        dx, dw = torch.autograd.grad(y, [xl, wl], dy.to(y.dtype))
        return y.detach(), dx, dw

    truth = run(lambda a, b: rms_norm_reference(a, b, 1e-5), lambda t: t.double())
    ref = run(lambda a, b: rms_norm_reference(a, b, 1e-5), lambda t: t)
    out = run(lambda a, b: rms_norm_cuda(a, b, 1e-5), lambda t: t)
    for name, o, r, t in zip(("y", "dx", "dweight"), out, ref, truth):
        assert_within_torch_error(f"rms_norm cuda {name} {x_dtype}/{w_dtype} {shape}", o, r, t)


@needs_cuda_ops
def test_adamw_cuda_multi_launch_matches_torch_backend():
    """More tensors (30) and chunks than one launch holds (24 tensors, 320 blocks of 16K elements),
    so tensors are split across launches; every element must match the torch backend."""
    g = torch.Generator().manual_seed(0)
    sizes = [7, 16384 * 3 + 5] + [1000 + 13 * i for i in range(27)] + [16384 * 300 + 1]
    ps = [torch.randn(n, generator=g).to(device="cuda", dtype=torch.bfloat16) for n in sizes]
    ws = [p.float() for p in ps]
    gs = [torch.randn(n, generator=g).cuda() for n in sizes]
    state = {b: ([p.clone() for p in ps], [w.clone() for w in ws], [torch.zeros_like(w) for w in ws],
                 [torch.zeros_like(w) for w in ws]) for b in ("cuda", "torch")}
    for b, (p, w, m, v) in state.items():
        for step in (1, 2):
            fused_adamw_step(p, gs, m, v, w, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step,
                             backend=b)
    for a, b in zip(state["cuda"], state["torch"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)  # same fp32 math, another op order


@needs_cuda_ops
def test_cuda_ops_compose_with_torch_compile():
    """The fake implementations let torch.compile trace the ops in one graph (fullgraph=True)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, 256, generator=g).to(device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(256, generator=g).to(device="cuda", dtype=torch.bfloat16).requires_grad_()
    eager = rms_norm_cuda(x, w, 1e-5)
    compiled = torch.compile(lambda a, b: rms_norm_cuda(a, b, 1e-5), fullgraph=True)(x, w)
    assert torch.equal(eager, compiled)
    eager_grads = torch.autograd.grad(eager.float().sum(), [x, w])
    compiled_grads = torch.autograd.grad(compiled.float().sum(), [x, w])
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


def test_load_cuda_ops_retries_after_a_build(monkeypatch):
    """A process that imported kernels before the extension was built picks it up when
    load_cuda_ops() is called again (what launch.bench gpu does after building in place)."""
    import sys
    import types

    import kernels
    from kernels import _cuda
    if _cuda.cuda_ops_available():
        pytest.skip("the extension is built here; the retry path is for a process that started without it")
    assert _cuda.load_cuda_ops() is False and _cuda._IMPORT_ERROR is not None
    built = types.ModuleType("kernels._cuda_ops")  # stands in for the freshly built library
    monkeypatch.setitem(sys.modules, "kernels._cuda_ops", built)
    monkeypatch.setattr(kernels, "_cuda_ops", built, raising=False)
    monkeypatch.setattr(_cuda, "_register_fakes", lambda: None)  # the fake module defines no ops
    monkeypatch.setattr(_cuda, "_cuda_ops", None)
    monkeypatch.setattr(_cuda, "_IMPORT_ERROR", _cuda._IMPORT_ERROR)
    assert _cuda.load_cuda_ops() is True and _cuda.cuda_ops_available() and _cuda._IMPORT_ERROR is None
    _cuda.require_cuda_ops("rms_norm")  # no longer raises
