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
``implicit``          inputs + outputs' residuals/probs      CG on jvp/vjp products
====================  =====================================  =================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from typing_extensions import override

from natgrad import ops
from natgrad.curvature import CurvatureBlock


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
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        """The tensors this representation holds."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matrix (of the tensors it holds)."""
        return self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the matrix (of the tensors it holds)."""
        return self.tensors()[0].device


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
    @override
    def num_params(self) -> int:
        return self.matrix.shape[0]

    @override
    def to_dense(self) -> Tensor:
        return self.matrix

    @override
    def diagonal(self) -> Tensor:
        return torch.diagonal(self.matrix)

    @override
    def mv(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    @override
    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        eye = torch.eye(self.num_params, dtype=self.matrix.dtype, device=self.matrix.device)
        return torch.linalg.solve(self.matrix + damping * eye, v)

    @override
    def tensors(self) -> list[Tensor]:
        return [self.matrix]


@dataclass
class LowRankFisher(FisherMatrix):
    """F = UᵀU / n from score rows U [r, p]; solves use the Woodbury op (never p × p).
    ``last_rung`` is the fallback-ladder rung of the last solve (0: native Cholesky).
    """

    rows: Tensor
    num_samples: int
    structure = "lowrank"
    last_rung = 0

    @property
    @override
    def num_params(self) -> int:
        return self.rows.shape[1]

    @override
    def to_dense(self) -> Tensor:
        return self.rows.T @ self.rows / self.num_samples

    @override
    def diagonal(self) -> Tensor:
        return self.rows.pow(2).sum(0) / self.num_samples

    @override
    def mv(self, v: Tensor) -> Tensor:
        return self.rows.T @ (self.rows @ v) / self.num_samples

    @override
    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        # The op normalises by its row count; rescale rows so that UᵀU/rows = UᵀU/n (no copy
        # when there is one row per sample, the empirical Fisher every NaturalGradient step uses).
        rows = self.rows
        if rows.shape[0] != self.num_samples:
            rows = rows * math.sqrt(rows.shape[0] / self.num_samples)
        out = ops.woodbury_solve(rows, v, damping)
        self.last_rung = int(out.rung)
        return out.solution

    @override
    def trace(self) -> Tensor:
        return self.rows.pow(2).sum() / self.num_samples

    @override
    def tensors(self) -> list[Tensor]:
        return [self.rows]


@dataclass
class DiagonalFisher(FisherMatrix):
    """Only the diagonal."""

    diag: Tensor
    structure = "diagonal"

    @property
    @override
    def num_params(self) -> int:
        return self.diag.shape[0]

    @override
    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    @override
    def diagonal(self) -> Tensor:
        return self.diag

    @override
    def mv(self, v: Tensor) -> Tensor:
        return self.diag * v if v.dim() == 1 else self.diag[:, None] * v

    @override
    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        d = self.diag + damping
        return v / d if v.dim() == 1 else v / d[:, None]

    @override
    def tensors(self) -> list[Tensor]:
        return [self.diag]


@dataclass
class BlockDiagonalFisher(FisherMatrix):
    """Independent blocks over consecutive slices of the parameter vector (one per layer);
    each block is any FisherMatrix (dense blocks, or Kronecker blocks for ``kfac``).
    """

    blocks: list[FisherMatrix]
    structure = "block_diagonal"

    @property
    @override
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks)

    def _split(self, v: Tensor) -> list[Tensor]:
        return list(torch.split(v, [b.num_params for b in self.blocks], dim=0))

    @override
    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

    @override
    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    @override
    def mv(self, v: Tensor) -> Tensor:
        return torch.cat([b.mv(x) for b, x in zip(self.blocks, self._split(v))])

    @override
    def solve(self, v: Tensor, damping: float) -> Tensor:
        return torch.cat([b.solve(x, damping) for b, x in zip(self.blocks, self._split(v))])

    @override
    def trace(self) -> Tensor:
        return cast(Tensor, sum(b.trace() for b in self.blocks))  # the int 0 only without blocks

    @override
    def tensors(self) -> list[Tensor]:
        return [t for b in self.blocks for t in b.tensors()]

    def kronecker_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The ``(A, G)`` factors of every Kronecker block, by module name (as in
        ``model.named_modules()``; a tied weight under the module whose block it got, see
        :mod:`natgrad.curvature.registry`), in block order; dense blocks (modules without a
        Kronecker kind) are left out, so any other structure gives ``{}``.

        ``A`` is the mean outer product of the layer's inputs (with a ones column last for a
        bias) ``[d_in(+1), d_in(+1)]`` and ``G`` that of the per-sample output gradients
        ``[d_out, d_out]``, so the layer's Fisher is ``G ⊗ A`` over its ``[W | b]`` matrix
        vectorised row-major. For an Embedding, ``A`` is the vector of token frequencies (the
        diagonal of its one-hot inputs' outer product). The tensors are the blocks' own, not
        copies: clone them before changing them.

        Example::

            >>> import torch, natgrad
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
            >>> fisher = natgrad.fisher.compute_fisher(model, x, y, structure="kfac")
            >>> {name: (tuple(A.shape), tuple(G.shape)) for name, (A, G) in fisher.kronecker_factors().items()}
            {'0': ((4, 4), (4, 4)), '2': ((5, 5), (2, 2))}
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for b in self.blocks:
            factors = b.block.factors() if isinstance(b, BlockFisher) else {}
            if "A" in factors and "G" in factors:
                out[cast(BlockFisher, b).block.name] = (factors["A"], factors["G"])
        return out


@dataclass
class BlockFisher(FisherMatrix):
    """One curvature block (:mod:`natgrad.curvature`; the K-FAC blocks natgrad.KFAC uses) as a
    FisherMatrix over its parameters' flattened vector (weight entries, then bias). ``solve``
    eigendecomposes the block's factors once, on first use.
    """

    block: CurvatureBlock
    structure = "kfac"

    @property
    @override
    def num_params(self) -> int:
        return self.block.num_params

    def _columns(self, v: Tensor, fn) -> Tensor:
        if v.dim() == 1:
            return self.block.flatten(fn(self.block.split_flat(v)))
        return torch.stack([self._columns(c, fn) for c in v.T], 1)

    @override
    def mv(self, v: Tensor) -> Tensor:
        return self._columns(v, self.block.mv)

    @override
    def solve(self, v: Tensor, damping: float) -> Tensor:
        _check_damping(damping)
        if not self.block.has_inverse:
            self.block.update_inverse("eigen", damping)
        return self._columns(v, lambda t: self.block.solve(t, damping))

    @override
    def quad_form(self, v: Tensor) -> Tensor:
        return self.block.quad_form(self.block.split_flat(v))

    @override
    def diagonal(self) -> Tensor:
        return self.block.flatten(self.block.diagonal())

    @override
    def to_dense(self) -> Tensor:
        return self.block.to_dense()

    @override
    def trace(self) -> Tensor:
        return self.diagonal().sum()

    @override
    def tensors(self) -> list[Tensor]:
        return list(self.block.factors().values())
