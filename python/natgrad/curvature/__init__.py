"""natgrad's curvature core: one block interface, one block per layer kind plus the plain
fallback, one capture path (hooks) and the registry that maps modules to blocks.

natgrad.KFAC, ``natgrad.fisher.compute_fisher(structure="kfac")`` and ``natgrad.EWC(structure=
"kfac")`` all estimate, store and apply Kronecker-factored curvature through these blocks.
"""
from __future__ import annotations

from natgrad.curvature.block import CurvatureBlock, PlainBlock
from natgrad.curvature.capture import GradientPhase, LayerCapture, Record, capturing
from natgrad.curvature.kron import (Conv2dBlock, EmbeddingBlock, KroneckerBlock, LinearBlock,
                                    Statistics)
from natgrad.curvature.registry import kronecker_block, make_block, owner_groups, unsupported_reason

__all__ = [
    "Conv2dBlock",
    "CurvatureBlock",
    "EmbeddingBlock",
    "GradientPhase",
    "KroneckerBlock",
    "LayerCapture",
    "LinearBlock",
    "PlainBlock",
    "Record",
    "Statistics",
    "capturing",
    "kronecker_block",
    "make_block",
    "owner_groups",
    "unsupported_reason",
]
