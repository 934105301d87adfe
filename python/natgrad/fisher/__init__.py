"""Fisher information of models: per-sample score rows, structures and ``compute_fisher``."""
from __future__ import annotations

from natgrad.fisher.compute import STRUCTURES, compute_fisher
from natgrad.fisher.matrices import (BlockDiagonalFisher, DenseFisher, DiagonalFisher,
                                     FisherMatrix, KroneckerBlock, LowRankFisher)
from natgrad.fisher.scores import KINDS, LIKELIHOODS, score_rows

__all__ = [
    "KINDS",
    "LIKELIHOODS",
    "STRUCTURES",
    "BlockDiagonalFisher",
    "DenseFisher",
    "DiagonalFisher",
    "FisherMatrix",
    "KroneckerBlock",
    "LowRankFisher",
    "compute_fisher",
    "score_rows",
]
