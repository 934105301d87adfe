"""nn.Linear: a Kronecker block over ``[W, b]``, implicit rows and the exact diagonal Fisher.

Inputs may have any leading shape ``[N, ..., d_in]``: the middle dims are weight-sharing
positions (tokens). ``approx`` "expand" treats them as extra rows of the factors, "reduce"
averages activations and sums gradients over them per sample first.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from natgrad import ops
from natgrad.curvature.kron import CORRECTED, KroneckerBlock, PerSample, Statistics, per_sample_layout
from natgrad.curvature.layers.base import LayerKind, output_blocks
from natgrad.ops.factors import factor_layout

__all__ = ["LinearBlock", "LinearKind"]


def _rows(t: Tensor, width: int) -> Tensor:
    return t.reshape(-1, width)


class LinearBlock(KroneckerBlock):
    """nn.Linear with inputs of any leading shape ``[N, ..., d_in]``; ``approx`` is "expand"
    (positions as extra rows) or "reduce" (averaged per sample).
    """

    kind = "linear"
    supports_eigenvalue_correction = True

    def __init__(self, name: str, module: nn.Module, approx: str = "expand", **kwargs) -> None:
        super().__init__(name, module, **kwargs)
        self.approx = approx

    @property
    def description(self) -> str:
        """How ``describe()`` names this block, e.g. "K-FAC linear (expand)"."""
        return f"{self.method} linear ({self.approx}){self.split_note()}"

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)``, read from the weight ``[out, in]``."""
        return self.weight.shape[1], self.weight.shape[0]

    @override
    def a_dim(self) -> int:
        return self.features()[0] + (self.bias is not None)

    @override
    def g_dim(self) -> int:
        return self.features()[1]

    @override
    def prepare(self, inputs, grads, grad_scale):
        d_in, d_out = self.features()
        samples = self.count_samples(inputs)
        per_sample = None
        if self.eigenvalue_correction:  # EKFAC: the exact per-sample gradients (both approximations)
            per_sample = PerSample(*per_sample_layout(inputs, grads, d_in, d_out), grad_scale)
        if self.approx == "reduce":  # per sample: mean activation, summed gradient
            inputs = [x.reshape(x.shape[0], -1, d_in).mean(1) if x.dim() > 2 else x for x in inputs]
            grads = [g.reshape(g.shape[0], -1, d_out).sum(1) if g.dim() > 2 else g for g in grads]
        x = inputs[0] if len(inputs) == 1 else torch.cat([_rows(t, d_in) for t in inputs])
        g = grads[0] if len(grads) == 1 else torch.cat([_rows(t, d_out) for t in grads])
        x_rows, g_rows = x.numel() // max(d_in, 1), g.numel() // d_out
        return Statistics(x, g, ops.kfac_expand_grad_scale(grad_scale, samples, x_rows, g_rows), x_rows, g_rows,
                          per_sample)

    def _update_a(self, stats, rho):
        ops.linear_act_factor_ema_(self.state["A"], stats.inputs, self.bias is not None, rho)

    def _corrected_ema(self, data, decay):
        s = self.state
        ops.linear_ekfac_diagonal_ema_(s[CORRECTED], data.inputs, data.grads, s["g_eigenvectors"],
                                       s["a_eigenvectors"], self.bias is not None, data.grad_scale, decay)

    @override
    def factor_layout(self):
        return factor_layout(self.bias is not None) if type(self) is LinearBlock else None

    def count_rows(self, inputs):
        """Rows of the forward calls: samples × positions (tokens)."""
        return sum(ops.kfac_linear_rows(x.shape, self.features()[0]) for x in inputs)


class LinearKind(LayerKind):
    """nn.Linear (and its subclasses, e.g. nn.MultiheadAttention's ``out_proj``, whose forward
    is never called: its block is fed by the attention's capture, see
    :mod:`natgrad.curvature.layers.attention`).
    """

    name = "linear"
    has_diagonal_fisher = True

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)``, read from the weight ``[out, in]``."""
        weight = cast(Tensor, module.weight)
        return weight.shape[1], weight.shape[0]

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return LinearBlock(name, module, approx=approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def implicit_rows(self, module):
        return True

    @override
    def rows_input(self, module, inputs, samples):
        if not inputs or any(x.shape[0] != samples or x.dim() < 2 for x in inputs):
            return None
        if len(inputs) == 1:
            return inputs[0]
        return torch.cat([x.reshape(samples, -1, self.features(module)[0]) for x in inputs], 1)

    @override
    def merge_calls(self, module, grads):
        if len(grads) == 1:
            return grads[0]
        return torch.cat([g.reshape(g.shape[0], -1, self.features(module)[1]) for g in grads], 1)

    @override
    def gram(self, module, x, g, bias):
        return ops.linear_gram(x, g, bias)

    @override
    def rows_mv(self, module, x, g, weight, bias):
        return ops.linear_rows_mv(x, g, weight, bias)

    @override
    def rows_tmv(self, module, x, g, w, index, chunk):
        width = g.shape[-1]
        per_unit = max(module.weight.numel() // max(width, 1), 1)
        for a, b in output_blocks(width, per_unit, chunk):
            for i, part in zip(index, ops.linear_rows_tmv(x, g[..., a:b], w)):
                yield i, (slice(a, b),), part

    @override
    def diagonal_fisher(self, module, x, g):
        d = ops.linear_diag_fisher(x, g, module.bias is not None, 1.0)
        weight = d[:, :self.features(module)[0]]
        return [weight, d[:, -1]] if module.bias is not None else [weight]

