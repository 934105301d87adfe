"""Diagonal curvature blocks: the per-element Fisher of parameters no Kronecker block covers.

``F ≈ diag(f)`` with ``f`` the mean over samples of squared per-sample gradients (empirical or
Monte-Carlo, as the optimizer's capture decides), kept as an EMA and applied damped:
``u = g / (f + γ)``. Its scale is the Kronecker blocks' scale (see :mod:`natgrad.curvature.kron`):
an update adds ``s²/N · Σ_units u²`` where ``s`` turns captured output gradients into
per-sample ones and ``N`` counts samples, so that every parameter of a model gets a natural-
gradient direction of the same size, and one learning rate and damping fit all of them.

Units follow the optimizer's ``linear_approx``: "expand" squares each weight-sharing position's
contribution (tokens, pixels) separately, as K-FAC-expand treats them as extra rows; "reduce"
sums a sample's positions first, which is the exact per-sample diagonal Fisher.

Blocks here:

* :class:`NormBlock`: LayerNorm, RMSNorm, BatchNorm1d/2d/3d and GroupNorm affine parameters,
  from the captured input (normalised again, without the affine) and output gradient:
  ``∂ℓ/∂γ = x̂ ⊙ g``, ``∂ℓ/∂β = g``.
* :class:`PerSampleBlock`: any other module with one tensor input (grouped or non-zero-padded
  convolutions, ...): per-sample gradients of its own parameters with ``torch.func``.
* :class:`FreeParameterBlock`: a parameter used functionally by its owner's forward (positional
  embeddings, class tokens, layer scales), fed by :mod:`natgrad.curvature.tracing`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from natgrad import ops
from natgrad.curvature.block import CurvatureBlock, curvature_dtype, max_abs

NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


class Squares(NamedTuple):
    """One update of a diagonal block: ``Σ_units u²`` (flat, in the parameters' order), the
    factor ``s²/N`` it is scaled by, the peak |u| and the number of units (overflow check).
    """

    squares: Tensor
    scale: float
    peak: Tensor
    units: int


class DiagonalBlock(CurvatureBlock):
    """Base class: ``F = diag(f)`` over the flattened parameters (see the module docstring).

    Args:
        name (str): checkpoint key (the module's or the parameter's qualified name).
        params (list of nn.Parameter): the parameters covered, in vector order.
        approx (str): "expand" or "reduce" (default: "expand").
        factor_dtype (torch.dtype or None): dtype of ``f`` (default: :func:`natgrad.curvature.block.curvature_dtype`).
    """

    kind = "diagonal"

    def __init__(self, name: str, params: Sequence[nn.Parameter], approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None) -> None:
        super().__init__(name, params)
        self.weight = self.params[0]  # the optimizer reads a block's damping from its first parameter
        self.approx = approx
        self.factor_dtype = curvature_dtype(factor_dtype, self.weight)

    @property
    @override
    def description(self) -> str:
        return f"diagonal Fisher ({self.approx})"

    @property
    @override
    def has_factors(self) -> bool:
        return "F" in self.state

    @property
    @override
    def has_inverse(self) -> bool:
        return self.has_factors

    @override
    def factors(self) -> dict[str, Tensor]:
        return {"F": self.state["F"]} if "F" in self.state else {}

    @override
    def inverse_cost(self) -> float:
        return float(self.num_params)

    @override
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"F": (self.num_params,)}

    @override
    def ensure_factors(self) -> None:
        if "F" not in self.state:
            self.state["F"] = torch.zeros(self.num_params, dtype=self.factor_dtype, device=self.weight.device)

    # ---- statistics ---------------------------------------------------------------------------

    def count_samples(self, inputs: Sequence) -> int:
        """Samples in the forward calls' inputs (dim 0)."""
        return sum(x.shape[0] if x.dim() > 1 else 1 for x in inputs)

    def count_rows(self, inputs: Sequence) -> int:
        """Samples × weight-sharing positions of the forward calls."""
        return self.count_samples(inputs)

    def units(self, inputs: Sequence, grads: Sequence[Tensor]) -> Tensor:
        """Per-unit gradient contributions ``[units, num_params]`` (see the module docstring)."""
        raise NotImplementedError

    def prepare(self, inputs: Sequence, grads: Sequence[Tensor], grad_scale: float) -> Squares:
        """``Σ_units u²`` of the forward calls, and its scale ``grad_scale² / samples``."""
        u = self.units(inputs, grads).to(self.factor_dtype)
        return Squares((u * u).sum(0), grad_scale**2 / max(self.count_samples(inputs), 1), max_abs(u), u.shape[0])

    def statistics_ok(self, stats: Squares) -> Tensor:
        """A 0-d bool tensor: finite and small enough that the update cannot overflow."""
        return ops.kfac_peak_bounded(stats.peak, max(stats.scale, 1.0) * max(stats.units, 1), self.factor_dtype)

    @override
    def update(self, inputs, grads, *, decay, grad_scale):
        self.apply_update(self.prepare(inputs, grads, grad_scale), decay)

    def apply_update(self, stats: Squares, decay: float) -> None:
        """``f ← ρ f + (1 − ρ) · scale · Σ u²`` (the first update replaces)."""
        rho = decay if self.has_factors else 0.0
        self.ensure_factors()
        self.state["F"].mul_(rho).add_(stats.squares, alpha=(1.0 - rho) * stats.scale)

    # ---- decompositions and products ----------------------------------------------------------

    def update_inverse(self, method: str, damping: float, pi_correction: bool = False,
                       warm: bool = False) -> int:
        """Nothing to decompose: the damped diagonal is inverted when applied."""
        return 0

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        """``packed / (f + damping)`` (π-correction has no meaning for a diagonal)."""
        f = self.state["F"].clamp_min(0)
        return (packed.to(f.dtype) / (f + damping)).to(packed.dtype)

    @override
    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping))

    @override
    def mv(self, tensors):
        packed = self.pack(tensors)
        return self.unpack((self.state["F"] * packed.to(self.factor_dtype)).to(packed.dtype))

    @override
    def quad_form(self, tensors):
        packed = self.pack(tensors).to(self.factor_dtype)
        return (self.state["F"] * packed * packed).sum()

    @override
    def diagonal(self):
        return self.unpack(self.state["F"])

    @override
    def to_dense(self):
        return torch.diag(self.state["F"])

    def _dtype(self) -> torch.dtype:
        return self.factor_dtype


def _units(contrib: Tensor, samples: int, approx: str) -> Tensor:
    """``[samples, positions, k]`` contributions -> units ``[*, k]``."""
    contrib = contrib.reshape(samples, -1, contrib.shape[-1])
    return contrib.reshape(-1, contrib.shape[-1]) if approx == "expand" else contrib.sum(1)


class NormBlock(DiagonalBlock):
    """Affine parameters of LayerNorm / RMSNorm (normalised trailing dims) and BatchNorm /
    GroupNorm (channel dim 1), from the captured input and output gradient.
    """

    kind = "norm"

    def __init__(self, name: str, module: nn.Module, **kwargs) -> None:
        params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        super().__init__(name, params, **kwargs)
        self.module = module

    def normalized(self, x: Tensor) -> Tensor:
        """The module's output without its affine map."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        bn = cast(nn.modules.batchnorm._BatchNorm, m)  # the remaining NORMS
        return F.batch_norm(x, None, None, None, None, True, 0.0, bn.eps)  # captured in training only

    def _trailing(self) -> bool:
        return isinstance(self.module, (nn.LayerNorm, nn.RMSNorm))

    def _batched(self, x: Tensor) -> bool:
        trailing = cast(nn.LayerNorm | nn.RMSNorm, self.module)  # read only when _trailing()
        return x.dim() > len(trailing.normalized_shape) if self._trailing() else True

    def _parts(self, xhat: Tensor, g: Tensor) -> list[Tensor]:
        """Per-position gradients of weight and bias (the ones this module has)."""
        parts = []
        if getattr(self.module, "weight", None) is not None:
            parts.append(xhat * g)
        if getattr(self.module, "bias", None) is not None:
            parts.append(g)
        return parts

    @override
    def units(self, inputs, grads):
        out = []
        trailing = self._trailing()
        for x, g in zip(inputs, grads):
            x, g = x.to(self.factor_dtype), g.to(self.factor_dtype)
            if not self._batched(x):
                x, g = x.unsqueeze(0), g.unsqueeze(0)
            xhat = self.normalized(x)
            if trailing:  # [N, ..., *shape] -> [N, positions, k]
                k = self.weight.numel()
                contrib = torch.cat([p.reshape(x.shape[0], -1, k) for p in self._parts(xhat, g)], -1)
            else:  # [N, C, *spatial] -> [N, spatial, C]
                contrib = torch.cat([p.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
                                     for p in self._parts(xhat, g)], -1)
            out.append(_units(contrib, x.shape[0], self.approx))
        return torch.cat(out)

    @override
    def count_samples(self, inputs):
        return sum(x.shape[0] if self._batched(x) else 1 for x in inputs)

    @override
    def count_rows(self, inputs):
        if self._trailing():
            return sum(x.numel() // max(self.weight.numel(), 1) for x in inputs)
        return self.count_samples(inputs)


class PerSampleBlock(DiagonalBlock):
    """Any module with one tensor input and its own parameters (e.g. a grouped convolution):
    exact per-sample gradients with ``torch.func.vmap`` over ``vjp`` of the module, so one unit
    per sample whatever ``approx`` says.
    """

    kind = "per_sample"

    def __init__(self, name: str, module: nn.Module, params: Sequence[nn.Parameter], **kwargs) -> None:
        super().__init__(name, params, **kwargs)
        self.module = module
        self._names = [n for n, p in module.named_parameters(recurse=False) if any(p is q for q in params)]

    @override
    def units(self, inputs, grads):
        from torch.func import functional_call, vjp, vmap

        fixed = {n: p.detach() for n, p in self.module.named_parameters(recurse=False)}

        def one(x: Tensor, g: Tensor) -> Tensor:
            def f(*values):
                return functional_call(self.module, {**fixed, **dict(zip(self._names, values))}, (x[None],))
            # torch.func.vjp is annotated with a 2-or-3 tuple union, not overloaded on has_aux
            _, pull = vjp(f, *[fixed[n] for n in self._names])  # type: ignore[misc]
            return torch.cat([t.reshape(-1) for t in pull(g[None])])

        return torch.cat([vmap(one)(x, g) for x, g in zip(inputs, grads)])


class FreeParameterBlock(DiagonalBlock):
    """One parameter its owner uses functionally (``x + self.pos``, ``self.cls.expand(n, -1,
    -1)``, ``x * self.scale``). Each record's input is a :class:`~natgrad.curvature.tracing.Use`
    (where and how the parameter entered the batched computation); see
    :mod:`natgrad.curvature.tracing`.
    """

    kind = "free"

    def __init__(self, name: str, param: nn.Parameter, **kwargs) -> None:
        super().__init__(name, [param], **kwargs)

    @override
    def count_samples(self, inputs):
        return sum(use.samples for use in inputs)

    @override
    def count_rows(self, inputs):
        return sum(use.rows for use in inputs)

    @override
    def units(self, inputs, grads):
        raise NotImplementedError  # prepare maps the squares of each use onto the parameter

    @override
    def prepare(self, inputs, grads, grad_scale):
        squares = torch.zeros(self.num_params, dtype=self.factor_dtype, device=self.weight.device)
        peak = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        units = 0
        for use, g in zip(inputs, grads):
            u = _units(use.contributions(g.to(self.factor_dtype)), use.samples, self.approx)
            squares.index_add_(0, use.index.reshape(-1).to(squares.device), (u * u).sum(0))
            peak, units = torch.maximum(peak, max_abs(u)), units + u.shape[0]
        return Squares(squares, grad_scale**2 / max(self.count_samples(inputs), 1), peak, units)
