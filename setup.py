"""Builds natgrad and its compiled core ``natgrad._C`` from csrc/.

Install with ``pip install --no-build-isolation .`` (or ``-e .`` for development) inside an
environment that already has torch: build isolation would fetch a second, multi-GB torch.
The ops are ATen compositions registered for every device (CompositeExplicitAutograd): the
same C++ build runs on CPU and CUDA tensors, so a CUDA torch needs no nvcc here. There are no
hand-written CUDA kernels today; were csrc/**/*.cu files added, they would be compiled when
torch has CUDA and nvcc is found (NATGRAD_NO_CUDA=1 skips them) and build_info()["cuda_kernels"]
would report it.
"""
from __future__ import annotations

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    """The version defined once in csrc/version.h."""
    with open(os.path.join(ROOT, "csrc", "version.h"), encoding="utf-8") as f:
        return re.search(r'#define NATGRAD_VERSION "([^"]+)"', f.read()).group(1)


def extension_modules() -> list:
    """natgrad._C: every csrc/ source but the C++ frontend (the core shared with CMake), plus the
    pybind11 entry."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))

    # csrc/frontend/ is the LibTorch C++ frontend (natgrad::optim::KFAC, natgrad::EWC): built by
    # CMake into libnatgrad_frontend only; the Python package has its own optimizers.
    frontend = os.path.join("csrc", "frontend", "")
    sources = [s for s in rel("csrc/**/*.cpp") if not s.startswith(frontend)]
    cuda_sources = rel("csrc/**/*.cu")  # none today: CUDA is reached through ATen
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("NATGRAD_NO_CUDA", "0") != "1"
    )
    macros = [("NATGRAD_WITH_CUDA", None)] if with_cuda else []
    kwargs = dict(
        name="natgrad._C",
        sources=sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2"]},
        depends=[h for h in rel("csrc/**/*.h") if not h.startswith(frontend)],
    )
    return [CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=False)


setup(
    name="natgrad",
    version=read_version(),
    description="Natural-gradient optimization and Fisher-information curvature for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
