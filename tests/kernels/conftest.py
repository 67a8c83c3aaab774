# The CPU suite runs the Triton kernels under the interpreter, whose behaviour changed across triton
# releases: triton 3.6's interpreter cannot take a loop bound that is a tensor (`range(0, end, B)` with
# `end = tl.where(...)` or a program id; "only 0-dimensional arrays can be converted to Python
# scalars"), which every kernel here uses. Compiled GPU code is fine with 3.6 (the GPU machines ship
# torch 2.11 + triton 3.6; tests/kernels/test_gpu_compile.py passes under it). Interpreter runs were
# checked with triton 3.6.0 (fails), 3.7.0, 3.8.0 and 3.9.0 (pass), so stop early with the fix instead
# of ~100 cryptic failures.
import os

import pytest

_MIN_INTERPRETER_TRITON = (3, 7)


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        import triton
    except Exception:  # no triton: the Triton cases skip themselves
        return
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < _MIN_INTERPRETER_TRITON:
        raise pytest.UsageError(
            f"tests/kernels under TRITON_INTERPRET=1 need triton >= "
            f"{'.'.join(map(str, _MIN_INTERPRETER_TRITON))} (its interpreter runs our kernels' tensor-bounded "
            f"loops), found triton {triton.__version__}: `pip install 'triton>=3.7'`, or run these tests on a "
            "GPU with TRITON_INTERPRET=0, or leave them out with --ignore=tests/kernels")
