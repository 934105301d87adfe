"""natgrad's curvature core: one block interface, one layer kind per module type (Kronecker
blocks, see :mod:`natgrad.curvature.layers`; diagonal blocks for norms, per-sample layers and
free parameters) plus the plain fallback, one capture path (hooks) and the registry that maps
module types to kinds (:func:`register_layer`).

natgrad.KFAC, ``natgrad.fisher.compute_fisher(structure="kfac")`` and ``natgrad.EWC(structure=
"kfac")`` all estimate, store and apply Kronecker-factored curvature through these blocks.
"""
from __future__ import annotations

from natgrad.curvature import layers
from natgrad.curvature.block import CurvatureBlock, PlainBlock
from natgrad.curvature.capture import CaptureGate, GradientPhase, LayerCapture, Record, capturing
from natgrad.curvature.diagonal import DiagonalBlock, FreeParameterBlock, NormBlock, PerSampleBlock
from natgrad.curvature.kron import KroneckerBlock, Statistics
from natgrad.curvature.layers import *  # noqa: F403  (each kind's block, LayerKind, register_layer)
from natgrad.curvature.plan import module_blocks
from natgrad.curvature.registry import (
    kronecker_block,
    make_block,
    owner_groups,
    parameter_owners,
    parameter_users,
    unsupported_reason,
)

__all__ = [
    "CaptureGate",
    "CurvatureBlock",
    "DiagonalBlock",
    "FreeParameterBlock",
    "GradientPhase",
    "KroneckerBlock",
    "LayerCapture",
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
    "parameter_owners",
    "parameter_users",
    "unsupported_reason",
]
__all__ += layers.__all__
