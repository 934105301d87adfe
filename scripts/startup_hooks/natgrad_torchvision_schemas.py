"""Lets torchvision's Python modules import beside the torch 2.13.0 CPU wheel in natgrad's .venv.

scripts/env.sh copies this file into the virtual environment's site-packages, with a .pth line
that imports it at start-up. It installs a finder that acts once, when something first imports
torchvision (timm, Avalanche, laplace-torch, Lightning and transformers' Trainer all do), and
imports nothing before that.

Why: torchvision 0.28.0, the release matching torch 2.13.0 (requirements-clients.txt), is built
against CUDA torch on PyPI. Beside the CPU wheel its compiled ops (nms, roi_align, ...) cannot
load, and its import then fails while registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``. Declaring those two schemas (no kernels) lets its pure-Python modules
import; calling one of its compiled ops still fails. Where the compiled ops do load (a matching
torchvision build), nothing is declared.
"""
from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # keeps the declarations alive


def _declare_unloadable_ops(origin: str) -> None:
    import glob
    import os

    import torch

    for path in glob.glob(os.path.join(os.path.dirname(origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return
        except OSError:
            pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Declares the schemas just before torchvision's first import, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin is not None:
            _declare_unloadable_ops(spec.origin)
        return spec


if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionFinder())
