"""Makes torchvision's Python modules importable beside the torch 2.13.0 CPU wheel (tests and
benchmarks that use timm, Avalanche or laplace-torch import this first).

torchvision (imported by timm and Avalanche) ships compiled ops built against CUDA torch on PyPI;
beside the torch 2.13.0 CPU wheel they cannot load, and torchvision's import then fails while
registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms``. Declaring those two
schemas (no kernels) lets its pure-Python modules import. Where the compiled ops do load (a
matching torchvision build), nothing is declared. No test calls a torchvision op.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _declare_unloadable_torchvision_ops() -> torch.library.Library | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return None
        except OSError:
            pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    return library


_torchvision_schemas = _declare_unloadable_torchvision_ops()
