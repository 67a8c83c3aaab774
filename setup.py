"""Install the engine, kernels and launch packages, and build the C++/CUDA sources in csrc/.

CPU-only machines: install torch first as ``pip install torch==2.13.0`` (the CPU build); an unpinned
torch pulls a multi-GB CUDA build. The CUDA extension (``kernels._cuda_ops``) is built only when the
installed torch has CUDA; select architectures with ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0").
The data-index helpers (``engine.data._helpers``, pybind11) are always built; a pure-Python fallback
gives identical results if the build is missing.
"""
import os

from setuptools import find_packages, setup

from pybind11.setup_helpers import Pybind11Extension, build_ext


def cuda_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDAExtension
    except Exception:  # torch missing or broken: no CUDA extension, the torch/triton backends remain
        return []
    if torch.version.cuda is None:
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return [CUDAExtension(
        name="kernels._cuda_ops",
        sources=["csrc/cuda_ops.cpp", "csrc/adamw.cu", "csrc/rms_norm.cu"],
        depends=["csrc/glm_ops.h", "csrc/glm_cuda_common.cuh"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )]


def build_ext_class():
    exts = cuda_extensions()
    if exts:
        from torch.utils.cpp_extension import BuildExtension
        return exts, BuildExtension.with_options(use_ninja=True)
    return exts, build_ext


cuda_exts, build_cls = build_ext_class()

setup(
    name="glm-engine",
    version="0.1.0",
    description="Megatron-style training engine for ChatGLM-family models with fused kernels and co-located RLHF",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launch", "launch.*", "configs"]),
    package_data={"configs": ["*.yaml", "models/*.yaml", "runs/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tqdm",
        "pybind11>=2.10",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.46", "triton>=3.0", "matplotlib", "tensorboard", "peft"],
        "bench": ["transformers>=4.46", "triton>=3.0", "matplotlib", "tensorboard"],
    },
    ext_modules=[
        Pybind11Extension("engine.data._helpers", ["csrc/data_helpers.cpp"], cxx_std=17,
                          extra_compile_args=["-O3"]),
    ] + cuda_exts,
    cmdclass={"build_ext": build_cls},
    zip_safe=False,
)
