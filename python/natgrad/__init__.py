"""natgrad: natural-gradient optimization and Fisher-information curvature for PyTorch.

The math runs in C++ (LibTorch) behind ``torch.ops.natgrad.*``; :mod:`natgrad.ops` holds the
typed Python wrappers with their fake kernels (torch.compile) and autograd formulas.
"""
from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (loads libtorch before the extension)

from natgrad import _C, curvature, fisher, likelihoods, ops, solvers, stats
from natgrad._version import __version__
from natgrad.optim import KFAC, EigenAdam, NaturalGradient
from natgrad.regularizers import EWC

__all__ = ["EWC", "EigenAdam", "KFAC", "NaturalGradient", "__version__", "build_info", "curvature", "fisher",
           "likelihoods", "ops", "solvers", "stats"]


def build_info() -> dict[str, Any]:
    """What was compiled, and what runs where.

    Returns:
        dict with ``version`` (str); ``cuda_kernels`` (bool: whether hand-written CUDA kernels
        were compiled in — there are none today, so False: the ops reach CUDA through ATen);
        ``torch_version`` (the torch the extension was compiled against); ``cxx11_abi``; and
        ``devices``: for every ``torch.ops.natgrad`` op, the dispatch keys it has a kernel for,
        read from the dispatcher. ``CompositeExplicitAutograd`` means one ATen composition that
        runs on any device (CPU, CUDA, ...); ``CPU`` a CPU-only kernel (preferred on CPU
        tensors); ``Meta`` the fake kernel used by the meta device and torch.compile.
    """
    from natgrad.ops._common import dispatch_keys

    info = dict(_C.build_info())
    info["devices"] = dispatch_keys()
    return info
