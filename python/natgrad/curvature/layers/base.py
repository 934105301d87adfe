"""The interface of a layer kind: everything natgrad knows about one module type.

A :class:`LayerKind` answers, for the modules it is registered for (see
:func:`natgrad.curvature.register_layer`):

* whether a module can get the kind's curvature block, and why not (:meth:`unsupported_reason`),
  and what a module that cannot takes instead (:attr:`fallback`);
* the block itself (:meth:`block`), which owns the row counting, the factor statistics in their
  op layout and the packing of the layer's parameters;
* the implicit per-sample gradient rows NaturalGradient uses (:mod:`natgrad.fisher.gram`): the
  layer's input over its calls, its output gradients, the Gram matrix ``U Uᵀ`` and the row
  products ``U v`` and ``Uᵀ w``, all from the captured inputs and output gradients;
* optionally, the exact per-sample diagonal Fisher EWC uses (:meth:`diagonal_fisher`).

Every method has a default that opts out (no implicit rows, no diagonal fast path), so a new kind
only needs :meth:`block`. All tensors arrive detached; the math runs in the ops.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.capture import GradientPhase, LayerCapture

#: what a module whose kind cannot give it a block takes: exact per-sample diagonal curvature
#: (:class:`~natgrad.curvature.diagonal.PerSampleBlock`) or the plain gradient
FALLBACKS = ("per_sample", "plain")

#: one chunk of :meth:`LayerKind.rows_tmv`: (parameter index, index into the parameter, part)
Chunk = tuple[int, tuple, Tensor]


class KindCaptures(Protocol):
    """A kind's captures in one model (:meth:`LayerKind.captures`)."""

    def capture(self, block: CurvatureBlock, module: nn.Module) -> LayerCapture | None:
        """The capture that fills ``block`` (``module``: its parameters' owner), or None when
        the block is not this kind's to feed.
        """


class LayerKind:
    """Base class of a layer kind (see the module docstring).

    Attributes:
        name (str): the kind's name (the block's ``kind``, its checkpoint tag).
        fallback (str): "per_sample" or "plain" (see :data:`FALLBACKS`).
        standalone (bool): the block is fed by its module's own forward hooks
            (:class:`~natgrad.curvature.capture.LayerCapture`) alone, so natgrad.fisher's
            "kfac" structure, EWC and NaturalGradient's implicit rows can use it. False: the kind
            installs its own capture (attention), and only natgrad.KFAC builds its block.
        has_diagonal_fisher (bool): :meth:`diagonal_fisher` is implemented.
        sparse_gradient (bool): the block assumes the weight's gradient vanishes outside the rows
            the inputs select (nn.Embedding: A is zero for a token not looked up). When a
            parameter is shared by several modules (tied weights), a module of such a kind
            yields its block to one whose kind models every row (see
            :func:`natgrad.curvature.registry.parameter_owners`).
    """

    name: str = "layer"
    fallback: str = "per_sample"
    standalone: bool = True
    has_diagonal_fisher: bool = False
    sparse_gradient: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot get this kind's block (shown by ``KFAC.describe()``), or None."""
        return None

    def block(self, name: str, module: nn.Module, *, approx: str = "expand",
              factor_dtype: torch.dtype | None = None,
              inverse_dtype: torch.dtype | None = None) -> CurvatureBlock:
        """The curvature block of ``module`` (called only when :meth:`unsupported_reason` is None).

        Args:
            name (str): the module's qualified name (checkpoint key).
            module (nn.Module): the layer.
            approx (str): weight sharing: "expand" or "reduce" (default: "expand").
            factor_dtype (torch.dtype or None): the block's factor dtype.
            inverse_dtype (torch.dtype or None): the block's inverse dtype.
        """
        raise NotImplementedError(f"layer kind {self.name!r} defines no block")

    def captures(self, model: nn.Module, active: Callable[[], bool], phase: GradientPhase) -> KindCaptures | None:
        """The kind's own captures in ``model`` (a kind that is not :attr:`standalone`), or None:
        its blocks are fed by their module's hooks (default).

        Args:
            model (nn.Module): the model natgrad.KFAC holds.
            active (Callable[[], bool]): whether the current step collects statistics.
            phase (GradientPhase): which backward passes fill the records.
        """
        return None

    # ---- implicit per-sample gradient rows (natgrad.fisher.gram) ------------------------------

    def implicit_rows(self, module: nn.Module) -> bool:
        """Whether ``module``'s rows can be formed implicitly by the methods below (default:
        False: NaturalGradient forms them explicitly with torch.func).
        """
        return False

    def rows_input(self, module: nn.Module, inputs: Sequence[Tensor], samples: int) -> Tensor | None:
        """The layer's input ``[samples, ...]`` over all its forward calls (their positions side
        by side), or None when the calls do not fit the implicit form (then explicit rows).

        Args:
            module (nn.Module): the layer.
            inputs (sequence of Tensor): each call's input.
            samples (int): the batch's samples.
        """
        if not inputs or any(x.shape[0] != samples or x.dim() < 2 for x in inputs):
            return None
        return inputs[0] if len(inputs) == 1 else None

    def rows_grads(self, module: nn.Module, x: Tensor, passes: Sequence[Sequence[Tensor]]) -> Tensor:
        """The output gradients ``[R, ...]`` of all passes, pass-major: ``passes[p]`` holds each
        call's output gradient in pass ``p``, merged like :meth:`rows_input`'s calls.
        """
        merged = [self.merge_calls(module, grads) for grads in passes]
        return merged[0] if len(merged) == 1 else torch.cat(merged)

    def merge_calls(self, module: nn.Module, grads: Sequence[Tensor]) -> Tensor:
        """One pass's output gradients of several calls side by side (default: one call)."""
        return grads[0]

    def row_positions(self, module: nn.Module, g: Tensor) -> int:
        """Weight-sharing positions per row of ``g`` (tokens; default: trailing dim = features)."""
        return g[0].numel() // g.shape[-1]

    def row_bound(self, module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> float:
        """An upper bound on ``|U_rk|``: positions × max|activation| × max|output gradient|."""
        act, grad = (float(v) for v in torch.stack([torch.stack(torch.aminmax(t)).to(torch.float64).abs().max()
                                                    for t in (x, g)]))
        return self.row_positions(module, g) * max(act, 1.0 if bias else 0.0) * grad

    def gram(self, module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> Tensor:
        """``U Uᵀ`` ``[R, R]`` of the layer's rows (weight, and bias when ``bias``)."""
        raise NotImplementedError

    def rows_mv(self, module: nn.Module, x: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``U v`` ``[R]`` for ``v = (weight, bias)`` shaped like the parameters."""
        raise NotImplementedError

    def rows_tmv(self, module: nn.Module, x: Tensor, g: Tensor, w: Tensor, index: Sequence[int],
                 chunk: int) -> Iterator[Chunk]:
        """``Uᵀ w`` for ``w`` ``[R]`` in blocks of at most ``chunk`` weight entries, as
        ``(parameter index, index into the parameter, block)`` (``index``: the weight's and the
        bias's positions in the caller's list), so the caller never holds a whole direction.
        """
        raise NotImplementedError

    # ---- EWC's diagonal Fisher ------------------------------------------------------------------

    def diagonal_fisher(self, module: nn.Module, x: Tensor, g: Tensor) -> list[Tensor]:
        """The exact per-sample diagonal Fisher ``Σ_i g_i² (per parameter)`` of one call's input and
        per-sample output gradients, one tensor per parameter (only if :attr:`has_diagonal_fisher`).
        """
        raise NotImplementedError


def output_blocks(width: int, per_unit: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` ranges over ``width`` output units of ``per_unit`` weight entries each, with at
    most ``chunk`` entries per range (at least one unit).
    """
    step = max(1, chunk // max(per_unit, 1))
    for a in range(0, width, step):
        yield a, min(width, a + step)
