"""Kronecker-factor statistics of nn.Linear and nn.Conv2d layers (K-FAC's A and G).

Conventions (shared with the C++ ops, csrc/factors/kron_factors.h):

* Leading dimensions are flattened into rows: a Linear input ``[..., d_in]`` has
  ``n = prod(...)`` rows; a Conv2d input ``[N, C, H, W]`` has ``N * OH * OW`` patch rows of
  length ``C * kh * kw`` in ``weight.view(C_out, -1)`` order. Conv2d output gradients
  ``[N, C_out, OH, OW]`` have the same rows.
* ``bias=True`` appends a column of ones to each activation row (never materialised), so the
  factor matches a gradient whose last column is the bias gradient.
* Every factor is a mean over rows: ``A = ãᵀã / n`` and ``G = grad_scale² · gᵀg / n``.
* ``grad_scale`` undoes the loss's reduction: autograd's output gradients of a loss averaged
  over ``N`` samples are ``1/N`` times the per-sample gradients, so pass ``N`` for a batch-mean
  loss and ``1`` for a summed loss. For Conv2d in the KFC form (Grosse & Martens, 2016), whose
  G sums over spatial positions, pass ``N * sqrt(OH * OW)``.
* ``*_ema_`` forms update ``factor`` in place, ``factor ← decay·factor + (1 − decay)·new``,
  accumulating the Gram product straight into the factor (no second factor-sized tensor).
  Inputs of another floating dtype are converted to the factor's dtype.
* Conv2d patches are unfolded in chunks of whole samples of at most ``max(factor size, 2^18)``
  entries, so memory stays bounded while small layers take one or a few chunks (the full
  unfolded patch matrix exists only when it is that small; the autograd backward does
  materialise it).

* ``decay=0`` replaces the whole factor, bias row and column included, even when the factor
  held NaN or Inf.
* :func:`kfac_factors_ema_` runs every layer's two EMA updates of one K-FAC factor step in one
  call and leaves a layer whose statistics hold NaN/Inf (or values that could overflow a Gram sum)
  untouched, returning per-layer flags instead of raising.
* A Linear input with 0 features gives the bias entry alone (``[[1]]``) with ``bias=True`` and a
  ``0 x 0`` factor without.

The non-EMA forms are differentiable with respect to their input; the EMA forms are buffer
updates and are not. Every op runs on any device (ATen compositions registered as
CompositeExplicitAutograd) and returns its factor on the input's device in its dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks

__all__ = [
    "conv2d_act_factor",
    "conv2d_act_factor_ema_",
    "conv2d_grad_factor",
    "conv2d_grad_factor_ema_",
    "factor_layout",
    "kfac_factors_ema_",
    "linear_act_factor",
    "linear_act_factor_ema_",
    "linear_grad_factor",
    "linear_grad_factor_ema_",
]

_ops = torch.ops.natgrad
_IntOrPair = int | tuple[int, int]


def linear_act_factor(input: Tensor, bias: bool = True) -> Tensor:
    """Activation factor ``A = ãᵀã / n`` of an nn.Linear layer.

    Args:
        input (Tensor): the layer's input ``[..., in_features]``; leading dims are rows.
        bias (bool): append the ones column for the layer's bias (default: True).

    Returns:
        Tensor: ``[in_features (+1), in_features (+1)]`` in ``input``'s dtype.
    """
    return _ops.linear_act_factor(input, bias)


def linear_act_factor_ema_(
    factor: Tensor, input: Tensor, bias: bool = True, decay: float = 0.95
) -> Tensor:
    """In-place EMA update ``factor ← decay·factor + (1 − decay)·ãᵀã/n``; returns ``factor``.

    Args:
        factor (Tensor): ``[in_features (+1), in_features (+1)]``, updated in place.
        input (Tensor): the layer's input ``[..., in_features]``.
        bias (bool): whether ``factor`` includes the bias row/column (default: True).
        decay (float): EMA decay ρ in [0, 1] (default: 0.95).
    """
    _ops.linear_act_factor_ema_(factor, input, bias, decay)
    return factor


def linear_grad_factor(grad_output: Tensor, grad_scale: float = 1.0) -> Tensor:
    """Gradient factor ``G = grad_scale² · gᵀg / n`` of an nn.Linear layer.

    Args:
        grad_output (Tensor): gradient w.r.t. the layer's output ``[..., out_features]``.
        grad_scale (float): ``N`` for a loss averaged over ``N`` samples, 1 for a summed loss
            (default: 1.0).

    Returns:
        Tensor: ``[out_features, out_features]``.
    """
    return _ops.linear_grad_factor(grad_output, grad_scale)


def linear_grad_factor_ema_(
    factor: Tensor, grad_output: Tensor, grad_scale: float = 1.0, decay: float = 0.95
) -> Tensor:
    """In-place EMA update of a Linear gradient factor; returns ``factor``.

    Args:
        factor (Tensor): ``[out_features, out_features]``, updated in place.
        grad_output (Tensor): ``[..., out_features]``.
        grad_scale (float): see :func:`linear_grad_factor` (default: 1.0).
        decay (float): EMA decay ρ in [0, 1] (default: 0.95).
    """
    _ops.linear_grad_factor_ema_(factor, grad_output, grad_scale, decay)
    return factor


def conv2d_act_factor(
    input: Tensor,
    kernel_size: _IntOrPair,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    bias: bool = True,
) -> Tensor:
    """Activation factor of an nn.Conv2d layer (groups=1) over all patches, without unfolding
    the whole batch at once.

    Args:
        input (Tensor): the layer's input ``[N, C, H, W]``.
        kernel_size (int or (int, int)): the layer's kernel size, as in nn.Conv2d.
        stride (int or (int, int)): the layer's stride (default: 1).
        padding (int or (int, int)): the layer's explicit zero padding (default: 0).
        dilation (int or (int, int)): the layer's dilation (default: 1).
        bias (bool): append the ones column for the layer's bias (default: True).

    Returns:
        Tensor: ``[C·kh·kw (+1), C·kh·kw (+1)]``.
    """
    return _ops.conv2d_act_factor(
        input, _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bias
    )


def conv2d_act_factor_ema_(
    factor: Tensor,
    input: Tensor,
    kernel_size: _IntOrPair,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    bias: bool = True,
    decay: float = 0.95,
) -> Tensor:
    """In-place EMA update of a Conv2d activation factor; returns ``factor``.

    Args: as :func:`conv2d_act_factor`, plus ``factor`` (updated in place) and ``decay``
    (EMA decay ρ in [0, 1], default: 0.95).
    """
    _ops.conv2d_act_factor_ema_(
        factor, input, _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation),
        bias, decay,
    )
    return factor


def conv2d_grad_factor(grad_output: Tensor, grad_scale: float = 1.0) -> Tensor:
    """Gradient factor ``grad_scale² · gᵀg / n`` of an nn.Conv2d layer over all positions.

    Args:
        grad_output (Tensor): ``[N, C_out, OH, OW]``.
        grad_scale (float): see the module docstring (default: 1.0).

    Returns:
        Tensor: ``[C_out, C_out]``.
    """
    return _ops.conv2d_grad_factor(grad_output, grad_scale)


def conv2d_grad_factor_ema_(
    factor: Tensor, grad_output: Tensor, grad_scale: float = 1.0, decay: float = 0.95
) -> Tensor:
    """In-place EMA update of a Conv2d gradient factor; returns ``factor``.

    Args: as :func:`conv2d_grad_factor`, plus ``factor`` (updated in place) and ``decay``
    (EMA decay ρ in [0, 1], default: 0.95).
    """
    _ops.conv2d_grad_factor_ema_(factor, grad_output, grad_scale, decay)
    return factor


def factor_layout(bias: bool, kernel_size: _IntOrPair | None = None, stride: _IntOrPair = 1,
                  padding: _IntOrPair = 0, dilation: _IntOrPair = 1) -> list[int]:
    """One layer's 9 entries of :func:`kfac_factors_ema_`'s ``layouts``: ``[bias, kernel, stride,
    padding, dilation]`` (pairs) for a Conv2d layer; ``kernel_size=None``: a Linear layer (zeros).
    """
    if kernel_size is None:
        return [int(bias)] + [0] * 8
    return [int(bias), *_pair(kernel_size), *_pair(stride), *_pair(padding), *_pair(dilation)]


def kfac_factors_ema_(a_factors: list[Tensor], g_factors: list[Tensor], inputs: list[Tensor],
                      grad_outputs: list[Tensor], layouts: list[int], grad_scales: list[float],
                      decays: list[float]) -> Tensor:
    """Every Linear/Conv2d layer's factor EMAs of one K-FAC step, in place, in one call.

    Per layer ``i``: ``a_factors[i] ← ρ_i A + (1 − ρ_i) Â`` from ``inputs[i]`` (as
    :func:`linear_act_factor_ema_` or :func:`conv2d_act_factor_ema_`) and ``g_factors[i]`` likewise
    from ``grad_outputs[i]`` and ``grad_scales[i]``, ``ρ_i = decays[i]``. ``layouts`` holds each
    layer's :func:`factor_layout` (9 integers), concatenated. Every argument is validated before
    any factor changes.

    A layer whose inputs or output gradients hold NaN/Inf, or values so large that a Gram sum could
    overflow the factor dtype (``max|x|² · rows ≥ finfo.max / 4``; for the gradients times
    ``max(grad_scale², 1)``), is left untouched. Should an updated factor still be non-finite
    (unreachable under that bound; its diagonal, which holds a Gram EMA's largest entries, is
    checked), both of the layer's factors are zeroed.

    Returns:
        Tensor: ``[L, 2]`` float64 on the factors' device, per layer: 1 if it was updated, 1 if its
        factors are finite afterwards (0: zeroed). Not read back: the caller reads it when it
        wants (natgrad.KFAC joins it to the step's single read).
    """
    return _ops.kfac_factors_ema_(list(a_factors), list(g_factors), list(inputs), list(grad_outputs),
                                  [int(v) for v in layouts], [float(v) for v in grad_scales],
                                  [float(v) for v in decays])


# ---- fake kernels (shapes, dtypes, devices and the C++ argument checks; torch.compile, opcheck
# and the meta device run them) ------------------------------------------------------------------


def _rows(t: Tensor):
    """Rows of a ``[..., d]`` tensor: the product of its leading dims (symbolic-size safe)."""
    rows = 1
    for s in t.shape[:-1]:
        rows = rows * s
    return rows


def _check_linear(t: Tensor, name: str, layout: str) -> None:
    _checks.floating(t, name)
    _checks.dim_ge(t, 1, name, layout)


def _check_conv_grad(grad_output: Tensor, grad_scale: float) -> None:
    _checks.floating(grad_output, "grad_output")
    _checks.dim_eq(grad_output, 4, "grad_output", "[N, C_out, OH, OW]")
    n, _, oh, ow = grad_output.shape
    _checks.nonempty_rows(n * oh * ow, "grad_output")
    _checks.grad_scale(grad_scale)


@torch.library.register_fake("natgrad::linear_act_factor")
def _(input, bias):
    _check_linear(input, "input", "[..., in_features]")
    _checks.nonempty_rows(_rows(input), "input")
    d = input.shape[-1] + int(bias)
    return input.new_empty(d, d)


@torch.library.register_fake("natgrad::linear_act_factor_ema_")
def _(factor, input, bias, decay):
    _check_linear(input, "input", "[..., in_features]")
    _checks.decay(decay)
    _checks.factor(factor, input, "input", input.shape[-1] + int(bias))
    _checks.nonempty_rows(_rows(input), "input")


@torch.library.register_fake("natgrad::linear_grad_factor")
def _(grad_output, grad_scale):
    _check_linear(grad_output, "grad_output", "[..., out_features]")
    _checks.grad_scale(grad_scale)
    _checks.nonempty_rows(_rows(grad_output), "grad_output")
    d = grad_output.shape[-1]
    return grad_output.new_empty(d, d)


@torch.library.register_fake("natgrad::linear_grad_factor_ema_")
def _(factor, grad_output, grad_scale, decay):
    _check_linear(grad_output, "grad_output", "[..., out_features]")
    _checks.grad_scale(grad_scale)
    _checks.decay(decay)
    _checks.factor(factor, grad_output, "grad_output", grad_output.shape[-1])
    _checks.nonempty_rows(_rows(grad_output), "grad_output")


@torch.library.register_fake("natgrad::conv2d_act_factor")
def _(input, kernel_size, stride, padding, dilation, bias):
    patch_dim, _ = _checks.conv_geometry(input, kernel_size, stride, padding, dilation)
    d = patch_dim + int(bias)
    return input.new_empty(d, d)


@torch.library.register_fake("natgrad::conv2d_act_factor_ema_")
def _(factor, input, kernel_size, stride, padding, dilation, bias, decay):
    patch_dim, _ = _checks.conv_geometry(input, kernel_size, stride, padding, dilation)
    _checks.decay(decay)
    _checks.factor(factor, input, "input", patch_dim + int(bias))


@torch.library.register_fake("natgrad::conv2d_grad_factor")
def _(grad_output, grad_scale):
    _check_conv_grad(grad_output, grad_scale)
    d = grad_output.shape[1]
    return grad_output.new_empty(d, d)


@torch.library.register_fake("natgrad::conv2d_grad_factor_ema_")
def _(factor, grad_output, grad_scale, decay):
    _check_conv_grad(grad_output, grad_scale)
    _checks.decay(decay)
    _checks.factor(factor, grad_output, "grad_output", grad_output.shape[1])


@torch.library.register_fake("natgrad::kfac_factors_ema_")
def _(a_factors, g_factors, inputs, grad_outputs, layouts, grad_scales, decays):
    layers = len(a_factors)
    for name, values in (("g_factors", g_factors), ("inputs", inputs), ("grad_outputs", grad_outputs),
                         ("grad_scales", grad_scales), ("decays", decays)):
        torch._check(len(values) == layers, lambda: f"{name} must hold one entry per layer ({layers} "
                     f"a_factors), got {len(values)}")
    torch._check(len(layouts) == 9 * layers, lambda: f"layouts must hold 9 integers per layer (bias, kernel, "
                 f"stride, padding, dilation), i.e. {9 * layers}, got {len(layouts)}")
    for i in range(layers):
        a, g, x, dy = a_factors[i], g_factors[i], inputs[i], grad_outputs[i]
        layout = layouts[9 * i: 9 * i + 9]
        torch._check(layout[0] in (0, 1), lambda: f"layouts[{9 * i}] (layer {i}'s bias flag) must be 0 or 1, "
                     f"got {layout[0]}")
        bias = bool(layout[0])
        _checks.floating(a, f"a_factors[{i}]")
        _checks.same_device_dtype(g, a, f"g_factors[{i}]", f"a_factors[{i}]")
        _checks.floating(x, f"inputs[{i}]")
        _checks.floating(dy, f"grad_outputs[{i}]")
        torch._check(x.device == a.device and dy.device == a.device, lambda: (
            f"layer {i}: inputs and grad_outputs must be on the factors' device ({a.device}), got "
            f"{x.device} and {dy.device}"))
        _checks.grad_scale(grad_scales[i])
        _checks.decay(decays[i])
        if layout[1] or layout[2]:
            a_dim, _ = _checks.conv_geometry(x, layout[1:3], layout[3:5], layout[5:7], layout[7:9])
            _checks.dim_eq(dy, 4, f"grad_outputs[{i}]", "[N, C_out, OH, OW]")
            g_dim = dy.shape[1]
        else:
            torch._check(not any(layout[1:]), lambda: f"layouts of Linear layer {i} must be zero after its "
                         f"bias flag, got {layout}")
            _check_linear(x, f"inputs[{i}]", "[..., in_features]")
            _check_linear(dy, f"grad_outputs[{i}]", "[..., out_features]")
            _checks.nonempty_rows(_rows(x), f"inputs[{i}]")
            _checks.nonempty_rows(_rows(dy), f"grad_outputs[{i}]")
            a_dim, g_dim = x.shape[-1], dy.shape[-1]
        _checks.shape_eq(a, [a_dim + int(bias)] * 2, f"a_factors[{i}]", "square, one row per input feature "
                         "(+1 for bias)")
        _checks.shape_eq(g, [g_dim] * 2, f"g_factors[{i}]", "square, one row per output feature")
    device = a_factors[0].device if a_factors else torch.device("cpu")
    return torch.empty(layers, 2, dtype=torch.float64, device=device)


# ---- autograd: d(XᵀX·c)/dX = X (Ḡ + Ḡᵀ)·c ----------------------------------------------------


def _rows_backward(rows: Tensor, grad: Tensor, bias: bool, scale: float = 1.0) -> Tensor:
    """Gradient w.r.t. ``rows`` [n, d] of ``scale · ãᵀã / n`` (ã = [rows, 1] if bias)."""
    sym = grad + grad.mT
    d = rows.shape[-1]
    out = rows @ sym[:d, :d]
    if bias:
        out = out + sym[d, :d]
    # Divide by the (possibly symbolic) row count itself: a Python float 1/n would become a
    # SymFloat under dynamic shapes, which AOT dispatch fails to tensorify.
    return out * scale / rows.shape[0]


def _setup_linear(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.extra = inputs[1:]


def _linear_act_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    (bias,) = ctx.extra
    rows = input.reshape(-1, input.shape[-1])
    return _rows_backward(rows, grad, bias).reshape(input.shape), None


def _linear_grad_backward(ctx, grad):
    (grad_output,) = ctx.saved_tensors
    (scale,) = ctx.extra
    rows = grad_output.reshape(-1, grad_output.shape[-1])
    out = _rows_backward(rows, grad, False, scale * scale)
    return out.reshape(grad_output.shape), None


def _conv_act_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    kernel_size, stride, padding, dilation, bias = ctx.extra
    patches = F.unfold(input, kernel_size, dilation, padding, stride)  # [N, D, L]
    sym = grad + grad.mT
    d = patches.shape[1]
    grad_patches = sym[:d, :d] @ patches
    if bias:
        grad_patches = grad_patches + sym[:d, d, None]
    grad_patches = grad_patches / patches.shape[0] / patches.shape[2]
    grad_input = F.fold(grad_patches, input.shape[-2:], kernel_size, dilation, padding, stride)
    return grad_input, None, None, None, None, None


def _conv_grad_backward(ctx, grad):
    (grad_output,) = ctx.saved_tensors
    (scale,) = ctx.extra
    n, c = grad_output.shape[:2]
    cols = grad_output.reshape(n, c, -1)  # [N, C, L]
    sym = grad + grad.mT
    out = (sym @ cols) * (scale * scale) / n / cols.shape[2]
    return out.reshape(grad_output.shape), None


torch.library.register_autograd(
    "natgrad::linear_act_factor", _linear_act_backward, setup_context=_setup_linear
)
torch.library.register_autograd(
    "natgrad::linear_grad_factor", _linear_grad_backward, setup_context=_setup_linear
)
torch.library.register_autograd(
    "natgrad::conv2d_act_factor", _conv_act_backward, setup_context=_setup_linear
)
torch.library.register_autograd(
    "natgrad::conv2d_grad_factor", _conv_grad_backward, setup_context=_setup_linear
)
