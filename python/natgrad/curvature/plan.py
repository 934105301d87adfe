"""Which curvature block each parameter of a model gets in natgrad.KFAC, and the capture that
feeds it.

In order of preference, for a module's own optimized parameters:

1. The block of the module's layer kind (:mod:`natgrad.curvature.layers`, including whatever
   :func:`~natgrad.curvature.register_layer` added), when the module is supported and all its
   parameters are optimized; otherwise its kind's ``fallback`` decides: the plain gradient, or
   step 3.
2. LayerNorm / RMSNorm / BatchNorm / GroupNorm: a :class:`~natgrad.curvature.diagonal.NormBlock`.
3. A module of a kind whose fallback is "per_sample" (a grouped convolution, a Linear with only
   some parameters optimized), a 3-d or transposed convolution or a PReLU: a
   :class:`~natgrad.curvature.diagonal.PerSampleBlock`.
4. Any other module's own parameters (a model's positional embedding, a class token, a layer
   scale): one :class:`~natgrad.curvature.diagonal.FreeParameterBlock` each, traced through
   the module's forward (:mod:`natgrad.curvature.tracing`).

What is left (a sparse or max-norm Embedding, add_bias_kv attention, a parameter whose use
cannot be traced) takes the plain gradient, with the reason in ``KFAC.describe()``; so does
every parameter of a module named in ``skip_modules`` (the explicit opt-out).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from natgrad import ops
from natgrad.curvature.block import CurvatureBlock, StatisticsBlock
from natgrad.curvature.capture import GradientPhase, LayerCapture
from natgrad.curvature.diagonal import NORMS, FreeParameterBlock, NormBlock, PerSampleBlock
from natgrad.curvature.layers import kind_of
from natgrad.curvature.registry import PARTIAL
from natgrad.curvature.tracing import FreeParameterCapture

#: module types without a layer kind whose parameters get exact per-sample diagonal curvature
PER_SAMPLE = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.PReLU)


def _same(a: Sequence[nn.Parameter], b: Sequence[nn.Parameter]) -> bool:
    return [id(p) for p in a] == [id(p) for p in b]


def module_blocks(name: str, module: nn.Module, params: Sequence[nn.Parameter], *,
                  linear_approx: str = "expand", factor_dtype: torch.dtype | None = None,
                  inverse_dtype: torch.dtype | None = None) -> tuple[list[CurvatureBlock], str | None]:
    """The blocks covering ``params`` (the caller's optimized parameters owned directly by
    ``module``, in order), or ``([], reason)`` when they take the plain gradient.
    """
    kind = kind_of(module)
    if kind is not None:
        reason = kind.unsupported_reason(module)
        if reason is None:
            block = kind.block(name, module, approx=linear_approx, factor_dtype=factor_dtype,
                               inverse_dtype=inverse_dtype)
            if _same(block.params, params):
                return [block], None
            reason = PARTIAL
        if kind.fallback == "plain":
            return [], reason
    if isinstance(module, NORMS):
        block = NormBlock(name, module, approx=linear_approx, factor_dtype=factor_dtype)
        return ([block], None) if _same(block.params, params) else ([], PARTIAL)
    if isinstance(module, PER_SAMPLE) or kind is not None:
        return [PerSampleBlock(name, module, params, approx=linear_approx, factor_dtype=factor_dtype)], None
    names = {id(p): n for n, p in module.named_parameters(recurse=False)}
    return [FreeParameterBlock(f"{name}.{names[id(p)]}" if name else names[id(p)], p, approx=linear_approx,
                               factor_dtype=factor_dtype) for p in params], None


class CaptureFactory:
    """Makes the capture of each block of one model: its kind's own (:meth:`LayerKind.captures
    <natgrad.curvature.layers.LayerKind.captures>`: attention) when it has one, a traced owner's
    shared capture for free parameters, otherwise the module's hooks.

    Args:
        model (nn.Module): the model.
        active (Callable[[], bool]): whether the current step collects statistics.
        phase (GradientPhase): which backward passes fill the records.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool], phase: GradientPhase) -> None:
        self.active, self.phase = active, phase
        kinds = {id(k): k for m in model.modules() if (k := kind_of(m)) is not None}
        self._kinds = [c for k in kinds.values() if (c := k.captures(model, active, phase)) is not None]
        self._traced: dict[int, FreeParameterCapture] = {}

    def capture(self, block: CurvatureBlock, module: nn.Module) -> LayerCapture:
        """The capture that fills ``block``'s records (``module``: the parameters' owner)."""
        for captures in self._kinds:  # kinds with a capture of their own (attention)
            capture = captures.capture(block, module)
            if capture is not None:
                return capture
        if isinstance(block, FreeParameterBlock):
            if id(module) not in self._traced:
                self._traced[id(module)] = FreeParameterCapture(module, self.active, self.phase)
            return self._traced[id(module)].sink(block.name, block.params[0])
        return LayerCapture(module, self.active, self.phase)


def sample_scale(block: StatisticsBlock, inputs: Sequence, loss_reduction: str, batch: int = 0) -> float:
    """The factor that turns captured output gradients into per-sample ones (see
    :mod:`natgrad.curvature.kron`): ``N`` for "mean" (dim 0 counts samples), 1 for "sum", and
    for "token_mean" (a mean over all ``R = N·T`` rows, e.g. ``F.cross_entropy`` on flattened
    logits) ``sqrt(N·R)``, which makes each row one Fisher sample: ``G`` is the loss's
    Gauss-Newton factor, ``R · Σ_rows g gᵀ``, whatever the batch layout
    (:func:`natgrad.ops.kfac_sample_scale`). ``batch`` is the step's samples: calls holding one
    sample while ``batch > 1`` are shared by the batch (broadcast over it, as BERT's and GPT-2's
    position embeddings, fed position ids ``[1, T]``), and their gradient sums the batch's.
    """
    rows = block.count_rows(inputs) if loss_reduction == "token_mean" else 0
    return ops.kfac_sample_scale(block.count_samples(inputs), rows, loss_reduction, batch)
