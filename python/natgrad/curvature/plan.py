"""Which curvature block each parameter of a model gets in natgrad.KFAC, and the capture that
feeds it (issue 16: transformers with every parameter in a curvature block).

In order of preference, for a module's own optimized parameters:

1. nn.MultiheadAttention: an :class:`~natgrad.curvature.attention.AttentionBlock` (q/k/v
   Kronecker factors); its ``out_proj`` keeps its LinearBlock, fed by the attention's forward.
2. The Kronecker blocks of :func:`~natgrad.curvature.registry.kronecker_block` (Linear,
   Conv2d, Embedding).
3. LayerNorm / RMSNorm / BatchNorm / GroupNorm: a :class:`~natgrad.curvature.diagonal.NormBlock`.
4. Convolutions (grouped, non-zero padding, 1-d/3-d, transposed), a Linear or PReLU with only
   some parameters optimized: a :class:`~natgrad.curvature.diagonal.PerSampleBlock`.
5. Any other module's own parameters (a model's positional embedding, a class token, a layer
   scale): one :class:`~natgrad.curvature.diagonal.FreeParameterBlock` each, traced through
   the module's forward (:mod:`natgrad.curvature.tracing`).

What is left (a sparse or max-norm Embedding, add_bias_kv attention, a parameter whose use
cannot be traced) takes the plain gradient, with the reason in ``KFAC.describe()``; so does
every parameter of a module named in ``skip_modules`` (the explicit opt-out).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from natgrad.curvature.attention import AttentionBlock, AttentionCapture
from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.capture import GradientPhase, LayerCapture
from natgrad.curvature.diagonal import NORMS, FreeParameterBlock, NormBlock, PerSampleBlock
from natgrad.curvature.registry import kronecker_block
from natgrad.curvature.tracing import FreeParameterCapture

PER_SAMPLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear, nn.PReLU)


def _same(a: Sequence[nn.Parameter], b: Sequence[nn.Parameter]) -> bool:
    return [id(p) for p in a] == [id(p) for p in b]


def module_blocks(name: str, module: nn.Module, params: Sequence[nn.Parameter], *,
                  linear_approx: str = "expand", factor_dtype: torch.dtype | None = None,
                  inverse_dtype: torch.dtype | None = None) -> tuple[list[CurvatureBlock], str | None]:
    """The blocks covering ``params`` (the caller's optimized parameters owned directly by
    ``module``, in order), or ``([], reason)`` when they take the plain gradient."""
    dtypes = dict(factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None:
            return [], "add_bias_kv (bias_k, bias_v) has no curvature block"
        block = AttentionBlock(name, module, approx=linear_approx, **dtypes)
        if _same(block.params, params):
            return [block], None
        return [], "only some of its parameters are optimized"
    block, reason = kronecker_block(name, module, params, linear_approx=linear_approx, **dtypes)
    if block is not None:
        return [block], None
    if isinstance(module, nn.Embedding):
        return [], reason
    if isinstance(module, NORMS):
        block = NormBlock(name, module, approx=linear_approx, factor_dtype=factor_dtype)
        return ([block], None) if _same(block.params, params) else ([], "only some of its parameters are optimized")
    if isinstance(module, PER_SAMPLE):
        return [PerSampleBlock(name, module, params, approx=linear_approx, factor_dtype=factor_dtype)], None
    names = {id(p): n for n, p in module.named_parameters(recurse=False)}
    return [FreeParameterBlock(f"{name}.{names[id(p)]}" if name else names[id(p)], p, approx=linear_approx,
                               factor_dtype=factor_dtype) for p in params], None


class CaptureFactory:
    """Makes the capture of each block of one model (attention modules and traced owners get
    one shared capture for all their blocks).

    Args:
        model (nn.Module): the model.
        active (Callable[[], bool]): whether the current step collects statistics.
        phase (GradientPhase): which backward passes fill the records.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool], phase: GradientPhase) -> None:
        self.active, self.phase = active, phase
        self._out_proj = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        self._attention: dict[int, AttentionCapture] = {}
        self._traced: dict[int, FreeParameterCapture] = {}

    def _attention_of(self, mha: nn.MultiheadAttention) -> AttentionCapture:
        if id(mha) not in self._attention:
            self._attention[id(mha)] = AttentionCapture(mha, self.active, self.phase)
        return self._attention[id(mha)]

    def capture(self, block: CurvatureBlock, module: nn.Module) -> LayerCapture:
        """The capture that fills ``block``'s records (``module``: the parameters' owner)."""
        if isinstance(block, AttentionBlock):
            return self._attention_of(module).sink("inproj")
        if id(module) in self._out_proj:
            return self._attention_of(self._out_proj[id(module)]).sink("out")
        if isinstance(block, FreeParameterBlock):
            if id(module) not in self._traced:
                self._traced[id(module)] = FreeParameterCapture(module, self.active, self.phase)
            return self._traced[id(module)].sink(block.name, block.params[0])
        return LayerCapture(module, self.active, self.phase)


def sample_scale(block: CurvatureBlock, inputs: Sequence, loss_reduction: str) -> float:
    """The factor that turns captured output gradients into per-sample ones (see
    :mod:`natgrad.curvature.kron`): ``N`` for "mean" (dim 0 counts samples), 1 for "sum", and
    for "token_mean" (a mean over all ``R = N·T`` rows, e.g. ``F.cross_entropy`` on flattened
    logits) ``sqrt(N·R)``, which makes each row one Fisher sample: ``G`` is the loss's
    Gauss-Newton factor, ``R · Σ_rows g gᵀ``, whatever the batch layout."""
    if loss_reduction == "sum":
        return 1.0
    samples = block.count_samples(inputs)
    if loss_reduction == "mean":
        return float(samples)
    return math.sqrt(samples * block.count_rows(inputs))
