"""Kronecker-factored curvature blocks: one per nn.Linear, nn.Conv2d or nn.Embedding layer.

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
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad.curvature import refresh
from natgrad.curvature.block import BlockDirections, CurvatureBlock, DirectionRequest, max_abs
from natgrad.ops.factors import factor_layout


class Statistics(NamedTuple):
    """One update's data in the ops' layout, and the row counts that bound its Gram sums."""

    inputs: Tensor
    grads: Tensor
    grad_scale: float  # the ops' grad_scale: per-sample scale × sqrt(positions × passes)
    input_rows: int
    grad_rows: int


class KroneckerBlock(CurvatureBlock):
    """Base class: ``F ≈ A ⊗ G`` over one layer's packed weight (+bias).

    Args:
        name (str): the module's qualified name in the model (checkpoint key).
        module (nn.Module): the layer.
        factor_dtype (torch.dtype or None): dtype of A and G (default: the weight's dtype).
        inverse_dtype (torch.dtype or None): dtype of decompositions (default: factor dtype).
    """

    kind = "kron"

    def __init__(self, name: str, module: nn.Module, factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None) -> None:
        self.module = module
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = getattr(module, "bias", None)
        super().__init__(name, [self.weight] + ([self.bias] if self.bias is not None else []))
        self.factor_dtype = factor_dtype or self.weight.dtype
        self.inverse_dtype = inverse_dtype or self.factor_dtype

    @property
    def description(self) -> str:
        return f"K-FAC {self.kind}"

    @property
    def has_factors(self) -> bool:
        return "A" in self.state

    @property
    def has_inverse(self) -> bool:
        return "g_eigenvectors" in self.state or "g_inverse" in self.state

    # ---- layout -------------------------------------------------------------------------------

    def a_dim(self) -> int:
        """Size of A (inputs, +1 for the bias)."""
        return self.weight[0].numel() + (self.bias is not None)

    def g_dim(self) -> int:
        """Size of G (outputs)."""
        return self.weight.shape[0]

    def pack(self, tensors: Sequence[Tensor | None]) -> Tensor:
        w = tensors[0] if tensors[0] is not None else torch.zeros_like(self.weight)
        w = w.reshape(self.weight.shape[0], -1)
        if self.bias is None:
            return w
        b = tensors[1] if tensors[1] is not None else torch.zeros_like(self.bias)
        return torch.cat([w, b.reshape(-1, 1)], 1)

    def unpack(self, packed: Tensor) -> list[Tensor]:
        if self.bias is None:
            return [packed.reshape(self.weight.shape)]
        return [packed[:, :-1].reshape(self.weight.shape), packed[:, -1].reshape(self.bias.shape)]

    # ---- statistics ---------------------------------------------------------------------------

    def factors(self) -> dict[str, Tensor]:
        return {k: self.state[k] for k in ("A", "G") if k in self.state}

    def inverse_cost(self) -> float:
        return float(sum(f.shape[0] ** (3 if f.dim() == 2 else 1) for f in self.factors().values()))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        a, g = self.a_dim(), self.g_dim()
        return {"A": (a, a), "G": (g, g), "a_eigenvalues": (a,), "a_eigenvectors": (a, a),
                "g_eigenvalues": (g,), "g_eigenvectors": (g, g), "a_inverse": (a, a), "g_inverse": (g, g)}

    def ensure_factors(self) -> None:
        device = self.weight.device
        for key, shape in (("A", self.expected_shapes()["A"]), ("G", (self.g_dim(), self.g_dim()))):
            if key not in self.state:
                self.state[key] = torch.zeros(shape, dtype=self.factor_dtype, device=device)

    def count_samples(self, inputs: Sequence[Tensor]) -> int:
        """Samples in the forward calls' inputs (dim 0 indexes samples; an unbatched input is
        one sample)."""
        return sum(x.shape[0] if x.dim() > 1 else 1 for x in inputs)

    # -- issue 16: loss_reduction="token_mean" counts loss terms (samples × positions) --------
    def count_rows(self, inputs: Sequence[Tensor]) -> int:
        """Rows of the forward calls (samples × weight-sharing positions); the base: one per
        sample."""
        return self.count_samples(inputs)
    # -- end issue 16 ----------------------------------------------------------------------------

    def prepare(self, inputs: Sequence[Tensor], grads: Sequence[Tensor], grad_scale: float) -> Statistics:
        """Concatenates the forward calls' data into the ops' layout (no statistics yet)."""
        raise NotImplementedError

    def statistics_ok(self, stats: Statistics) -> Tensor:
        """A 0-d bool tensor (no host sync): every value is finite and small enough that no Gram
        sum of the update can overflow the factor dtype. The factors are then finite after the
        update, so a bad batch skips the layer instead of poisoning its factors."""
        limit = torch.finfo(self.factor_dtype).max / 4
        ok = self._bounded(stats.grads, max(stats.grad_rows, 1) * max(stats.grad_scale**2, 1.0), limit)
        if stats.inputs.is_floating_point():
            ok = ok & self._bounded(stats.inputs, max(stats.input_rows, 1), limit)
        return ok

    @staticmethod
    def _bounded(t: Tensor, count: float, limit: float) -> Tensor:
        peak = max_abs(t)  # NaN propagates: NaN < limit is False
        return peak * peak * count < limit

    def update(self, inputs, grads, *, decay, grad_scale):
        self.apply_update(self.prepare(inputs, grads, grad_scale), decay)

    def apply_update(self, stats: Statistics, decay: float) -> None:
        """The EMA update from :meth:`prepare` output (the first update replaces)."""
        rho = decay if self.has_factors else 0.0
        self.ensure_factors()
        self._update_a(stats, rho)
        ops.linear_grad_factor_ema_(self.state["G"], stats.grads, stats.grad_scale, rho)

    def _update_a(self, stats: Statistics, rho: float) -> None:
        raise NotImplementedError

    # ---- decompositions -----------------------------------------------------------------------

    def decomposition_template(self, method: str) -> dict[str, Tensor]:
        opts = dict(dtype=self.inverse_dtype, device=self.weight.device)
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
        replaces it when there is one (the inverse refresh may decline: then exact)."""
        a = self.state["A"].to(self.inverse_dtype)
        g = self.state["G"].to(self.inverse_dtype)
        if warm and self._warm_refresh(method, g, a, damping, pi_correction):
            return 0
        self.drop_decomposition()
        if method == "inverse":
            inv = ops.kfac_damped_inverses(g, a, damping, pi_correction)
            self.state["g_inverse"], self.state["a_inverse"] = inv.g_inverse, inv.a_inverse
            return int(inv.rung)
        ea, eg = ops.damped_eigh(a), ops.damped_eigh(g)
        self.state["a_eigenvalues"], self.state["a_eigenvectors"] = ea.eigenvalues, ea.eigenvectors
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        return max(int(ea.rung), int(eg.rung))

    def _warm_refresh(self, method: str, g: Tensor, a: Tensor, damping: float, pi_correction: bool) -> bool:
        s = self.state
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
        s["g_inverse"], s["a_inverse"] = new
        return True

    # ---- products -----------------------------------------------------------------------------

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        """``(A ⊗ G + damping·I)⁻¹`` (or its π-corrected or inverse form) on a packed matrix."""
        s = self.state
        x = packed.to(self.inverse_dtype)
        if "g_inverse" in s:
            out = ops.kfac_precondition_inverse(x, s["g_inverse"], s["a_inverse"])
        else:
            out = ops.kfac_precondition_eigen(x, s["g_eigenvalues"], s["g_eigenvectors"],
                                              s["a_eigenvalues"], s["a_eigenvectors"], damping,
                                              pi_correction)
        return out.to(packed.dtype)

    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping, pi_correction))

    def product(self, packed: Tensor) -> Tensor:
        """``G W̃ A`` on a packed matrix (differentiable)."""
        return self.state["G"] @ packed.to(self.factor_dtype) @ self.state["A"]

    def mv(self, tensors):
        packed = self.pack(tensors)
        return self.unpack(self.product(packed).to(packed.dtype))

    def quad_form(self, tensors):
        packed = self.pack(tensors).to(self.factor_dtype)
        return (self.product(packed) * packed).sum()

    def diagonal(self):
        outer = torch.outer(torch.diagonal(self.state["G"]), self._a_diagonal())
        return self.unpack(outer)

    def _a_diagonal(self) -> Tensor:
        return torch.diagonal(self.state["A"])

    def _dtype(self) -> torch.dtype:
        return self.factor_dtype

    # ---- the family's batched step ------------------------------------------------------------
    # Blocks of this family pack ``[W.reshape(d_out, -1), b]`` and precondition with the state
    # keys above, which is what the list ops take (a subclass that changes either names another
    # family, as EmbeddingBlock does).

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        return KroneckerBlock

    @classmethod
    def update_many(cls, blocks, stats, decay):
        """Every block with factors already and a :meth:`factor_layout`, in one call of
        :func:`natgrad.ops.kfac_factors_ema_` (each layer's bound checked in C++: a bad layer is
        left untouched, and factors an update left non-finite are zeroed; both flagged)."""
        chosen = [(b, s) for b, s in zip(blocks, stats) if b.has_factors and b.factor_layout() is not None]
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
        one at a time."""
        out: list[BlockDirections] = []
        for method, key in (("eigen", "g_eigenvectors"), ("inverse", "g_inverse")):
            group = [b for b in blocks if b.has_inverse and key in b.state]
            if group:
                out += cls._listed_directions(group, method, request)
        return out + super().directions_many([b for b in blocks if not b.has_inverse], request)

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


def _scaled(g: Tensor, scale: float) -> Tensor:
    return g * scale if scale != 1.0 else g


def _rows(t: Tensor, width: int) -> Tensor:
    return t.reshape(-1, width)


class LinearBlock(KroneckerBlock):
    """nn.Linear with inputs of any leading shape ``[N, ..., d_in]``; ``approx`` is "expand"
    (positions as extra rows) or "reduce" (averaged per sample)."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Linear, approx: str = "expand", **kwargs) -> None:
        super().__init__(name, module, **kwargs)
        self.approx = approx

    @property
    def description(self) -> str:
        return f"K-FAC linear ({self.approx})"

    def prepare(self, inputs, grads, grad_scale):
        d_in, d_out = self.weight.shape[1], self.weight.shape[0]
        samples = self.count_samples(inputs)
        if self.approx == "reduce":  # per sample: mean activation, summed gradient
            inputs = [x.reshape(x.shape[0], -1, d_in).mean(1) if x.dim() > 2 else x for x in inputs]
            grads = [g.reshape(g.shape[0], -1, d_out).sum(1) if g.dim() > 2 else g for g in grads]
        x = inputs[0] if len(inputs) == 1 else torch.cat([_rows(t, d_in) for t in inputs])
        g = grads[0] if len(grads) == 1 else torch.cat([_rows(t, d_out) for t in grads])
        x_rows, g_rows = x.numel() // max(d_in, 1), g.numel() // d_out
        positions = x_rows // max(samples, 1)
        passes = g_rows // max(x_rows, 1)
        return Statistics(x, g, grad_scale * math.sqrt(max(positions, 1) * max(passes, 1)), x_rows, g_rows)

    def _update_a(self, stats, rho):
        ops.linear_act_factor_ema_(self.state["A"], stats.inputs, self.bias is not None, rho)

    def factor_layout(self):
        return factor_layout(self.bias is not None) if type(self) is LinearBlock else None

    def count_rows(self, inputs):  # issue 16
        return sum(x.numel() // max(self.weight.shape[1], 1) for x in inputs)


class Conv2dBlock(KroneckerBlock):
    """nn.Conv2d with groups=1 and numeric zero padding, in the KFC ("expand") form."""

    kind = "conv2d"

    def prepare(self, inputs, grads, grad_scale):
        x = inputs[0] if len(inputs) == 1 else torch.cat(list(inputs))
        g = grads[0] if len(grads) == 1 else torch.cat(list(grads))
        positions = g.shape[2] * g.shape[3]
        passes = max(g.shape[0] // max(x.shape[0], 1), 1)
        rows = x.shape[0] * positions
        return Statistics(x, g, grad_scale * math.sqrt(positions * passes), rows, rows * passes)

    def count_rows(self, inputs):  # issue 16: samples × output pixels
        m = self.module

        def out(size: int, i: int) -> int:
            return (size + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
        return sum(x.shape[0] * out(x.shape[-2], 0) * out(x.shape[-1], 1) if x.dim() == 4 else 1 for x in inputs)

    def apply_update(self, stats, decay):
        rho = decay if self.has_factors else 0.0
        self.ensure_factors()
        m = self.module
        ops.conv2d_act_factor_ema_(self.state["A"], stats.inputs, m.kernel_size, m.stride, m.padding,
                                   m.dilation, self.bias is not None, rho)
        ops.conv2d_grad_factor_ema_(self.state["G"], stats.grads, stats.grad_scale, rho)

    def factor_layout(self):
        if type(self) is not Conv2dBlock:
            return None
        m = self.module
        return factor_layout(self.bias is not None, m.kernel_size, m.stride, m.padding, m.dilation)


class EmbeddingBlock(KroneckerBlock):
    """nn.Embedding: the activation factor of one-hot inputs is diagonal (token frequencies),
    so A is kept as a vector and never decomposed. Packed layout: ``weight.T``
    (``[dim, num_embeddings]``)."""

    kind = "embedding"

    @classmethod
    def family(cls) -> type[CurvatureBlock]:
        return CurvatureBlock  # transposed layout, diagonal A: one block at a time

    def a_dim(self) -> int:
        return self.weight.shape[0]

    def g_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def has_inverse(self) -> bool:
        return "g_eigenvectors" in self.state

    def pack(self, tensors):
        w = tensors[0] if tensors[0] is not None else torch.zeros_like(self.weight)
        return w.T

    def unpack(self, packed):
        return [packed.T]

    def expected_shapes(self):
        g = self.g_dim()
        return {"A": (self.a_dim(),), "G": (g, g), "g_eigenvalues": (g,), "g_eigenvectors": (g, g)}

    def count_samples(self, inputs):
        return sum(t.shape[0] if t.dim() > 0 else 1 for t in inputs)

    def count_rows(self, inputs):  # issue 16
        return sum(t.numel() for t in inputs)

    def prepare(self, inputs, grads, grad_scale):
        dim = self.weight.shape[1]
        idx = torch.cat([t.reshape(-1) for t in inputs])
        g = torch.cat([t.reshape(-1, dim) for t in grads])
        positions = idx.numel() // max(self.count_samples(inputs), 1)
        passes = max(g.shape[0] // max(idx.numel(), 1), 1)
        return Statistics(idx, g, grad_scale * math.sqrt(max(positions, 1) * passes), idx.numel(), g.shape[0])

    def _update_a(self, stats, rho):
        counts = torch.bincount(stats.inputs, minlength=self.weight.shape[0]).to(self.factor_dtype)
        self.state["A"].mul_(rho).add_(counts / stats.inputs.numel(), alpha=1.0 - rho)

    def decomposition_template(self, method):
        opts = dict(dtype=self.inverse_dtype, device=self.weight.device)
        g = self.g_dim()
        return {"g_eigenvalues": torch.empty(g, **opts), "g_eigenvectors": torch.empty(g, g, **opts)}

    def update_inverse(self, method, damping, pi_correction=False, warm=False):
        if warm and "g_eigenvectors" in self.state:
            self.state["g_eigenvalues"], self.state["g_eigenvectors"] = refresh.warm_eigh(
                self.state["G"].to(self.inverse_dtype), self.state["g_eigenvalues"], self.state["g_eigenvectors"])
            return 0
        self.drop_decomposition()
        eg = ops.damped_eigh(self.state["G"].to(self.inverse_dtype))
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        return int(eg.rung)

    def precondition(self, packed, damping, pi_correction=False):
        s = self.state
        out = ops.kfac_precondition_diagonal_a(
            packed.to(self.inverse_dtype), s["A"].to(self.inverse_dtype), s["g_eigenvalues"],
            s["g_eigenvectors"], damping, pi_correction)
        return out.to(packed.dtype)

    def product(self, packed):
        return (self.state["G"] @ packed.to(self.factor_dtype)) * self.state["A"][None, :]

    def _a_diagonal(self):
        return self.state["A"]
