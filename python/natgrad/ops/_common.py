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
    """A fake 0-dim int64 CPU tensor, the shape every op's ``rung`` output has.

    The rung is on the CPU whatever the inputs' device (csrc/linalg/psd_linalg.h: it records a
    host-side decision, and reading a device tensor would sync).
    """
    return torch.empty((), dtype=torch.long, device="cpu")


# Dispatch keys worth reporting: where a natgrad op has a kernel. CompositeExplicitAutograd
# serves every device without a kernel of its own (CPU, CUDA, MPS, XPU, ...); Meta is the fake
# kernel (shapes only) registered by this package.
_REPORTED_KEYS = ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "CPU", "CUDA", "MPS",
                  "XPU", "Meta")


def dispatch_keys() -> dict[str, list[str]]:
    """For every ``natgrad::`` op, the dispatch keys that hold a kernel for it, read from the
    dispatcher (so it reports what is registered, not what was intended).
    """
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("natgrad::"))
    return {
        name: [k for k in _REPORTED_KEYS
               if torch._C._dispatch_has_kernel_for_dispatch_key(f"natgrad::{name}", k)]
        for name in names
    }


def not_differentiable(op_name: str):
    """An autograd backward that refuses, for ops whose outputs have no useful derivative."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"natgrad::{op_name} is not differentiable; call it on detached tensors "
            "(e.g. under torch.no_grad())"
        )

    return backward
