"""The Kronecker-factored curvature block: the base of every layer kind's block
(:mod:`natgrad.curvature.layers`).

A block owns its layer's factors ``A`` (activation side) and ``G`` (gradient side), their
decompositions, and every product with ``A ⊗ G`` (see :mod:`natgrad.curvature.block`). All
linear algebra runs in the C++ ops (:mod:`natgrad.ops`).

Layout: a layer's weight (and bias) is packed as the matrix ``W̃ = [W, b]`` of shape
``[d_out, d_in (+1)]`` (Embedding: ``Wᵀ``, ``[dim, num_embeddings]``), so that
``F ≈ A ⊗ G`` acts as ``W̃ ↦ G W̃ A``.

Scaling. The Fisher is the mean over samples of per-sample gradient outer products. Captured
output gradients times ``grad_scale`` are per-sample gradients, and a sample's gradient sums over
its ``R`` weight-sharing positions (tokens, pixels), so the "expand" approximation (Eschenhagen et
al., 2023; KFC for convolutions) uses ``A = mean over rows of ã ãᵀ`` and ``G = R · Σ_passes mean
over rows of (s g)(s g)ᵀ``, i.e. the ops' ``grad_scale = s·sqrt(R·passes)``. "reduce" averages
activations and sums gradients over positions first (``R = 1``).

EKFAC (George et al., 2018; :func:`enable_eigenvalue_correction`). The block keeps the factors'
eigenbasis but replaces ``λ_G λ_Aᵀ`` by ``S = E_n[(V_Gᵀ ∇W_n V_A)²]`` (state entry
:data:`CORRECTED`), the EMA of the exact per-sample gradients rotated into the basis (a sample's
positions summed, under "reduce" too; a layer's calls count as samples, as for its factors),
updated with every factor update by the ops of :mod:`natgrad.ops.ekfac`. The first
decomposition sets ``S = λ_G λ_Aᵀ``; each later one carries ``S`` into the new basis
(:func:`natgrad.ops.ekfac_rebase`). Directions damp exactly, ``S + γ``.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from natgrad import ops
from natgrad.curvature import refresh, split
from natgrad.curvature.block import BlockDirections, CurvatureBlock, DirectionRequest, PlainBlock, curvature_dtype
from natgrad.curvature.diagonal import DiagonalBlock

#: The block state entry of EKFAC's corrected diagonal ``S`` (``[d_g, d_a]``, in the packed layout).
CORRECTED = "corrected_eigenvalues"


class PerSample(NamedTuple):
    """One update's per-sample data for EKFAC's diagonal (:mod:`natgrad.ops.ekfac`): inputs
    ``[N, ...]`` (samples first), output gradients ``[P·N, ...]`` (pass-major) and the scale that
    makes them per-sample gradients (no ``sqrt(positions)``: positions are summed exactly).
    """

    inputs: Tensor
    grads: Tensor
    grad_scale: float


class Statistics(NamedTuple):
    """One update's data in the ops' layout, and the row counts that bound its Gram sums."""

    inputs: Tensor
    grads: Tensor
    grad_scale: float  # the ops' grad_scale: per-sample scale × sqrt(positions × passes)
    input_rows: int
    grad_rows: int
    per_sample: PerSample | None = None  # EKFAC's data, when the block corrects its eigenvalues


class KroneckerBlock(CurvatureBlock):
    """Base class: ``F ≈ A ⊗ G`` over one layer's packed weight (+bias).

    Args:
        name (str): the module's qualified name in the model (checkpoint key).
        module (nn.Module): the layer.
        factor_dtype (torch.dtype or None): dtype of A and G (default: :func:`natgrad.curvature.block.curvature_dtype`).
        inverse_dtype (torch.dtype or None): dtype of decompositions (default: factor dtype).
    """

    kind = "kron"
    #: EKFAC can serve the block (its kind implements :meth:`_corrected_ema`)
    supports_eigenvalue_correction = False
    #: EKFAC (George et al., 2018) is on: the eigenbasis of ``A ⊗ G`` with the diagonal ``S``
    #: re-estimated every factor update from per-sample gradients (set by
    #: :func:`enable_eigenvalue_correction`)
    eigenvalue_correction = False
    #: ``A`` and ``G`` are full matrices over the packed ``[d_out, d_in (+1)]`` layout, solved by
    #: :meth:`precondition` (an EWC prior can join them); False: a kind with its own structure
    full_factors = True

    def __init__(self, name: str, module: nn.Module, factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None) -> None:
        self.module = module
        self.weight = cast(nn.Parameter, module.weight)
        self.bias: nn.Parameter | None = getattr(module, "bias", None)
        super().__init__(name, [self.weight] + ([self.bias] if self.bias is not None else []))
        self.factor_dtype = curvature_dtype(factor_dtype, self.weight)
        self.inverse_dtype = inverse_dtype or self.factor_dtype
        #: the largest factor side decomposed whole (None: no limit; see :meth:`limit_factors`)
        self.max_factor_dim: int | None = None

    @property
    def method(self) -> str:
        """"EKFAC" with the eigenvalue correction, else "K-FAC" (for ``KFAC.describe()``)."""
        return "EKFAC" if self.eigenvalue_correction else "K-FAC"

    @property
    @override
    def description(self) -> str:
        return f"{self.method} {self.kind}" + self.split_note()

    # ---- large factors (natgrad.curvature.split) ----------------------------------------------

    def limit_factors(self, max_factor_dim: int | None) -> None:
        """Keeps a factor side larger than ``max_factor_dim`` block-diagonal (None: never); see
        :mod:`natgrad.curvature.split`. A kind with its own structure (``full_factors`` False)
        ignores it.
        """
        self.max_factor_dim = max_factor_dim if self.full_factors else None

    def a_unit(self) -> int:
        """Indices of A that a split keeps together (a convolution's patch of one input
        channel); the base: 1.
        """
        return 1

    def a_ranges(self) -> list[tuple[int, int]]:
        """The blocks of A (one range: A is decomposed whole)."""
        return self._ranges()[1]

    def g_ranges(self) -> list[tuple[int, int]]:
        """The blocks of G (one range: G is decomposed whole)."""
        return self._ranges()[2]

    def _ranges(self) -> tuple[int | None, list[tuple[int, int]], list[tuple[int, int]]]:
        """``(limit, A's ranges, G's ranges)``, recomputed when the limit changes."""
        cached = getattr(self, "_split_ranges", None)
        if cached is None or cached[0] != self.max_factor_dim:
            limit = self.max_factor_dim
            a = split.factor_ranges(self.a_dim(), limit, self.a_unit(), int(self.bias is not None))
            cached = self._split_ranges = (limit, a, split.factor_ranges(self.g_dim(), limit))
        return cached

    @property
    def is_split(self) -> bool:
        """Whether a factor side is block-diagonal (more than ``max_factor_dim``)."""
        return len(self.a_ranges()) > 1 or len(self.g_ranges()) > 1

    def split_note(self) -> str:
        """Which sides are block-diagonal and why, for ``KFAC.describe()`` ("" when none)."""
        a_size = f"{self.a_dim() - 1} (+bias)" if self.bias is not None else str(self.a_dim())
        notes = [f"{side} {size} > max_factor_dim {self.max_factor_dim}: block-diagonal, {split.describe_ranges(r)}"
                 for side, size, r in (("A", a_size, self.a_ranges()), ("G", str(self.g_dim()), self.g_ranges()))
                 if len(r) > 1]
        return "; " + "; ".join(notes) if notes else ""

    @property
    @override
    def has_factors(self) -> bool:
        return "A" in self.state

    @property
    @override
    def has_inverse(self) -> bool:
        return "g_eigenvectors" in self.state or "g_inverse" in self.state

    # ---- layout -------------------------------------------------------------------------------

    def a_dim(self) -> int:
        """Size of A (inputs, +1 for the bias)."""
        return self.weight[0].numel() + (self.bias is not None)

    def g_dim(self) -> int:
        """Size of G (outputs)."""
        return self.weight.shape[0]

    @override
    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        w = tensors[0] if tensors[0] is not None else torch.zeros_like(self.weight)
        w = w.reshape(self.g_dim(), -1)
        if self.bias is None:
            return w
        b = tensors[1] if tensors[1] is not None else torch.zeros_like(self.bias)
        return torch.cat([w, b.reshape(-1, 1)], 1)

    @override
    def unpack(self, packed: Tensor) -> list[Tensor]:
        if self.bias is None:
            return [packed.reshape(self.weight.shape)]
        return [packed[:, :-1].reshape(self.weight.shape), packed[:, -1].reshape(self.bias.shape)]

    # ---- statistics ---------------------------------------------------------------------------

    @override
    def factors(self) -> dict[str, Tensor]:
        return {k: self.state[k] for k in ("A", "G") if k in self.state}

    @override
    def inverse_cost(self) -> float:
        if self.full_factors and self.is_split:  # Σ b³ over the blocks (distributed owners balance by it)
            return float(sum((b - a) ** 3 for r in (self.a_ranges(), self.g_ranges()) for a, b in r))
        return float(sum(f.shape[0] ** (3 if f.dim() == 2 else 1) for f in self.factors().values()))

    @override
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        a, g = self.a_dim(), self.g_dim()
        shapes = {"A": (a, a), "G": (g, g), "a_eigenvalues": (a,), "a_eigenvectors": (a, a),
                  "g_eigenvalues": (g,), "g_eigenvectors": (g, g), "a_inverse": (a, a), "g_inverse": (g, g)}
        return shapes | ({CORRECTED: (g, a)} if self.eigenvalue_correction else {})

    @override
    def ensure_factors(self) -> None:
        device = self.weight.device
        for key, shape in (("A", self.expected_shapes()["A"]), ("G", (self.g_dim(), self.g_dim()))):
            if key not in self.state:
                self.state[key] = torch.zeros(shape, dtype=self.factor_dtype, device=device)

    def count_samples(self, inputs: Sequence[Tensor]) -> int:
        """Samples in the forward calls' inputs (dim 0 indexes samples; an unbatched input is
        one sample).
        """
        return sum(x.shape[0] if x.dim() > 1 else 1 for x in inputs)

    def count_rows(self, inputs: Sequence[Tensor]) -> int:
        """Rows of the forward calls (samples × weight-sharing positions); the base: one per
        sample.
        """
        return self.count_samples(inputs)

    def prepare(self, inputs: Sequence[Tensor], grads: Sequence[Tensor], grad_scale: float) -> Statistics:
        """Concatenates the forward calls' data into the ops' layout (no statistics yet)."""
        raise NotImplementedError

    def statistics_ok(self, stats: Statistics) -> Tensor:
        """A 0-d bool tensor (no host sync): every value is finite and small enough that no Gram
        sum of the update can overflow the factor dtype. The factors are then finite after the
        update, so a bad batch skips the layer instead of poisoning its factors
        (:func:`natgrad.ops.kfac_statistics_ok`).
        """
        return ops.kfac_statistics_ok(stats.inputs, stats.grads, stats.input_rows, stats.grad_rows,
                                      stats.grad_scale, self.factor_dtype)

    @override
    def update(self, inputs, grads, *, decay, grad_scale):
        self.apply_update(self.prepare(inputs, grads, grad_scale), decay)

    def apply_update(self, stats: Statistics, decay: float) -> None:
        """The EMA update from :meth:`prepare` output (the first update replaces)."""
        rho = decay if self.has_factors else 0.0
        self.ensure_factors()
        self._update_a(stats, rho)
        ops.linear_grad_factor_ema_(self.state["G"], stats.grads, stats.grad_scale, rho)
        self.update_corrected(stats, decay)

    def _update_a(self, stats: Statistics, rho: float) -> None:
        raise NotImplementedError

    # ---- EKFAC: the corrected diagonal ---------------------------------------------------------

    def update_corrected(self, stats: Statistics, decay: float) -> None:
        """EKFAC: ``S ← decay·S + (1 − decay)·E_n[(V_Gᵀ ∇W_n V_A)²]`` in the current eigenbasis
        (nothing before the first decomposition, which initialises ``S``; nothing without the
        correction). A non-finite update leaves ``S`` unchanged (the op decides on the device).
        """
        if not self.eigenvalue_correction or stats.per_sample is None or "g_eigenvectors" not in self.state:
            return
        if CORRECTED not in self.state:
            self.init_corrected()
        self._corrected_ema(stats.per_sample, decay)

    def _corrected_ema(self, data: PerSample, decay: float) -> None:
        """The kind's EKFAC op on ``self.state[CORRECTED]`` (only if supported)."""
        raise NotImplementedError

    def _a_side(self) -> tuple[Tensor | None, Tensor]:
        """``(V_A, λ_A)`` of the decomposition (``V_A`` None: A is diagonal, ``λ_A`` its diagonal)."""
        return self.state["a_eigenvectors"], self.state["a_eigenvalues"]

    def init_corrected(self) -> None:
        """``S = λ_G λ_Aᵀ``: the diagonal of ``A ⊗ G`` in its own eigenbasis (the start of the
        estimate, and what a checkpoint saved without ``S`` resumes from).
        """
        _, a_values = self._a_side()
        g_values = self.state["g_eigenvalues"]
        self.state[CORRECTED] = torch.outer(g_values, a_values.to(g_values.dtype).clamp_min(0))

    def _refresh_corrected(self, old: tuple[Tensor, Tensor, Tensor | None] | None) -> None:
        """After a decomposition: ``S`` carried into the new eigenbasis (:func:`natgrad.ops.ekfac_rebase`)
        from ``old = (S, V_G, V_A)`` of the previous one, or initialised (:meth:`init_corrected`).
        """
        if not self.eigenvalue_correction or "g_eigenvectors" not in self.state:
            return
        if old is None:
            self.init_corrected()
            return
        a_vectors, _ = self._a_side()
        self.state[CORRECTED] = ops.ekfac_rebase(old[0], old[1], self.state["g_eigenvectors"], old[2], a_vectors)

    def _corrected_basis(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(S, V_G, V_A)`` now, or None (no correction or no ``S`` yet)."""
        if not self.eigenvalue_correction or CORRECTED not in self.state or "g_eigenvectors" not in self.state:
            return None
        return self.state[CORRECTED], self.state["g_eigenvectors"], self._a_side()[0]

    # ---- decompositions -----------------------------------------------------------------------

    @override
    def decomposition_template(self, method: str) -> dict[str, Tensor]:
        opts: dict[str, Any] = dict(dtype=self.inverse_dtype, device=self.weight.device)
        a, g = self.a_dim(), self.g_dim()
        if method == "inverse":
            return {"g_inverse": torch.empty(g, g, **opts), "a_inverse": torch.empty(a, a, **opts)}
        return {"g_eigenvalues": torch.empty(g, **opts), "g_eigenvectors": torch.empty(g, g, **opts),
                "a_eigenvalues": torch.empty(a, **opts), "a_eigenvectors": torch.empty(a, a, **opts)}

    def update_inverse(self, method: str, damping: float, pi_correction: bool = False,
                       warm: bool = False) -> int:
        """Eigendecomposes the factors (``method`` "eigen") or forms damped inverses
        ("inverse") through the ops' fallback ladder; returns the rung used. With ``warm``, a
        cheap refresh from the previous decomposition (:mod:`natgrad.curvature.refresh`)
        replaces it when there is one (the inverse refresh may decline: then exact).
        """
        a = self.state["A"].to(self.inverse_dtype)
        g = self.state["G"].to(self.inverse_dtype)
        old = self._corrected_basis()
        if warm and self._warm_refresh(method, g, a, damping, pi_correction):
            self._refresh_corrected(old)
            return 0
        self.drop_decomposition()
        if self.is_split:
            return self._split_inverse(method, g, a, damping, pi_correction)
        if method == "inverse":
            inv = ops.kfac_damped_inverses(g, a, damping, pi_correction)
            self.state["g_inverse"], self.state["a_inverse"] = inv.g_inverse, inv.a_inverse
            return int(inv.rung)
        ea, eg = ops.damped_eigh(a), ops.damped_eigh(g)
        self.state["a_eigenvalues"], self.state["a_eigenvectors"] = ea.eigenvalues, ea.eigenvectors
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        self._refresh_corrected(old)
        return max(int(ea.rung), int(eg.rung))

    def _split_inverse(self, method: str, g: Tensor, a: Tensor, damping: float, pi_correction: bool) -> int:
        """:meth:`update_inverse` of a block-diagonal side: each block decomposed on its own,
        stored block-diagonal (:mod:`natgrad.curvature.split`).
        """
        s, g_ranges, a_ranges = self.state, self.g_ranges(), self.a_ranges()
        if method == "inverse":
            s["g_inverse"], s["a_inverse"], rung = split.damped_inverse_blocks(g, a, g_ranges, a_ranges, damping,
                                                                              pi_correction)
            return rung
        s["a_eigenvalues"], s["a_eigenvectors"], a_rung = split.eigh_blocks(a, a_ranges)
        s["g_eigenvalues"], s["g_eigenvectors"], g_rung = split.eigh_blocks(g, g_ranges)
        return max(a_rung, g_rung)

    def _warm_refresh(self, method: str, g: Tensor, a: Tensor, damping: float, pi_correction: bool) -> bool:
        s = self.state
        if self.is_split:
            return self._warm_split(method, g, a, damping, pi_correction)
        if method == "eigen" and "g_eigenvectors" in s and "a_eigenvectors" in s:
            for side, factor in (("g", g), ("a", a)):
                values, vectors = refresh.warm_eigh(factor, s[f"{side}_eigenvalues"], s[f"{side}_eigenvectors"])
                s[f"{side}_eigenvalues"], s[f"{side}_eigenvectors"] = values, vectors
            return True
        if method != "inverse" or "g_inverse" not in s or "a_inverse" not in s:
            return False
        shifts = refresh.factored_shifts(g, a, damping, pi_correction)
        new = [refresh.newton_schulz_inverse(f + shift * torch.eye(f.shape[0], dtype=f.dtype, device=f.device),
                                             s[key])
               for f, shift, key in ((g, shifts[0], "g_inverse"), (a, shifts[1], "a_inverse"))]
        if any(x is None for x in new):
            return False
        s["g_inverse"], s["a_inverse"] = cast(list[Tensor], new)
        return True

    def _warm_split(self, method: str, g: Tensor, a: Tensor, damping: float, pi_correction: bool) -> bool:
        """:meth:`_warm_refresh` block by block (the decomposition stays block-diagonal)."""
        s = self.state
        sides = (("g", g, self.g_ranges()), ("a", a, self.a_ranges()))
        if method == "eigen" and "g_eigenvectors" in s and "a_eigenvectors" in s:
            for side, factor, ranges in sides:
                s[f"{side}_eigenvalues"], s[f"{side}_eigenvectors"] = split.warm_refresh_blocks(
                    factor, s[f"{side}_eigenvalues"], s[f"{side}_eigenvectors"], ranges)
            return True
        if method != "inverse" or "g_inverse" not in s or "a_inverse" not in s:
            return False
        new = {}
        for (side, factor, ranges), shift in zip(sides, refresh.factored_shifts(g, a, damping, pi_correction)):
            parts = []
            for lo, hi in ranges:
                block = factor[lo:hi, lo:hi]
                eye = torch.eye(hi - lo, dtype=block.dtype, device=block.device)
                parts.append(refresh.newton_schulz_inverse(block + shift * eye, s[f"{side}_inverse"][lo:hi, lo:hi]))
            if any(x is None for x in parts):
                return False
            new[f"{side}_inverse"] = torch.block_diag(*cast(list[Tensor], parts))
        s.update(new)
        return True

    # ---- products -----------------------------------------------------------------------------

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        """``(A ⊗ G + damping·I)⁻¹`` (or its π-corrected or inverse form) on a packed matrix."""
        s = self.state
        x = packed.to(self.inverse_dtype)
        if self.is_split:
            return split.precondition_tiles(x, s, self.g_ranges(), self.a_ranges(), damping, pi_correction,
                                            self._deflation_plan()).to(packed.dtype)
        if "g_inverse" in s:
            out = ops.kfac_precondition_inverse(x, s["g_inverse"], s["a_inverse"])
        elif self.eigenvalue_correction:  # EKFAC: exact damping, no π
            out = ops.kfac_precondition_ekfac(x, s["g_eigenvectors"], s["a_eigenvectors"], s[CORRECTED], damping)
        else:
            out = ops.kfac_precondition_eigen(x, s["g_eigenvalues"], s["g_eigenvectors"],
                                              s["a_eigenvalues"], s["a_eigenvectors"], damping,
                                              pi_correction)
        return out.to(packed.dtype)

    def _deflation_plan(self) -> list[split.Deflated | None] | None:
        """:func:`natgrad.curvature.split.deflation_plan` of A's eigenbasis, cached per
        decomposition (None with inverses).
        """
        vectors = self.state.get("a_eigenvectors")
        if vectors is None:
            return None
        cached = getattr(self, "_deflation", None)
        if cached is None or cached[0] is not vectors or cached[1] != vectors._version:
            plan = split.deflation_plan(self.state["a_eigenvalues"], vectors, self.a_ranges())
            cached = self._deflation = (vectors, vectors._version, plan)
        return cached[2]

    @override
    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping, pi_correction))

    def product(self, packed: Tensor) -> Tensor:
        """``G W̃ A`` on a packed matrix (differentiable); ``Ḡ W̃ Ā`` when a side is
        block-diagonal (the curvature the block preconditions with).
        """
        g = split.block_diagonal(self.state["G"], self.g_ranges())
        return g @ packed.to(self.factor_dtype) @ split.block_diagonal(self.state["A"], self.a_ranges())

    @override
    def mv(self, tensors):
        packed = self.pack(tensors)
        return self.unpack(self.product(packed).to(packed.dtype))

    @override
    def quad_form(self, tensors):
        packed = self.pack(tensors).to(self.factor_dtype)
        return (self.product(packed) * packed).sum()

    @override
    def diagonal(self):
        outer = torch.outer(torch.diagonal(self.state["G"]), self._a_diagonal())
        return self.unpack(outer)

    def _a_diagonal(self) -> Tensor:
        return torch.diagonal(self.state["A"])

    def _dtype(self) -> torch.dtype:
        return self.factor_dtype

    def factor_layout(self) -> list[int] | None:
        """The layer's layout codes for the factor list op (:func:`natgrad.ops.factor_layout`),
        or None when its statistics are not in a layout the op knows (updated one at a time).
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; with the eigenvalue correction, a checkpoint saved
        without ``S`` (plain K-FAC) resumes from ``S = λ_G λ_Aᵀ`` (:meth:`init_corrected`).
        """
        super().load_state_dict(state)
        if self.eigenvalue_correction and "g_eigenvectors" in self.state and CORRECTED not in self.state:
            self.init_corrected()

    # ---- the family's batched step ------------------------------------------------------------
    # Blocks of this family pack ``[W.reshape(d_out, -1), b]`` and precondition with the state
    # keys above, which is what the list ops take (a subclass that changes either names another
    # family, as EmbeddingBlock does).

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        """KroneckerBlock: the list ops serve every block of the family together. They read the
        weight's gradient as ``[d_out, d_in]`` and precondition with ``A`` and ``G`` as stored
        here, so a subclass that changes either (a transposed weight, its own
        :meth:`precondition`) must override this to return :class:`CurvatureBlock` (served one
        block at a time), as EmbeddingBlock does.
        """
        return KroneckerBlock

    @classmethod
    def update_many(cls, blocks, stats, decay):
        """Every block with factors already and a :meth:`factor_layout`, in one call of
        :func:`natgrad.ops.kfac_factors_ema_` (each layer's bound checked in C++: a bad layer is
        left untouched, and factors an update left non-finite are zeroed; both flagged).
        """
        chosen = [(b, s) for b, s in zip(blocks, stats)
                  if b.has_factors and b.factor_layout() is not None and not b.eigenvalue_correction]
        if not chosen:
            return []
        listed, data = [b for b, _ in chosen], [s for _, s in chosen]
        flags = ops.kfac_factors_ema_([b.state["A"] for b in listed], [b.state["G"] for b in listed],
                                      [d.inputs for d in data], [d.grads for d in data],
                                      [v for b in listed for v in b.factor_layout()],
                                      [d.grad_scale for d in data], [decay] * len(listed))
        return [(listed, flags)]

    @classmethod
    def directions_many(cls, blocks, request):
        """One list op per inverse method (:func:`natgrad.ops.kfac_directions_eigen` /
        ``_inverse``): the directions (weight and bias apart, no packed copies), ``⟨u, g⟩``, the
        finite flags and, when asked, the buffers' ``⟨b, g⟩``; a block without a decomposition
        one at a time.
        """
        out: list[BlockDirections] = []
        listed = [b for b in blocks if b.has_inverse and not b.is_split and not b.eigenvalue_correction]
        for method, key in (("eigen", "g_eigenvectors"), ("inverse", "g_inverse")):
            group = [b for b in listed if key in b.state]
            if group:
                out += cls._listed_directions(group, method, request)
        # split blocks (tile by tile), EKFAC blocks (their own eigenvalue matrix) and those without a
        # decomposition: one at a time
        return out + super().directions_many([b for b in blocks if b not in listed], request)

    @classmethod
    def _listed_directions(cls, blocks, method: str, request: DirectionRequest) -> list[BlockDirections]:
        weights, biases, w_bufs, b_bufs = [], [], [], []
        buffer = request.buffer
        for b in blocks:
            w = b.weight.grad if b.weight.grad is not None else torch.zeros_like(b.weight)
            weights.append(w.reshape(w.shape[0], -1))
            if b.bias is not None:
                biases.append(b.bias.grad if b.bias.grad is not None else torch.zeros_like(b.bias))
            else:
                biases.append(None)
            if buffer is not None:
                buf = buffer(b.weight)
                w_bufs.append(None if buf is None else buf.reshape(buf.shape[0], -1))
                b_bufs.append(None if b.bias is None else buffer(b.bias))
        s = [b.state for b in blocks]
        extra = dict(weight_buffers=w_bufs, bias_buffers=b_bufs) if buffer is not None else {}
        scale = request.grad_scale
        if method == "eigen":
            out = ops.kfac_directions_eigen(
                weights, biases, [x["g_eigenvalues"] for x in s], [x["g_eigenvectors"] for x in s],
                [x["a_eigenvalues"] for x in s], [x["a_eigenvectors"] for x in s],
                [request.damping(b) for b in blocks], request.pi_correction, scale, **extra)
        else:
            out = ops.kfac_directions_inverse(weights, biases, [x["g_inverse"] for x in s],
                                              [x["a_inverse"] for x in s], scale, **extra)
        width = int(out.stats.shape[1]) if out.stats.dim() == 2 else 4
        first = request.offset()
        request.stats.append(out.stats)
        bias_dirs = iter(out.bias)
        entries = []
        for i, (b, w, g_w, g_b) in enumerate(zip(blocks, out.weight, weights, biases)):
            grads = [_scaled(g_w.view_as(b.weight), scale)]
            dirs = [w.view_as(b.weight)]
            if b.bias is not None:
                grads.append(_scaled(g_b, scale))
                dirs.append(next(bias_dirs))
            entries.append(BlockDirections(b, grads, dirs, first + i * width, 2))
        return entries


def per_sample_layout(inputs: Sequence[Tensor], grads: Sequence[Tensor], width: int | None,
                      grad_width: int) -> tuple[Tensor, Tensor]:
    """The forward calls' inputs ``[N_c, ..., width]`` (``width`` None: index tensors
    ``[N_c, ...]``; an unbatched input is one sample) and output gradients ``[P·N_c, ...,
    grad_width]`` as ``[N, R, width]`` and ``[P·N, R, grad_width]`` (pass-major): the calls'
    samples stacked (each counts as a sample, as :meth:`KroneckerBlock.count_samples` does),
    positions padded to the longest call with zero gradients, which add nothing to a per-sample
    gradient.
    """
    lowest = 0 if width is None else 1
    xs, gs = [], []
    for x, g in zip(inputs, grads):
        n = x.shape[0] if x.dim() > lowest else 1
        xs.append(x.reshape(n, -1) if width is None else x.reshape(n, -1, width))
        gs.append(g.reshape(-1, n, xs[-1].shape[1], grad_width))
    positions = max(x.shape[1] for x in xs)
    if any(x.shape[1] != positions for x in xs):
        pad = [positions - x.shape[1] for x in xs]
        xs = [torch.nn.functional.pad(x, (0, 0, 0, k) if width is not None else (0, k)) for x, k in zip(xs, pad)]
        gs = [torch.nn.functional.pad(g, (0, 0, 0, k)) for g, k in zip(gs, pad)]
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    g = gs[0] if len(gs) == 1 else torch.cat(gs, 1)
    return x, g.reshape(-1, positions, grad_width)


def enable_eigenvalue_correction(blocks: Sequence[CurvatureBlock]) -> None:
    """Turns EKFAC on for every Kronecker block whose kind supports it (Linear, Conv1d, Conv2d,
    Embedding). Diagonal blocks (norms, per-sample and free parameters) are exact diagonal Fisher
    blocks already and plain ones have no curvature: both are left as they are. Any other block
    (attention q/k/v, a registered kind without EKFAC, a block whose factors are block-diagonal
    under ``max_factor_dim``) keeps K-FAC's Kronecker eigenvalues, with one warning naming them.
    """
    unsupported = []
    for block in blocks:
        if isinstance(block, KroneckerBlock) and block.supports_eigenvalue_correction and block.is_split:
            unsupported.append(f"{block.name!r} ({block.kind}, block-diagonal factors: max_factor_dim)")
        elif isinstance(block, KroneckerBlock) and block.supports_eigenvalue_correction:
            block.eigenvalue_correction = True
        elif not isinstance(block, (DiagonalBlock, PlainBlock)):
            unsupported.append(f"{block.name!r} ({block.kind})")
    if unsupported:
        warnings.warn("natgrad.KFAC(eigenvalue_correction=True): no EKFAC for " + ", ".join(unsupported)
                      + "; these layers keep K-FAC's Kronecker eigenvalues", stacklevel=3)


def _scaled(g: Tensor, scale: float) -> Tensor:
    return g * scale if scale != 1.0 else g
