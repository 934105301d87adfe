"""Per-sample gradient rows of a layer, implicitly: the Gram matrix ``U Uᵀ`` and the products
``U v``, ``Uᵀ w`` from the layer's hook data (inputs and output gradients), never forming ``U``;
and ``gram_solve``, the small system of the Woodbury identity.

Rows: a layer sees ``N`` samples; ``grad_output`` holds ``R = P·N`` rows (``P`` passes, e.g. one
per class of the exact Fisher, pass-major), row ``r`` belonging to sample ``r % N``. Row ``r``
of ``U`` is the gradient of the layer's parameters that row ``r``'s output gradient induces,
summed over the sample's weight-sharing positions (tokens, output pixels):
``Σ_t g_rt a_tᵀ`` (+ ``Σ_t g_rt`` for a bias). For one position the Gram is
``(X Xᵀ) ∘ (G Gᵀ)`` (+ ``G Gᵀ``); see csrc/empirical/layer_gram.h for the forms with positions
and their costs. None of the ops is differentiable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)
from natgrad.ops import _checks
from natgrad.ops._common import not_differentiable, rung_like

__all__ = ["GramSolution", "conv2d_gram", "conv2d_rows_mv", "conv2d_rows_tmv", "embedding_gram",
           "embedding_rows_mv", "embedding_rows_tmv", "gram_solve", "linear_gram",
           "linear_rows_mv", "linear_rows_tmv"]

_ops = torch.ops.natgrad


class GramSolution(NamedTuple):
    """Output of :func:`gram_solve`."""

    solution: Tensor  #: ``(gram + shift·I)⁻¹ rhs``, shaped like ``rhs``
    rung: Tensor  #: 0-dim int64 :class:`natgrad.ops.Rung` of the Cholesky


def linear_gram(input: Tensor, grad_output: Tensor, bias: bool = True) -> Tensor:
    """``U Uᵀ`` ``[R, R]`` of an nn.Linear layer's per-sample gradients (weight, and bias).

    Args:
        input (Tensor): the layer's input ``[N, ..., in_features]`` (dim 0 indexes samples).
        grad_output (Tensor): ``[R, ..., out_features]``, ``R`` a multiple of ``N``.
        bias (bool): include the bias's rows (default: True).
    """
    return _ops.linear_gram(input, grad_output, bias)


def linear_rows_mv(input: Tensor, grad_output: Tensor, weight: Tensor,
                   bias: Tensor | None = None) -> Tensor:
    """``U v`` ``[R]`` for ``v = (weight [out, in], bias [out])`` of an nn.Linear layer."""
    return _ops.linear_rows_mv(input, grad_output, weight, bias)


def linear_rows_tmv(input: Tensor, grad_output: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``Uᵀ w`` for ``w`` ``[R]``: ``(weight part [out, in], bias part [out])``."""
    return _ops.linear_rows_tmv(input, grad_output, weights)


def conv2d_gram(input: Tensor, grad_output: Tensor, kernel_size, stride, padding, dilation,
                bias: bool = True) -> Tensor:
    """``U Uᵀ`` ``[R, R]`` of an nn.Conv2d layer (groups=1, zero padding): input
    ``[N, C_in, H, W]``, grad_output ``[R, C_out, H', W']``. Per-sample gradients are formed from
    a chunk of samples' patches at a time (the whole batch's unfold is never held).
    """
    return _ops.conv2d_gram(input, grad_output, kernel_size, stride, padding, dilation, bias)


def conv2d_rows_mv(input: Tensor, grad_output: Tensor, weight: Tensor, bias: Tensor | None,
                   stride, padding, dilation) -> Tensor:
    """``U v`` ``[R]`` for ``v = (weight [C_out, C_in, kh, kw], bias [C_out])``: one
    convolution with ``v``, no unfold.
    """
    return _ops.conv2d_rows_mv(input, grad_output, weight, bias, stride, padding, dilation)


def conv2d_rows_tmv(input: Tensor, grad_output: Tensor, weights: Tensor, kernel_size, stride,
                    padding, dilation) -> tuple[Tensor, Tensor]:
    """``Uᵀ w``: ``(weight part [C_out, C_in, kh, kw], bias part [C_out])``, the convolution's
    weight gradient for the weighted output gradient (no unfold).
    """
    return _ops.conv2d_rows_tmv(input, grad_output, weights, kernel_size, stride, padding, dilation)


def embedding_gram(indices: Tensor, grad_output: Tensor) -> Tensor:
    """``U Uᵀ`` ``[R, R]`` of an nn.Embedding layer: indices ``[N, ...]`` (int), grad_output
    ``[R, ..., dim]``. One-hot activations: ``a·a'`` is an index comparison.
    """
    return _ops.embedding_gram(indices, grad_output)


def embedding_rows_mv(indices: Tensor, grad_output: Tensor, weight: Tensor) -> Tensor:
    """``U v`` ``[R]`` for ``v = weight [num_embeddings, dim]`` (a row lookup)."""
    return _ops.embedding_rows_mv(indices, grad_output, weight)


def embedding_rows_tmv(indices: Tensor, grad_output: Tensor, weights: Tensor,
                       num_embeddings: int) -> Tensor:
    """``Uᵀ w`` ``[num_embeddings, dim]`` (an index_add)."""
    return _ops.embedding_rows_tmv(indices, grad_output, weights, num_embeddings)


def gram_solve(gram: Tensor, rhs: Tensor, shift: float) -> GramSolution:
    """``(gram + shift·I)⁻¹ rhs`` for a PSD ``gram`` ``[R, R]`` and ``rhs`` ``[R]`` or ``[R, k]``,
    ``shift > 0``: in float64 by Cholesky through the fallback ladder, in ``rhs``'s dtype.
    """
    return GramSolution(*_ops.gram_solve(gram, rhs, shift))


# ---- fake kernels (with the C++ argument checks) -----------------------------------------------


def _passes(samples, rows, input_name: str) -> None:
    torch._check(
        rows > 0 and rows % samples == 0,
        lambda: f"grad_output must have a positive multiple of {input_name}.size(0) = {samples} "
        f"rows (one block of samples per pass), got {rows}",
    )


def _linear_rows(input, grad_output) -> None:
    _checks.floating(input, "input")
    _checks.dim_ge(input, 2, "input", "[N, ..., in_features] (dim 0 indexes samples)")
    _checks.same_device_dtype(grad_output, input, "grad_output", "input")
    mid = list(input.shape[1:-1])
    torch._check(
        grad_output.dim() == input.dim() and list(grad_output.shape[1:-1]) == mid,
        lambda: f"grad_output must have shape [R, {mid}, out_features] (the positions of input "
        f"{list(input.shape)}), got {list(grad_output.shape)}",
    )
    _checks.nonempty_rows(input.shape[0], "input")
    _passes(input.shape[0], grad_output.shape[0], "input")


def _conv_rows(input, grad_output, kernel_size, stride, padding, dilation) -> None:
    _checks.floating(input, "input")
    _checks.dim_eq(input, 4, "input", "[N, C_in, H, W]")
    _checks.same_device_dtype(grad_output, input, "grad_output", "input")
    _checks.dim_eq(grad_output, 4, "grad_output", "[R, C_out, H_out, W_out]")
    _checks.conv_geometry(input, kernel_size, stride, padding, dilation)
    out = [(input.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
           for i in range(2)]
    torch._check(
        list(grad_output.shape[2:]) == out,
        lambda: f"grad_output must have the convolution's output size {out} in its last two dims, "
        f"got {list(grad_output.shape)}",
    )
    _passes(input.shape[0], grad_output.shape[0], "input")


def _embedding_rows(indices, grad_output) -> None:
    torch._check(
        indices.dtype in (torch.int64, torch.int32),
        lambda: f"indices must be an int64 or int32 tensor of token ids, got {_checks.dtype_name(indices.dtype)}",
    )
    _checks.dim_ge(indices, 1, "indices", "[N, ...] (dim 0 indexes samples)")
    _checks.floating(grad_output, "grad_output")
    _checks.same_device(grad_output, indices, "grad_output", "indices")
    mid = list(indices.shape[1:])
    torch._check(
        grad_output.dim() == indices.dim() + 1 and list(grad_output.shape[1:-1]) == mid,
        lambda: f"grad_output must have shape [R, {mid}, embedding_dim] (the positions of indices "
        f"{list(indices.shape)}), got {list(grad_output.shape)}",
    )
    _checks.nonempty_rows(indices.shape[0], "indices")
    _passes(indices.shape[0], grad_output.shape[0], "indices")


def _weights(weights, grad_output) -> None:
    _checks.same_device_dtype(weights, grad_output, "weights", "grad_output")
    torch._check(
        weights.dim() == 1 and weights.shape[0] == grad_output.shape[0],
        lambda: f"weights must have shape [{grad_output.shape[0]}] (one entry per row of "
        f"grad_output), got {list(weights.shape)}",
    )


def _optional_bias(bias, ref, size) -> None:
    if bias is not None:
        _checks.same_device_dtype(bias, ref, "bias", "input")
        _checks.shape_eq(bias, (size,), "bias", "[out_features]" if ref.dim() != 4 else "[C_out]")


@torch.library.register_fake("natgrad::linear_gram")
def _(input, grad_output, bias):
    _linear_rows(input, grad_output)
    return grad_output.new_empty(grad_output.shape[0], grad_output.shape[0])


@torch.library.register_fake("natgrad::linear_rows_mv")
def _(input, grad_output, weight, bias):
    _linear_rows(input, grad_output)
    _checks.same_device_dtype(weight, input, "weight", "input")
    _checks.shape_eq(weight, (grad_output.shape[-1], input.shape[-1]), "weight",
                     "[out_features, in_features] of the layer")
    _optional_bias(bias, input, grad_output.shape[-1])
    return grad_output.new_empty(grad_output.shape[0])


@torch.library.register_fake("natgrad::linear_rows_tmv")
def _(input, grad_output, weights):
    _linear_rows(input, grad_output)
    _weights(weights, grad_output)
    return (input.new_empty(grad_output.shape[-1], input.shape[-1]),
            input.new_empty(grad_output.shape[-1]))


@torch.library.register_fake("natgrad::conv2d_gram")
def _(input, grad_output, kernel_size, stride, padding, dilation, bias):
    _conv_rows(input, grad_output, kernel_size, stride, padding, dilation)
    return grad_output.new_empty(grad_output.shape[0], grad_output.shape[0])


@torch.library.register_fake("natgrad::conv2d_rows_mv")
def _(input, grad_output, weight, bias, stride, padding, dilation):
    _checks.same_device_dtype(weight, input, "weight", "input")
    _checks.dim_eq(weight, 4, "weight", "[C_out, C_in, kh, kw]")
    _conv_rows(input, grad_output, list(weight.shape[2:]), stride, padding, dilation)
    torch._check(
        weight.shape[0] == grad_output.shape[1] and weight.shape[1] == input.shape[1],
        lambda: f"weight must have shape [{grad_output.shape[1]}, {input.shape[1]}, kh, kw] "
        f"(grad_output's and input's channels), got {list(weight.shape)}",
    )
    _optional_bias(bias, input, weight.shape[0])
    return grad_output.new_empty(grad_output.shape[0])


@torch.library.register_fake("natgrad::conv2d_rows_tmv")
def _(input, grad_output, weights, kernel_size, stride, padding, dilation):
    _conv_rows(input, grad_output, kernel_size, stride, padding, dilation)
    _weights(weights, grad_output)
    c_out = grad_output.shape[1]
    return (input.new_empty(c_out, input.shape[1], kernel_size[0], kernel_size[1]),
            input.new_empty(c_out))


@torch.library.register_fake("natgrad::embedding_gram")
def _(indices, grad_output):
    _embedding_rows(indices, grad_output)
    return grad_output.new_empty(grad_output.shape[0], grad_output.shape[0])


@torch.library.register_fake("natgrad::embedding_rows_mv")
def _(indices, grad_output, weight):
    _embedding_rows(indices, grad_output)
    _checks.same_device_dtype(weight, grad_output, "weight", "grad_output")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == grad_output.shape[-1],
        lambda: f"weight must have shape [num_embeddings, {grad_output.shape[-1]}], got {list(weight.shape)}",
    )
    return grad_output.new_empty(grad_output.shape[0])


@torch.library.register_fake("natgrad::embedding_rows_tmv")
def _(indices, grad_output, weights, num_embeddings):
    _embedding_rows(indices, grad_output)
    _weights(weights, grad_output)
    torch._check(num_embeddings > 0, lambda: f"num_embeddings must be > 0, got {num_embeddings}")
    return grad_output.new_empty(num_embeddings, grad_output.shape[-1])


@torch.library.register_fake("natgrad::gram_solve")
def _(gram, rhs, shift):
    _checks.floating(gram, "gram")
    _checks.dim_eq(gram, 2, "gram", "[R, R]")
    _checks.square(gram, "gram")
    _checks.nonempty_rows(gram.shape[0], "gram")
    _checks.same_device_dtype(rhs, gram, "rhs", "gram")
    torch._check(
        rhs.dim() in (1, 2) and rhs.shape[0] == gram.shape[0],
        lambda: f"rhs must have shape [R] or [R, k] with R = {gram.shape[0]} (gram.size(0)), got {list(rhs.shape)}",
    )
    torch._check(
        isinstance(shift, (int, float)) and shift == shift and abs(shift) != float("inf") and shift > 0,
        lambda: f"shift must be a finite number > 0 (n * damping), got {shift}",
    )
    return rhs.new_empty(rhs.shape), rung_like()


for _name in ("linear_gram", "linear_rows_mv", "linear_rows_tmv", "conv2d_gram", "conv2d_rows_mv",
              "conv2d_rows_tmv", "embedding_gram", "embedding_rows_mv", "embedding_rows_tmv",
              "gram_solve"):
    torch.library.register_autograd(f"natgrad::{_name}", not_differentiable(_name),
                                    setup_context=lambda ctx, inputs, output: None)
