"""Fisher matrices in several structures, with one interface.

Every structure supports ``to_dense()`` (when small), ``diagonal()``, ``mv(v)``, damped
``solve(v, damping)``, ``trace()``, ``quad_form(v)`` and reports ``memory_bytes()``. Vectors are
flat over the parameters in the order they were given. Memory, for p parameters, n samples
(rows r = n, n·draws or n·classes), layers with d_in × d_out weights:

====================  =====================================  =================================
structure             stores                                 solve
====================  =====================================  =================================
``dense``             p × p                                  Cholesky, O(p³)
``lowrank``           the r × p score rows U (F = UᵀU/n)     Woodbury, O(r²p + r³)
``diagonal``          p                                      elementwise
``block_diagonal``    Σ_layers p_ℓ²                          per block, O(Σ p_ℓ³)
``kfac``              Σ_layers (d_in+1)² + d_out²            per layer, eigendecompositions
====================  =====================================  =================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad import ops


class FisherMatrix:
    """Interface shared by every structure (see the module docstring)."""

    structure: str = ""

    @property
    def num_params(self) -> int:
        """p, the length of the vectors this matrix acts on."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The p × p matrix (for small p)."""
        return self.mv(torch.eye(self.num_params, dtype=self.dtype, device=self.device))

    def diagonal(self) -> Tensor:
        """The diagonal, a vector of length p."""
        return torch.diagonal(self.to_dense())

    def mv(self, v: Tensor) -> Tensor:
        """``F v`` for ``v`` of shape ``[p]`` or ``[p, k]``."""
        raise NotImplementedError

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """``(F + damping·I)⁻¹ v`` for ``v`` of shape ``[p]`` or ``[p, k]``; damping > 0."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """``tr F``."""
        return self.diagonal().sum()

    def quad_form(self, v: Tensor) -> Tensor:
        """``vᵀ F v`` for a vector ``v``."""
        return (v * self.mv(v)).sum()

    def memory_bytes(self) -> int:
        """Bytes held by the tensors of this representation."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[Tensor]:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device


def _check_damping(damping: float) -> None:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(f"Invalid damping: {damping!r} (must be > 0; a Fisher is only PSD, so "
                         "an undamped solve may not exist)")


@dataclass
class DenseFisher(FisherMatrix):
    """The full p × p matrix."""

    matrix: Tensor
    structure = "dense"

    @property
    def num_params(self) -> int:
        return self.matrix.shape[0]

    def to_dense(self) -> Tensor:
        return self.matrix

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.matrix)

    def mv(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        eye = torch.eye(self.num_params, dtype=self.matrix.dtype, device=self.matrix.device)
        return torch.linalg.solve(self.matrix + damping * eye, v)

    def _tensors(self) -> list[Tensor]:
        return [self.matrix]


@dataclass
class LowRankFisher(FisherMatrix):
    """F = UᵀU / n from score rows U [r, p]; solves use the Woodbury op (never p × p)."""

    rows: Tensor
    num_samples: int
    structure = "lowrank"

    @property
    def num_params(self) -> int:
        return self.rows.shape[1]

    def to_dense(self) -> Tensor:
        return self.rows.T @ self.rows / self.num_samples

    def diagonal(self) -> Tensor:
        return self.rows.pow(2).sum(0) / self.num_samples

    def mv(self, v: Tensor) -> Tensor:
        return self.rows.T @ (self.rows @ v) / self.num_samples

    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        # The op normalises by its row count; rescale rows so that UᵀU/rows = UᵀU/n (no copy
        # when there is one row per sample, the empirical Fisher every NaturalGradient step uses).
        rows = self.rows
        if rows.shape[0] != self.num_samples:
            rows = rows * math.sqrt(rows.shape[0] / self.num_samples)
        return ops.woodbury_solve(rows, v, damping).solution

    def trace(self) -> Tensor:
        return self.rows.pow(2).sum() / self.num_samples

    def _tensors(self) -> list[Tensor]:
        return [self.rows]


@dataclass
class DiagonalFisher(FisherMatrix):
    """Only the diagonal."""

    diag: Tensor
    structure = "diagonal"

    @property
    def num_params(self) -> int:
        return self.diag.shape[0]

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    def diagonal(self) -> Tensor:
        return self.diag

    def mv(self, v: Tensor) -> Tensor:
        return self.diag * v if v.dim() == 1 else self.diag[:, None] * v

    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        d = self.diag + damping
        return v / d if v.dim() == 1 else v / d[:, None]

    def _tensors(self) -> list[Tensor]:
        return [self.diag]


@dataclass
class BlockDiagonalFisher(FisherMatrix):
    """Independent blocks over consecutive slices of the parameter vector (one per layer);
    each block is any FisherMatrix (dense blocks, or Kronecker blocks for ``kfac``)."""

    blocks: list[FisherMatrix]
    structure = "block_diagonal"

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks)

    def _split(self, v: Tensor) -> list[Tensor]:
        return list(torch.split(v, [b.num_params for b in self.blocks], dim=0))

    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    def mv(self, v: Tensor) -> Tensor:
        return torch.cat([b.mv(x) for b, x in zip(self.blocks, self._split(v))])

    def solve(self, v: Tensor, damping: float) -> Tensor:
        return torch.cat([b.solve(x, damping) for b, x in zip(self.blocks, self._split(v))])

    def trace(self) -> Tensor:
        return sum(b.trace() for b in self.blocks)

    def _tensors(self) -> list[Tensor]:
        return [t for b in self.blocks for t in b._tensors()]


@dataclass
class KroneckerBlock(FisherMatrix):
    """One layer's ``A ⊗ G`` over its flattened ``[d_out, d_in (+1)]`` gradient (row-major:
    weight entries then bias as the last column, reordered to the parameter order by
    ``order``, a permutation of the flat matrix positions)."""

    a_factor: Tensor
    g_factor: Tensor
    order: Tensor  # flat parameter position -> row-major matrix position
    structure = "kron"

    @property
    def num_params(self) -> int:
        return self.order.numel()

    def _to_matrix(self, v: Tensor) -> Tensor:
        m = torch.empty_like(v)
        m[self.order] = v
        return m.reshape(self.g_factor.shape[0], self.a_factor.shape[0], *v.shape[1:])

    def _from_matrix(self, m: Tensor) -> Tensor:
        return m.reshape(self.num_params, *m.shape[2:])[self.order]

    def mv(self, v: Tensor) -> Tensor:
        m = self._to_matrix(v)
        if v.dim() == 1:
            return self._from_matrix(self.g_factor @ m @ self.a_factor)
        return self._from_matrix(torch.einsum("ij,jkb,kl->ilb", self.g_factor, m, self.a_factor))

    def diagonal(self) -> Tensor:
        return self._from_matrix(torch.outer(torch.diagonal(self.g_factor), torch.diagonal(self.a_factor)))

    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        eg, ea = ops.damped_eigh(self.g_factor), ops.damped_eigh(self.a_factor)
        cols = v if v.dim() == 2 else v[:, None]
        outs = [self._from_matrix(ops.kfac_precondition_eigen(
            self._to_matrix(c).contiguous(), eg.eigenvalues, eg.eigenvectors, ea.eigenvalues,
            ea.eigenvectors, damping)) for c in cols.T]
        return torch.stack(outs, 1) if v.dim() == 2 else outs[0]

    def trace(self) -> Tensor:
        return torch.trace(self.g_factor) * torch.trace(self.a_factor)

    def _tensors(self) -> list[Tensor]:
        return [self.a_factor, self.g_factor]
