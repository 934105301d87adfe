"""nn.Conv1d (groups=1, numeric zero padding), e.g. audio and time-series models: exactly an
nn.Conv2d with kernel ``(1, k)`` on inputs ``[N, C, 1, L]``, so the conv2d ops serve it.

A Conv1d weight ``[C_out, C_in, k]`` flattens to ``[C_out, C_in·k]`` in the same order as the
equivalent Conv2d weight ``[C_out, C_in, 1, k]``, and its patches are the same numbers, so the
factors, the Gram matrix and the row products are those of the Conv2d, not an approximation.
"""
from __future__ import annotations

from torch import Tensor
from typing_extensions import override

from natgrad import ops
from natgrad.curvature.layers.conv2d import Conv2dBlock, Conv2dKind, Geometry
from natgrad.ops.factors import factor_layout

__all__ = ["Conv1dBlock", "Conv1dKind"]


def _geometry(module) -> Geometry:
    (k,), (s,), (p,), (d,) = module.kernel_size, module.stride, module.padding, module.dilation
    return (1, k), (1, s), (0, p), (1, d)


def _as_conv2d(t: Tensor) -> Tensor:
    """``[N, C, L]`` (or one unbatched ``[C, L]``) as ``[N, C, 1, L]``."""
    return t.reshape(-1, t.shape[-2], 1, t.shape[-1])


class Conv1dBlock(Conv2dBlock):
    """nn.Conv1d with groups=1 and numeric zero padding, as the equivalent ``(1, k)`` Conv2d."""

    kind = "conv1d"

    @override
    def geometry(self):
        return _geometry(self.module)

    def count_samples(self, inputs):
        """Samples in the forward calls' inputs (an unbatched ``[C, L]`` input is one)."""
        return sum(x.shape[0] if x.dim() == 3 else 1 for x in inputs)

    def count_rows(self, inputs):
        """Rows of the forward calls: samples × output positions."""
        return sum(ops.kfac_conv_rows(_as_conv2d(x).shape, *self.geometry()) for x in inputs)

    @override
    def prepare(self, inputs, grads, grad_scale):
        return super().prepare([_as_conv2d(x) for x in inputs], [_as_conv2d(g) for g in grads], grad_scale)

    @override
    def factor_layout(self):
        return factor_layout(self.bias is not None, *self.geometry()) if type(self) is Conv1dBlock else None


class Conv1dKind(Conv2dKind):
    """nn.Conv1d; grouped or non-zero-padded ones take exact per-sample diagonal curvature."""

    name = "conv1d"

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return Conv1dBlock(name, module, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def rows_input(self, module, inputs, samples):
        if len(inputs) != 1 or inputs[0].dim() != 3 or inputs[0].shape[0] != samples:
            return None
        return inputs[0]

    @override
    def geometry(self, module):
        return _geometry(module)

    @override
    def as_conv2d(self, module, t):
        return _as_conv2d(t)
