"""Curvature blocks (state + math through natgrad.ops) and the hooks that feed them."""
from __future__ import annotations

from natgrad.curvature.capture import GradientPhase, LayerCapture, Record
from natgrad.curvature.kron import Conv2dBlock, EmbeddingBlock, KronBlock, LinearBlock
from natgrad.curvature.registry import make_block, unsupported_reason

__all__ = [
    "Conv2dBlock",
    "EmbeddingBlock",
    "GradientPhase",
    "KronBlock",
    "LayerCapture",
    "LinearBlock",
    "Record",
    "make_block",
    "unsupported_reason",
]
