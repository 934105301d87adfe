"""Argument checks of the fake (meta) kernels, mirroring csrc/common/checks.h.

A fake kernel must refuse what the real kernel refuses, with the same message naming the
argument, so that meta tensors, FakeTensors under torch.compile and real tensors fail alike.
Every check goes through ``torch._check`` (a RuntimeError, like the C++ ``TORCH_CHECK``), which
also accepts symbolic sizes under dynamic shapes. Data-dependent checks (NaN/Inf) exist only in
the real kernels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_C10_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as the C++ messages print it (``Double`` for torch.float64)."""
    return _C10_NAMES.get(dtype, str(dtype))


def floating(t: Tensor, name: str) -> None:
    """``t`` has a floating-point dtype."""
    torch._check(
        t.is_floating_point(),
        lambda: f"{name} must have a floating-point dtype (float32 or float64), got {dtype_name(t.dtype)}",
    )


def dim_eq(t: Tensor, dim: int, name: str, layout: str) -> None:
    """``t`` has exactly ``dim`` dimensions."""
    torch._check(t.dim() == dim, lambda: f"{name} must be {dim}-D {layout}, got shape {list(t.shape)}")


def dim_ge(t: Tensor, dim: int, name: str, layout: str) -> None:
    """``t`` has at least ``dim`` dimensions."""
    torch._check(
        t.dim() >= dim,
        lambda: f"{name} must have at least {dim} dimensions {layout}, got shape {list(t.shape)}",
    )


def square(t: Tensor, name: str) -> None:
    """``t`` is a square matrix or a batch of them."""
    torch._check(
        t.dim() >= 2 and t.shape[-1] == t.shape[-2],
        lambda: f"{name} must be a square matrix (or a batch of them), got shape {list(t.shape)}",
    )


def shape_eq(t: Tensor, expected: Sequence[int], name: str, why: str) -> None:
    """``t`` has exactly the shape ``expected``."""
    expected = list(expected)
    torch._check(
        t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected)),
        lambda: f"{name} must have shape {expected} ({why}), got {list(t.shape)}",
    )


def same_device(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    """``t`` lives on ``ref``'s device."""
    torch._check(
        t.device == ref.device,
        lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}",
    )


def same_device_dtype(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    """``t`` lives on ``ref``'s device and has its dtype."""
    same_device(t, ref, name, ref_name)
    torch._check(
        t.dtype == ref.dtype,
        lambda: f"{name} must have the same dtype as {ref_name} ({dtype_name(ref.dtype)}), "
        f"got {dtype_name(t.dtype)}",
    )


def nonempty_rows(rows, name: str) -> None:
    """A batch of samples is not empty."""
    torch._check(
        rows > 0, lambda: f"{name} holds no samples (empty batch); at least one row is needed"
    )


def decay(rho: float) -> None:
    """An EMA decay in [0, 1]."""
    torch._check(
        math.isfinite(rho) and 0.0 <= rho <= 1.0,
        lambda: f"decay must be in [0, 1] (factor <- decay * factor + (1 - decay) * new), got {rho}",
    )


def damping(gamma: float, strictly_positive: bool) -> None:
    """A finite damping, > 0 or >= 0."""
    ok = math.isfinite(gamma) and (gamma > 0.0 if strictly_positive else gamma >= 0.0)
    torch._check(
        ok,
        lambda: f"damping must be a finite number {'> 0' if strictly_positive else '>= 0'}, got {gamma}",
    )


def grad_scale(scale: float) -> None:
    """A finite, positive gradient multiplier."""
    torch._check(
        math.isfinite(scale) and scale > 0.0,
        lambda: "grad_scale must be a finite number > 0 (N for a loss averaged over N samples, "
        f"1 for a summed loss), got {scale}",
    )


def factor(f: Tensor, data: Tensor, data_name: str, dim) -> None:
    """An EMA factor: floating, on the data's device, ``[dim, dim]``."""
    floating(f, "factor")
    same_device(f, data, "factor", data_name)
    shape_eq(f, (dim, dim), "factor", "square, one row per feature (+1 for bias)")


def conv_geometry(input: Tensor, kernel_size, stride, padding, dilation) -> tuple:
    """Validated Conv2d geometry; returns ``(patch_dim, positions)`` like the C++ kernel."""
    floating(input, "input")
    dim_eq(input, 4, "input", "[N, C, H, W]")
    nonempty_rows(input.shape[0], "input")
    torch._check(
        input.shape[1] > 0,
        lambda: f"input must have at least one channel ([N, C, H, W] with C > 0), got shape {list(input.shape)}",
    )
    for v, name, lo in ((kernel_size, "kernel_size", 1), (stride, "stride", 1),
                        (padding, "padding", 0), (dilation, "dilation", 1)):
        torch._check(len(v) == 2, lambda: f"{name} must have 2 elements (height, width), got {list(v)}")
        torch._check(v[0] >= lo and v[1] >= lo, lambda: f"{name} must be >= {lo}, got {list(v)}")
    positions = 1
    for i in range(2):
        span = dilation[i] * (kernel_size[i] - 1) + 1
        size = input.shape[2 + i] + 2 * padding[i]
        torch._check(
            size >= span,
            lambda: f"input spatial size {list(input.shape[2:])} is too small for kernel_size "
            f"{list(kernel_size)} with dilation {list(dilation)} and padding {list(padding)}",
        )
        positions = positions * ((size - span) // stride[i] + 1)
    return input.shape[1] * kernel_size[0] * kernel_size[1], positions
