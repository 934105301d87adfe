"""Block-diagonal Kronecker factors: a factor side larger than ``max_factor_dim`` is kept as the
diagonal blocks of its factor (Distributed Shampoo's ``max_preconditioner_dim``).

A Kronecker block whose activation factor ``A`` (size ``d``) exceeds the limit keeps the exact
statistics ``A`` but preconditions with ``Ā = blockdiag(A[c₁,c₁], …, A[c_k,c_k])`` for contiguous
ranges ``c_j`` of at most ``limit`` indices (likewise ``Ḡ`` for a large gradient factor). The
layer's curvature is then ``Ā ⊗ Ḡ``, and every rule of the dense block applies to it unchanged:
exact damping ``(Ā ⊗ Ḡ + γI)⁻¹`` in the eigenbasis, or factored damping with
``π = sqrt((tr Ā / d_A) / (tr Ḡ / d_G))`` — the same π as the dense factors', since a
block-diagonal part keeps the diagonal. Each tile ``(r_i, c_j)`` of the packed gradient is then
preconditioned by its own Kronecker pair ``(Ḡ_i, Ā_j)``:

    U[r_i, c_j] = (Ḡ_i ⊗ Ā_j-damped)⁻¹ ∇W̃[r_i, c_j]

so a decomposition costs ``Σ b_j³`` instead of ``d³``, and a step ``d_out · d · b`` instead of
``d_out · d²`` on that side.

Decompositions are stored dense and block-diagonal (zeros off the blocks), with the keys and
shapes of the dense block: a block-diagonal matrix of orthonormal blocks is an orthonormal
eigenbasis of ``Ā``, so checkpoints, distributed broadcasts and the list ops read them as they
read any decomposition, and give the same ``Ā ⊗ Ḡ`` result. The ranges are balanced (sizes
differ by at most one unit: 4608 at limit 1024 gives five blocks of ≈ 922, not four of 1024
and one of 512) and fall on whole units — a convolution's ``kh·kw`` patch of one input channel
(:meth:`natgrad.curvature.kron.KroneckerBlock.a_unit`), so that a block holds whole channels and
their spatial correlations; a bias (the last index of ``A``) joins the last block.

Within a split side, rows of a block that are exactly zero are deflated before the ladder: they
are eigenvectors of eigenvalue 0 (and ``1/δ`` rows of a damped inverse), exactly. They are the
rule on small feature maps: a 3×3 convolution with padding 1 on a 1×1 map (ResNet-18's layer4
at 32×32 inputs) sees data only in its centre tap, so 8/9 of its ``A`` is zero — a repeated
zero eigenvalue on which float32 ``eigh`` fails to converge, sending the whole factor to the
float64 rung. A step then multiplies only the live part of such a block by its eigenvectors
(:func:`deflation_plan`); the unit eigenvectors take the diagonal-A op (``x / γ`` with exact
damping). The statistics themselves stay dense (the factor ops compute all of ``A``).
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import ops
from natgrad.curvature import refresh

__all__ = ["Deflated", "block_diagonal", "damped_inverse_blocks", "deflation_plan", "describe_ranges", "eigh_blocks",
           "factor_ranges", "precondition_tiles", "warm_refresh_blocks"]

Ranges = list[tuple[int, int]]


def factor_ranges(dim: int, limit: int | None, unit: int = 1, tail: int = 0) -> Ranges:
    """Contiguous ranges covering ``[0, dim)``: the first ``dim - tail`` indices (the features)
    in as few balanced ranges of at most ``limit`` as possible, with boundaries on multiples of
    ``unit``; the last ``tail`` indices (a bias) join the last range, so a 1024-wide layer with a
    bias is not split at limit 1024.

    Args:
        dim (int): the factor's size (``tail`` included).
        limit (int or None): the largest block of features; None: one range, never split.
        unit (int): indices that stay together (1 when ``unit > limit`` or it does not divide
            ``dim - tail``) (default: 1).
        tail (int): trailing indices outside the units (default: 0).

    Returns:
        list of (start, stop): ``[(0, dim)]`` when ``dim - tail <= limit``.
    """
    body = dim - tail
    if limit is None or body <= limit:
        return [(0, dim)]
    if unit < 1 or unit > limit or body % unit:
        unit = 1
    edges = list(range(unit, body + 1, unit))
    for count in range(math.ceil(body / limit), len(edges) + 1):
        cuts = [0]
        for j in range(1, count):
            target = j * body / count
            i = bisect.bisect_left(edges, target)
            near = [e for e in edges[max(i - 1, 0):i + 1] if cuts[-1] < e < body]
            if near:
                cuts.append(min(near, key=lambda e: abs(e - target)))
        cuts.append(body)
        if max(b - a for a, b in zip(cuts, cuts[1:])) <= limit:
            cuts[-1] = dim
            return list(zip(cuts, cuts[1:]))
    raise AssertionError("unreachable: one range per unit fits every limit >= unit")


def describe_ranges(ranges: Ranges) -> str:
    """``"5 blocks of 918-927"`` (for ``KFAC.describe()``)."""
    sizes = [b - a for a, b in ranges]
    low, high = min(sizes), max(sizes)
    return f"{len(sizes)} blocks of {low}" + (f"-{high}" if high != low else "")


def block_diagonal(matrix: Tensor, ranges: Ranges) -> Tensor:
    """``blockdiag(matrix[r, r] for r in ranges)``: ``matrix`` with every entry outside the
    diagonal blocks zeroed (a copy; ``matrix`` itself when there is one range).
    """
    if len(ranges) == 1:
        return matrix
    return torch.block_diag(*[matrix[a:b, a:b] for a, b in ranges])


def _live(block: Tensor) -> Tensor | None:
    """Indices of the rows of ``block`` that are not all zero, or None when none is (one host
    read).
    """
    live = (block != 0).any(1)
    return None if bool(live.all()) else live.nonzero().squeeze(1)


def _eigh_deflated(block: Tensor) -> tuple[Tensor, Tensor, int]:
    """:func:`natgrad.ops.damped_eigh` of one block with its zero rows deflated: they are
    eigenvectors (unit vectors) of eigenvalue 0, and the ladder sees only the rest (a repeated
    zero eigenvalue is what makes a float32 ``eigh`` fail to converge).
    """
    live = _live(block)
    if live is None:
        e = ops.damped_eigh(block)
        return e.eigenvalues, e.eigenvectors, int(e.rung)
    n = block.shape[0]
    values = block.new_zeros(n)
    vectors = torch.eye(n, dtype=block.dtype, device=block.device)
    if live.numel() == 0:
        return values, vectors, 0
    e = ops.damped_eigh(block[live][:, live])
    values[live] = e.eigenvalues
    vectors[live.unsqueeze(1), live] = e.eigenvectors
    return values, vectors, int(e.rung)


def eigh_blocks(factor: Tensor, ranges: Ranges) -> tuple[Tensor, Tensor, int]:
    """The eigendecomposition of ``block_diagonal(factor, ranges)``, block by block through the
    ladder (:func:`natgrad.ops.damped_eigh`, zero rows deflated): ``(eigenvalues [d],
    block-diagonal eigenvectors [d, d], worst rung)``.
    """
    parts = [_eigh_deflated(factor[a:b, a:b]) for a, b in ranges]
    values = torch.cat([p[0] for p in parts])
    vectors = torch.block_diag(*[p[1] for p in parts])
    return values, vectors, max(p[2] for p in parts)


def _live_part(factor: Tensor, span: tuple[int, int] | None, shift: float) -> tuple[Tensor, Tensor | None]:
    """One block scaled by ``1/shift`` with its zero rows dropped, and the indices of the rows
    kept (None: all); a missing block is a 1×1 zero.
    """
    if span is None:
        return factor.new_zeros(1, 1), None
    block = factor[span[0]:span[1], span[0]:span[1]]
    live = _live(block)
    kept = block if live is None else block[live][:, live]
    return (kept if kept.numel() else block.new_zeros(1, 1)) / shift, live


def _place(inverse: Tensor, live: Tensor | None, n: int, shift: float) -> Tensor:
    """``(F + shift·I)⁻¹`` of a block from the inverse of its live part: ``1/shift`` on the
    deflated zero rows.
    """
    if live is None:
        return inverse / shift
    full = torch.eye(n, dtype=inverse.dtype, device=inverse.device) / shift
    if live.numel():
        full[live.unsqueeze(1), live] = inverse / shift
    return full


def damped_inverse_blocks(g: Tensor, a: Tensor, g_ranges: Ranges, a_ranges: Ranges, damping: float,
                          pi_correction: bool) -> tuple[Tensor, Tensor, int]:
    """``(Ḡ + δ_G I)⁻¹`` and ``(Ā + δ_A I)⁻¹`` (block-diagonal, dense) with the factored shifts
    of :func:`natgrad.ops.kfac_damped_inverses` (π from the whole factors' diagonals, which the
    blocks share), and the worst rung.

    Each block goes through that op's ladder as ``(F_j / δ + I)⁻¹ / δ``: the op shifts both of
    its factors by ``√γ`` for ``γ = 1`` without π, so scaling each block by its side's shift
    gives exactly ``(F_j + δ I)⁻¹``; zero rows are deflated (``1/δ`` there). Blocks are paired
    across the two sides (a missing partner is a 1×1 zero).
    """
    shift_g, shift_a = refresh.factored_shifts(g, a, damping, pi_correction)
    g_parts, a_parts, rung = [], [], 0
    for gr, ar in itertools.zip_longest(g_ranges, a_ranges):
        g_block, g_live = _live_part(g, gr, shift_g)
        a_block, a_live = _live_part(a, ar, shift_a)
        inv = ops.kfac_damped_inverses(g_block, a_block, 1.0, False)
        rung = max(rung, int(inv.rung))
        if gr is not None:
            g_parts.append(_place(inv.g_inverse, g_live, gr[1] - gr[0], shift_g))
        if ar is not None:
            a_parts.append(_place(inv.a_inverse, a_live, ar[1] - ar[0], shift_a))
    return torch.block_diag(*g_parts), torch.block_diag(*a_parts), rung


def _eigen_pi(g_values: Tensor, a_values: Tensor) -> Tensor:
    """π of the eigenbasis preconditioner (as :func:`natgrad.ops.kfac_precondition_eigen`):
    ``sqrt(mean λ_A / mean λ_G)``, 1 unless both means are positive (0-d, no host read).
    """
    a_mean, g_mean = a_values.mean(), g_values.mean()
    ok = (a_mean > 0) & (g_mean > 0)
    return torch.where(ok, a_mean / torch.where(ok, g_mean, torch.ones_like(g_mean)), torch.ones_like(a_mean)).sqrt()


class Deflated(NamedTuple):
    """One block of an eigenbasis split into unit eigenvectors (``dead``: ``±e_i``, e.g. the
    deflated zero rows) and the rest (``live``, compact): a step then multiplies only the live
    part by eigenvectors.
    """

    live: Tensor  #: indices in the block whose eigenvectors are not unit vectors
    dead: Tensor  #: indices whose eigenvector is ``±e_i`` (row and column)
    values: Tensor  #: eigenvalues of the live part
    vectors: Tensor  #: ``[n_live, n_live]`` eigenvectors of the live part (contiguous)
    dead_values: Tensor  #: eigenvalues of the unit eigenvectors
    dead_zero: bool  #: all of them are 0 (with exact damping the step is then ``x / γ`` there)


def deflation_plan(values: Tensor, vectors: Tensor, ranges: Ranges) -> list[Deflated | None]:
    """Per block of a block-diagonal eigenbasis, its :class:`Deflated` split, or None when no
    eigenvector is a unit vector (one host read per block; cached by the caller per
    decomposition).
    """
    plan: list[Deflated | None] = []
    for a, b in ranges:
        v, lam = vectors[a:b, a:b], values[a:b]
        unit = torch.diagonal(v).abs() == 1  # a unit-norm column with a ±1 entry is ±e_i
        if not bool(unit.any()):
            plan.append(None)
            continue
        live, dead = (~unit).nonzero().squeeze(1), unit.nonzero().squeeze(1)
        plan.append(Deflated(live, dead, lam[live], v[live][:, live].contiguous(), lam[dead],
                             bool((lam[dead] == 0).all())))
    return plan


def precondition_tiles(x: Tensor, state: Mapping[str, Tensor], g_ranges: Ranges, a_ranges: Ranges, damping: float,
                       pi_correction: bool, plan: Sequence[Deflated | None] | None = None) -> Tensor:
    """``(Ā ⊗ Ḡ + damping)⁻¹`` on the packed gradient ``x`` ``[d_G, d_A]``, tile by tile, from
    the block-diagonal decomposition in ``state`` (eigen or inverse keys); the damping rule is the
    dense block's (see the module docstring). Tiles go through
    :func:`natgrad.ops.kfac_precondition_eigen` / ``_inverse``, views of the stored blocks; with
    an eigenbasis and a :func:`deflation_plan` of A, a block's unit eigenvectors take
    :func:`natgrad.ops.kfac_precondition_diagonal_a` (or ``x / γ``) and only its live part the
    eigenvector products.
    """
    out = torch.empty_like(x)
    if "g_inverse" in state:
        g_inv, a_inv = state["g_inverse"], state["a_inverse"]
        for (r0, r1), (c0, c1) in itertools.product(g_ranges, a_ranges):
            out[r0:r1, c0:c1] = ops.kfac_precondition_inverse(x[r0:r1, c0:c1], g_inv[r0:r1, r0:r1],
                                                              a_inv[c0:c1, c0:c1])
        return out
    g_values, a_values = state["g_eigenvalues"], state["a_eigenvalues"]
    gamma, a_shift = damping, None
    if pi_correction:  # factored damping folded into the eigenvalues: denominators λ'_G λ'_Aᵀ
        pi, root = _eigen_pi(g_values, a_values), math.sqrt(damping)
        g_values, a_values, gamma, a_shift = g_values + root / pi, a_values + pi * root, 0.0, pi * root
    g_vec, a_vec = state["g_eigenvectors"], state["a_eigenvectors"]
    plan = plan or [None] * len(a_ranges)
    for (r0, r1), ((c0, c1), part) in itertools.product(g_ranges, zip(a_ranges, plan)):
        tile, g_val, g_v = x[r0:r1, c0:c1], g_values[r0:r1], g_vec[r0:r1, r0:r1]
        if part is None:
            out[r0:r1, c0:c1] = ops.kfac_precondition_eigen(tile, g_val, g_v, a_values[c0:c1], a_vec[c0:c1, c0:c1],
                                                            gamma, False)
            continue
        if part.live.numel():
            live_values = part.values if a_shift is None else part.values + a_shift
            out[r0:r1, c0 + part.live] = ops.kfac_precondition_eigen(tile[:, part.live], g_val, g_v, live_values,
                                                                     part.vectors, gamma, False)
        if a_shift is None and part.dead_zero:  # V_G (V_Gᵀ x) / (λ_G · 0 + γ)
            out[r0:r1, c0 + part.dead] = tile[:, part.dead] / gamma
        else:
            dead_values = part.dead_values if a_shift is None else part.dead_values + a_shift
            out[r0:r1, c0 + part.dead] = ops.kfac_precondition_diagonal_a(tile[:, part.dead], dead_values, g_val,
                                                                          g_v, gamma, False)
    return out


def warm_refresh_blocks(factor: Tensor, values: Tensor, vectors: Tensor, ranges: Ranges) -> tuple[Tensor, Tensor]:
    """:func:`natgrad.curvature.refresh.warm_eigh` block by block (the basis stays
    block-diagonal).
    """
    parts = [refresh.warm_eigh(factor[a:b, a:b], values[a:b], vectors[a:b, a:b]) for a, b in ranges]
    return torch.cat([p[0] for p in parts]), torch.block_diag(*[p[1] for p in parts])

