"""Fisher information of models: per-sample score rows, structures and ``compute_fisher``."""
from __future__ import annotations

from natgrad._vocabulary import FISHER_TYPES, STRUCTURES
from natgrad.fisher.compute import compute_fisher, kfac_blocks
from natgrad.fisher.implicit import ImplicitFisher
from natgrad.fisher.matrices import (
    BlockDiagonalFisher,
    BlockFisher,
    DenseFisher,
    DiagonalFisher,
    FisherMatrix,
    LowRankFisher,
)
from natgrad.fisher.scores import KINDS, score_rows
from natgrad.likelihoods import LIKELIHOODS

__all__ = [
    "FISHER_TYPES",
    "KINDS",
    "LIKELIHOODS",
    "STRUCTURES",
    "BlockDiagonalFisher",
    "BlockFisher",
    "DenseFisher",
    "DiagonalFisher",
    "FisherMatrix",
    "ImplicitFisher",
    "LowRankFisher",
    "compute_fisher",
    "kfac_blocks",
    "score_rows",
]
