"""natgrad's curvature core: one block interface, one block per layer kind (Kronecker:
Linear, Conv2d, Embedding, attention; diagonal: norms, per-sample layers, free parameters) plus
the plain fallback, one capture path (hooks) and the registry that maps modules to blocks.

natgrad.KFAC, ``natgrad.fisher.compute_fisher(structure="kfac")`` and ``natgrad.EWC(structure=
"kfac")`` all estimate, store and apply Kronecker-factored curvature through these blocks.
"""
from __future__ import annotations

from natgrad.curvature.block import CurvatureBlock, PlainBlock
from natgrad.curvature.capture import GradientPhase, LayerCapture, Record, capturing
from natgrad.curvature.kron import (Conv2dBlock, EmbeddingBlock, KroneckerBlock, LinearBlock,
                                    Statistics)
from natgrad.curvature.registry import kronecker_block, make_block, owner_groups, unsupported_reason
from natgrad.curvature.attention import AttentionBlock  # issue 16: transformers
from natgrad.curvature.diagonal import DiagonalBlock, FreeParameterBlock, NormBlock, PerSampleBlock
from natgrad.curvature.plan import module_blocks

__all__ = [
    "AttentionBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "DiagonalBlock",
    "EmbeddingBlock",
    "FreeParameterBlock",
    "GradientPhase",
    "KroneckerBlock",
    "LayerCapture",
    "LinearBlock",
    "NormBlock",
    "PerSampleBlock",
    "PlainBlock",
    "Record",
    "Statistics",
    "capturing",
    "kronecker_block",
    "make_block",
    "module_blocks",
    "owner_groups",
    "unsupported_reason",
]
