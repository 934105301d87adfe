"""Shared helpers of the natgrad.ops wrappers."""
from __future__ import annotations

from enum import IntEnum

import torch


class Rung(IntEnum):
    """Rung of the fallback ladder that produced a factorisation (see ``damped_eigh``).

    ``NATIVE``: in the input's dtype; ``FLOAT64``: after promotion to float64; ``JITTER``: float64
    with jitter added to the diagonal; ``DIAGONAL``: no factorisation succeeded, the diagonal of
    the matrix was used instead.
    """

    NATIVE = 0
    FLOAT64 = 1
    JITTER = 2
    DIAGONAL = 3


def rung_like() -> torch.Tensor:
    """A fake 0-dim int64 CPU tensor, the shape every op's ``rung`` output has."""
    return torch.empty((), dtype=torch.long, device="cpu")


def not_differentiable(op_name: str):
    """An autograd backward that refuses, for ops whose outputs have no useful derivative."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"natgrad::{op_name} is not differentiable; call it on detached tensors "
            "(e.g. under torch.no_grad())"
        )

    return backward
