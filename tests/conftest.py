# The Triton interpreter must be switched on before any module defining @triton.jit kernels is
# imported, so that backend="triton" runs on CPU tensors in the test suite.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
