"""natgrad: natural-gradient optimization and Fisher-information curvature for PyTorch.

The math runs in C++ (LibTorch) behind ``torch.ops.natgrad.*``; :mod:`natgrad.ops` holds the
typed Python wrappers with their fake kernels (torch.compile) and autograd formulas.
"""
from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (loads libtorch before the extension)

from natgrad import _C, fisher, ops, stats
from natgrad._version import __version__
from natgrad.optim import KFAC, NaturalGradient
from natgrad.regularizers import EWC

__all__ = ["EWC", "KFAC", "NaturalGradient", "__version__", "build_info", "fisher", "ops", "stats"]


def build_info() -> dict[str, Any]:
    """Facts fixed when ``natgrad._C`` was compiled.

    Returns:
        dict with ``version`` (str), ``cuda_compiled`` (bool: whether CUDA kernels were built),
        ``torch_version`` (the torch the extension was compiled against) and ``cxx11_abi``.
    """
    return dict(_C.build_info())
