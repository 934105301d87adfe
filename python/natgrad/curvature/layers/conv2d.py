"""nn.Conv2d (groups=1, numeric zero padding): a Kronecker block in the KFC form (Grosse &
Martens, 2016) and implicit rows, both from the conv2d ops (patches are never unfolded whole).

Rows are samples × output pixels; the activation factor is the patches' second moment
``[C_in·kh·kw (+1)]²``, the gradient factor the output gradients' over all positions.
"""
from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from natgrad import ops
from natgrad.curvature.kron import CORRECTED, KroneckerBlock, PerSample, Statistics
from natgrad.curvature.layers.base import LayerKind, output_blocks
from natgrad.ops.factors import factor_layout

__all__ = ["Conv2dBlock", "Conv2dKind", "Geometry", "conv2d_geometry", "conv_unsupported_reason"]

#: kernel_size, stride, padding, dilation as pairs: the conv2d ops' geometry
Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def conv2d_geometry(module: nn.Module) -> Geometry:
    """An nn.Conv2d's kernel_size, stride, padding and dilation as the conv2d ops take them."""
    m = cast(nn.Conv2d, module)
    return tuple(m.kernel_size), tuple(m.stride), tuple(cast(tuple, m.padding)), tuple(m.dilation)


def conv_unsupported_reason(module: nn.Module) -> str | None:
    """Why a convolution (nn.Conv1d or nn.Conv2d) has no Kronecker block, or None
    (:func:`natgrad.ops.kfac_conv_unsupported_reason`).
    """
    conv = cast(nn.Conv1d | nn.Conv2d, module)
    return ops.kfac_conv_unsupported_reason(conv.groups, conv.padding, conv.padding_mode)


class Conv2dBlock(KroneckerBlock):
    """nn.Conv2d with groups=1 and numeric zero padding, in the KFC ("expand") form."""

    kind = "conv2d"
    supports_eigenvalue_correction = True

    def geometry(self) -> Geometry:
        """The layer's kernel_size, stride, padding and dilation as the conv2d ops take them."""
        return conv2d_geometry(self.module)

    def a_unit(self):
        """One input channel's ``kh·kw`` patch entries: a block-diagonal A
        (:mod:`natgrad.curvature.split`) keeps whole channels with their spatial correlations.
        """
        return math.prod(self.geometry()[0])

    @override
    def prepare(self, inputs, grads, grad_scale):
        x = inputs[0] if len(inputs) == 1 else torch.cat(list(inputs))
        g = grads[0] if len(grads) == 1 else torch.cat(list(grads))
        positions = g.shape[2] * g.shape[3]  # output pixels
        rows, g_rows = x.shape[0] * positions, g.shape[0] * positions
        per_sample = None
        if self.eigenvalue_correction:  # EKFAC: per-sample gradients, passes kept pass-major
            passes = max(g.shape[0] // max(x.shape[0], 1), 1)
            merged = g if len(grads) == 1 else torch.cat([t.reshape(passes, -1, *t.shape[1:]) for t in grads], 1)
            per_sample = PerSample(x, merged.reshape(-1, *g.shape[1:]), grad_scale)
        scale = ops.kfac_expand_grad_scale(grad_scale, x.shape[0], rows, g_rows)
        return Statistics(x, g, scale, rows, g_rows, per_sample)

    def count_rows(self, inputs):
        """Rows of the forward calls: samples × output pixels."""
        return sum(ops.kfac_conv_rows(x.shape, *self.geometry()) for x in inputs)

    @override
    def apply_update(self, stats, decay):
        rho = decay if self.has_factors else 0.0
        self.ensure_factors()
        ops.conv2d_act_factor_ema_(self.state["A"], stats.inputs, *self.geometry(), self.bias is not None, rho)
        ops.conv2d_grad_factor_ema_(self.state["G"], stats.grads, stats.grad_scale, rho)
        self.update_corrected(stats, decay)

    def _corrected_ema(self, data, decay):
        s = self.state
        ops.conv2d_ekfac_diagonal_ema_(s[CORRECTED], data.inputs, data.grads, s["g_eigenvectors"],
                                       s["a_eigenvectors"], *self.geometry(), self.bias is not None,
                                       data.grad_scale, decay)

    @override
    def factor_layout(self):
        if type(self) is not Conv2dBlock:
            return None
        return factor_layout(self.bias is not None, *self.geometry())


class Conv2dKind(LayerKind):
    """nn.Conv2d; grouped or non-zero-padded ones take exact per-sample diagonal curvature."""

    name = "conv2d"

    @override
    def unsupported_reason(self, module):
        return conv_unsupported_reason(module)

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return Conv2dBlock(name, module, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def implicit_rows(self, module):
        return True

    def geometry(self, module: nn.Module) -> Geometry:
        """The module's geometry as the conv2d ops take it."""
        return conv2d_geometry(module)

    def as_conv2d(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (an input or output gradient) in the conv2d ops' ``[N, C, H, W]`` layout."""
        return t

    @override
    def row_positions(self, module, g):
        return g[0, 0].numel()

    @override
    def gram(self, module, x, g, bias):
        k, s, p, d = self.geometry(module)
        return ops.conv2d_gram(self.as_conv2d(module, x), self.as_conv2d(module, g), k, s, p, d, bias)

    @override
    def rows_mv(self, module, x, g, weight, bias):
        k, s, p, d = self.geometry(module)
        weight = weight.reshape(*weight.shape[:2], *k)
        return ops.conv2d_rows_mv(self.as_conv2d(module, x), self.as_conv2d(module, g), weight, bias, s, p, d)

    @override
    def rows_tmv(self, module, x, g, w, index, chunk):
        k, s, p, d = self.geometry(module)
        x, g = self.as_conv2d(module, x), self.as_conv2d(module, g)
        width = g.shape[1]
        per_unit = max(module.weight.numel() // max(width, 1), 1)
        for a, b in output_blocks(width, per_unit, chunk):
            for i, part in zip(index, ops.conv2d_rows_tmv(x, g[:, a:b], w, k, s, p, d)):
                yield i, (slice(a, b),), part
