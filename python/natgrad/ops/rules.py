"""The numeric rules of K-FAC that natgrad.KFAC and the C++ frontend share (csrc/kfac/kfac_rules.h).

Each rule is written once, in C++; these wrappers reach it through ``torch.ops.natgrad.kfac_*``.

* Statistics bound: :func:`kfac_statistics_ok`, :func:`kfac_peak_bounded`,
  :func:`kfac_statistics_limit` — captured statistics are used only when every value is finite
  and no Gram sum of the update can overflow the factor dtype,
  ``max|t|² · count < finfo(factor_dtype).max / 4``.
* Rows and the sample scale: :func:`kfac_linear_rows`, :func:`kfac_conv_rows`,
  :func:`kfac_embedding_rows` (rows of one forward call's input), :func:`kfac_sample_scale`,
  :func:`kfac_expand_grad_scale`.
* π and damping: :func:`kfac_pi_correction`, :func:`kfac_damping`, :func:`kfac_adapt_damping`.
* Adaptive step: :func:`kfac_quadratic_step` (the learning rate and momentum that minimise the
  quadratic model).
* Trust region: :func:`kfac_trust_region` (ν from the ``⟨u, g⟩`` and ``⟨b, g⟩`` the directions ops
  return), :func:`kfac_fsum`.
* Faults: :class:`Fault`, :func:`kfac_direction_faults`, :func:`kfac_factor_faults`,
  :func:`kfac_fault_message`.
* Unsupported layers: :func:`kfac_conv_unsupported_reason`,
  :func:`kfac_embedding_unsupported_reason`.
* Hyperparameters: :func:`kfac_option_bounds` (every numeric hyperparameter's range, and which a
  param group may override), :func:`kfac_option_choices`.

All but the statistics bound take and return host numbers; the bound returns a 0-d bool tensor on
the statistics' device (no host read). Not differentiable.
"""
from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

import torch
from torch import Tensor

from natgrad import _C  # noqa: F401  (loads the operator registrations)

__all__ = [
    "DampingAdaptation",
    "Fault",
    "OptionBound",
    "QuadraticStep",
    "TrustRegion",
    "kfac_adapt_damping",
    "kfac_conv_rows",
    "kfac_conv_unsupported_reason",
    "kfac_damping",
    "kfac_direction_faults",
    "kfac_embedding_rows",
    "kfac_embedding_unsupported_reason",
    "kfac_expand_grad_scale",
    "kfac_factor_faults",
    "kfac_fault_message",
    "kfac_fsum",
    "kfac_linear_rows",
    "kfac_option_bounds",
    "kfac_option_choices",
    "kfac_peak_bounded",
    "kfac_pi_correction",
    "kfac_quadratic_step",
    "kfac_sample_scale",
    "kfac_statistics_limit",
    "kfac_statistics_ok",
    "kfac_trust_region",
]

_ops = torch.ops.natgrad


class Fault(IntEnum):
    """What a fault flag says about a layer (or parameter) this step."""

    NONE = 0  #: nothing: the layer moves
    GRADIENTS = 1  #: its gradient is not finite: skipped
    DIRECTIONS = 2  #: its preconditioned gradient is not finite: skipped
    STATISTICS = 3  #: its captured statistics are not finite or could overflow: factors kept
    FACTORS = 4  #: its updated factors are not finite: its estimate restarts


class DampingAdaptation(NamedTuple):
    """Output of :func:`kfac_adapt_damping`."""

    multiplier: float  #: the new damping multiplier, in [1e-8, 1e8]
    ratio: float  #: the reduction ratio ρ (-inf when the model predicts no decrease)


class QuadraticStep(NamedTuple):
    """Output of :func:`kfac_quadratic_step`."""

    alpha: float  #: the learning rate along the proposal Δ
    mu: float  #: the momentum along the previous update δ
    model_change: float  #: the quadratic model at (α, μ), ≤ 0 when finite
    finite: bool  #: False when an entry was NaN/Inf (α = μ = 0: skip the step)


class OptionBound(NamedTuple):
    """The range of one numeric hyperparameter (:func:`kfac_option_bounds`)."""

    low: float  #: the lower end
    low_open: bool  #: whether ``low`` itself is excluded
    high: float | None  #: the upper end (None: unbounded)
    high_open: bool  #: whether ``high`` itself is excluded
    integer: bool  #: a whole number (the update periods)
    per_group: bool  #: a param group may carry its own value

    def check_kwargs(self) -> dict:
        """The keywords of :func:`natgrad.optim._hyper.check_number` that enforce this range."""
        low = int(self.low) if self.integer else self.low
        return dict(low=low, low_open=self.low_open, high=self.high, high_open=self.high_open,
                    integer=self.integer)


class TrustRegion(NamedTuple):
    """Output of :func:`kfac_trust_region`."""

    nu: float  #: the step's scale ν in (0, 1]
    kl_share: list[float]  #: each parameter's new share of ``bᵀ F b`` (kept where momentum ≠ 0)


# ---- statistics bound ---------------------------------------------------------------------------

def kfac_statistics_ok(inputs: Tensor, grad_outputs: Tensor, input_rows: int, grad_rows: int,
                       grad_scale: float, factor_dtype: torch.dtype) -> Tensor:
    """Whether one Kronecker factor update's statistics are usable, as a 0-d bool tensor on
    ``grad_outputs``' device (no host read).

    ``max|grad_outputs|² · max(grad_rows, 1) · max(grad_scale², 1)`` and, for floating
    ``inputs`` (not an Embedding's indices), ``max|inputs|² · max(input_rows, 1)`` must both be
    below ``finfo(factor_dtype).max / 4``; NaN or Inf fails.

    Args:
        inputs (Tensor): the update's inputs in the ops' layout (or an Embedding's indices).
        grad_outputs (Tensor): its output gradients (floating).
        input_rows (int): rows of ``inputs``.
        grad_rows (int): rows of ``grad_outputs``.
        grad_scale (float): the ops' ``grad_scale`` of the update.
        factor_dtype (torch.dtype): the factors' (floating) dtype.
    """
    return _ops.kfac_statistics_ok(inputs, grad_outputs, int(input_rows), int(grad_rows),
                                   float(grad_scale), factor_dtype)


def kfac_peak_bounded(peak: Tensor, count: float, factor_dtype: torch.dtype) -> Tensor:
    """``peak² · count < finfo(factor_dtype).max / 4`` for a 0-d ``peak`` (e.g. ``max|t|``), as a
    0-d bool tensor on its device; NaN or Inf fails.
    """
    return _ops.kfac_peak_bounded(peak, float(count), factor_dtype)


def kfac_statistics_limit(factor_dtype: torch.dtype) -> float:
    """``finfo(factor_dtype).max / 4``: the largest Gram sum an update may reach."""
    return _ops.kfac_statistics_limit(factor_dtype)


@torch.library.register_fake("natgrad::kfac_statistics_ok")
def _statistics_ok_fake(inputs, grad_outputs, input_rows, grad_rows, grad_scale, factor_dtype):
    torch._check(grad_outputs.is_floating_point(), lambda: "grad_outputs must be a floating-point tensor")
    torch._check(factor_dtype.is_floating_point,
                 lambda: f"factor_dtype must be a floating-point dtype, got {factor_dtype}")
    return grad_outputs.new_empty((), dtype=torch.bool)


@torch.library.register_fake("natgrad::kfac_peak_bounded")
def _peak_bounded_fake(peak, count, factor_dtype):
    torch._check(peak.dim() == 0, lambda: f"peak must be a 0-d tensor, got {tuple(peak.shape)}")
    torch._check(factor_dtype.is_floating_point,
                 lambda: f"factor_dtype must be a floating-point dtype, got {factor_dtype}")
    return peak.new_empty((), dtype=torch.bool)


# The rules on host numbers compute the same values under torch.compile and FakeTensorMode:
# their fake kernel is the C++ kernel itself (no tensor is involved).
_HOST_RULES = ("kfac_statistics_limit", "kfac_linear_rows", "kfac_conv_rows", "kfac_embedding_rows",
               "kfac_sample_scale", "kfac_expand_grad_scale", "kfac_pi_correction", "kfac_damping",
               "kfac_adapt_damping", "kfac_quadratic_step",
               "kfac_fsum", "kfac_trust_region", "kfac_direction_faults", "kfac_factor_faults",
               "kfac_fault_message", "kfac_conv_unsupported_reason", "kfac_embedding_unsupported_reason",
               "kfac_option_names", "kfac_option_bound", "kfac_option_choices", "ewc_check_options")
_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _register_host_fake(name: str) -> None:
    op = getattr(_ops, name).default
    torch.library.register_fake(f"natgrad::{name}", lambda *args: op.redispatch(_COMPOSITE, *args))


for _name in _HOST_RULES:
    _register_host_fake(_name)


# ---- rows and the sample scale ------------------------------------------------------------------

def kfac_linear_rows(input_shape: Sequence[int], in_features: int) -> int:
    """Rows of one Linear input ``[..., in_features]``: ``numel // max(in_features, 1)``."""
    return _ops.kfac_linear_rows([int(s) for s in input_shape], int(in_features))


def kfac_conv_rows(input_shape: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> int:
    """Rows of one convolution input ``[N, C, *spatial]``: ``N`` times the output positions
    (torch's output size, floor division); an unbatched input counts as one row. The
    dimensionality is ``len(kernel_size)``; ``padding`` is numeric.
    """
    return _ops.kfac_conv_rows([int(s) for s in input_shape], list(kernel_size), list(stride),
                               list(padding), list(dilation))


def kfac_embedding_rows(input_shape: Sequence[int]) -> int:
    """Rows of one Embedding input (indices of any shape): its number of indices."""
    return _ops.kfac_embedding_rows([int(s) for s in input_shape])


def kfac_sample_scale(samples: int, rows: int, loss_reduction: str, batch: int = 0) -> float:
    """The factor that turns captured output gradients into per-sample ones: 1 for "sum",
    ``samples`` for "mean" and ``sqrt(samples · rows)`` for "token_mean" (each row is then one
    Fisher sample); ``rows`` matters for "token_mean" only.

    ``batch`` is the step's samples (0: not known). A call whose input holds one sample while
    ``batch > 1`` is shared by the batch (its input broadcast over it, e.g. a position embedding
    fed position ids ``[1, T]``): its output gradient is the sum of the ``batch`` per-sample
    output gradients, and ``batch · ḡ ḡᵀ`` of their mean ``ḡ`` estimates the Fisher (exactly in
    expectation when they have mean zero), so the scale is that of ``batch`` samples of ``rows``
    rows each, divided by ``sqrt(batch)``: ``sqrt(batch)`` for "mean".

    Example:
        >>> ops.kfac_sample_scale(16, 0, "mean"), ops.kfac_sample_scale(1, 0, "mean", batch=16)
        (16.0, 4.0)
    """
    return _ops.kfac_sample_scale(int(samples), int(rows), loss_reduction, int(batch))


def kfac_expand_grad_scale(grad_scale: float, samples: int, input_rows: int, grad_rows: int) -> float:
    """The scale of a block's captured output gradients in the KFC ("expand") form:
    ``grad_scale · sqrt(positions · passes)``, with ``positions = input_rows // samples`` (the
    layer's input rows per sample: tokens, output pixels) and ``passes = grad_rows // input_rows``
    (backward passes per forward row), each divisor and each count at least 1. Every position
    and every extra pass is then one Fisher sample of its own.
    """
    return _ops.kfac_expand_grad_scale(float(grad_scale), int(samples), int(input_rows), int(grad_rows))


# ---- π correction and damping -------------------------------------------------------------------

def kfac_pi_correction(inverse_method: str, pi_correction: bool | None) -> bool:
    """Whether π-corrected factored damping is on: ``pi_correction`` when given, else True
    exactly for ``inverse_method`` "inverse".
    """
    return _ops.kfac_pi_correction(inverse_method, pi_correction)


def kfac_damping(damping: float, multiplier: float = 1.0) -> float:
    """The damping a step uses: a group's damping (> 0) times the adaptive multiplier (> 0)."""
    return _ops.kfac_damping(float(damping), float(multiplier))


def kfac_adapt_damping(multiplier: float, loss_change: float, model_change: float, decay: float,
                       interval: int) -> DampingAdaptation:
    """One Levenberg–Marquardt adaptation (Martens & Grosse, 2015, §6.5).

    ``ρ = loss_change / model_change`` when ``model_change < 0``, else ``-inf``; the multiplier is
    multiplied by ``ω = decay**interval`` when ``ρ > 3/4``, divided by it when ``ρ < 1/4`` and
    clamped to ``[1e-8, 1e8]``.
    """
    m, r = _ops.kfac_adapt_damping(float(multiplier), float(loss_change), float(model_change),
                                   float(decay), int(interval))
    return DampingAdaptation(m, r)


# ---- adaptive learning rate and momentum -------------------------------------------------------

def kfac_quadratic_step(a00: float, a01: float, a11: float, b0: float, b1: float, adapt_momentum: bool,
                        fixed_momentum: float = 0.0) -> QuadraticStep:
    r"""The step :math:`\alpha\Delta + \mu\delta` minimising the quadratic model (Martens & Grosse,
    2015, §7) :math:`M(w) = \tfrac12 w^\top A w + w^\top b`, :math:`w = (\alpha, \mu)`.

    ``A = [[a00, a01], [a01, a11]] = Vᵀ(F + λI)V`` and ``b = [b0, b1] = Vᵀ∇`` for
    ``V = [Δ, δ]`` (proposal, previous update). With ``adapt_momentum`` both coefficients are
    free: the 2×2 solve when A is positive definite (``det > 1e-12·a00·a11``); μ = 0 and the 1-D
    α when δ is zero (``a11 <= 0``, the first step) or parallel to Δ; α = 0 and the 1-D μ when Δ
    is zero. Otherwise μ = ``fixed_momentum`` and ``α = −(b0 + μ·a01)/a00`` (0 when
    ``a00 <= 0``). A NaN/Inf entry or result gives ``finite=False`` with α = μ = 0.

    >>> kfac_quadratic_step(4.0, 0.0, 0.0, -2.0, 0.0, True).alpha
    0.5
    """
    a, m, c, ok = _ops.kfac_quadratic_step(float(a00), float(a01), float(a11), float(b0), float(b1),
                                           bool(adapt_momentum), float(fixed_momentum))
    return QuadraticStep(a, m, c, ok)


# ---- trust region -------------------------------------------------------------------------------

def kfac_fsum(values: Sequence[float]) -> float:
    """The correctly rounded sum (as :func:`math.fsum`; the plain sum when a value is NaN/Inf)."""
    return _ops.kfac_fsum([float(v) for v in values])


def kfac_trust_region(kl_clip: float, inner: Sequence[float], cross: Sequence[float],
                      lr: Sequence[float], momentum: Sequence[float],
                      kl_share: Sequence[float]) -> TrustRegion:
    r"""The KL trust region on the momentum-accumulated step, from host numbers per parameter.

    .. math::
        t_p = \langle u, g\rangle + 2\mu\langle b, g\rangle + \mu^2 s_p,\qquad
        \nu = \min\Big(1, \sqrt{\kappa / \textstyle\sum_p \eta_p^2 t_p}\Big)

    (ν = 1 unless the sum, taken with :func:`kfac_fsum`, is positive and finite); each
    parameter's new share is :math:`t_p \nu^2`.

    Args:
        kl_clip (float): κ > 0.
        inner (Sequence[float]): ``⟨u, g⟩`` per parameter.
        cross (Sequence[float]): ``⟨b, g⟩`` per parameter (0 without a momentum buffer).
        lr (Sequence[float]): η per parameter.
        momentum (Sequence[float]): μ per parameter.
        kl_share (Sequence[float]): its carried share ``s_p`` (0 without a buffer or share).
    """
    nu, shares = _ops.kfac_trust_region(float(kl_clip), [float(v) for v in inner],
                                        [float(v) for v in cross], [float(v) for v in lr],
                                        [float(v) for v in momentum], [float(v) for v in kl_share])
    return TrustRegion(nu, list(shares))


# ---- faults -------------------------------------------------------------------------------------

def kfac_direction_faults(rows: Sequence[float], offsets: Sequence[int]) -> list[Fault]:
    """The fault of each directions stats row starting at ``offsets`` in ``rows``: (grad finite,
    direction finite), 0 meaning no, give GRADIENTS, DIRECTIONS or NONE.
    """
    return [Fault(c) for c in _ops.kfac_direction_faults([float(v) for v in rows], [int(o) for o in offsets])]


def kfac_factor_faults(flags: Sequence[float]) -> list[Fault]:
    """The fault of each layer of a factor step from its (updated, finite) flags, flattened:
    STATISTICS when not updated, FACTORS when not finite after the update, else NONE.
    """
    return [Fault(c) for c in _ops.kfac_factor_faults([float(v) for v in flags])]


def kfac_fault_message(optimizer: str, fault: Fault | int, kind: str, where: str) -> str:
    """The warning that names a fault once, e.g. "natgrad.KFAC: NaN or Inf (or values that would
    overflow) in the gradients of layer 'fc1'; its update is skipped this step (parameters and
    factors untouched)"; ``kind`` is "layer" or "parameter".
    """
    return _ops.kfac_fault_message(optimizer, int(fault), kind, where)


# ---- unsupported layers -------------------------------------------------------------------------

def kfac_conv_unsupported_reason(groups: int, padding: object, padding_mode: str) -> str | None:
    """Why a convolution gets no Kronecker block (None when it gets one): grouped, or not numeric
    zero padding. ``padding`` is the module's (a tuple, or "same"/"valid").
    """
    reason = _ops.kfac_conv_unsupported_reason(int(groups), repr(padding), padding_mode)
    return reason or None


def kfac_embedding_unsupported_reason(sparse: bool, max_norm: bool) -> str | None:
    """Why an Embedding gets no Kronecker block (None when it gets one)."""
    return _ops.kfac_embedding_unsupported_reason(bool(sparse), bool(max_norm)) or None


# ---- hyperparameters ----------------------------------------------------------------------------

def kfac_option_bounds() -> dict[str, OptionBound]:
    """The range of every numeric hyperparameter both frontends take, by name: lr, momentum,
    weight_decay and damping (which a param group may override), factor_decay,
    factor_update_period, inverse_update_period and kl_clip (checked when given).
    """
    bounds = {}
    for name in _ops.kfac_option_names():
        low, low_open, high, high_open, integer, per_group = _ops.kfac_option_bound(name)
        bounds[name] = OptionBound(low, low_open, None if high == float("inf") else high, high_open,
                                   integer, per_group)
    return bounds


def kfac_option_choices(name: str) -> tuple[str, ...]:
    """The values a choice option takes: ``"inverse_method"`` or ``"loss_reduction"``."""
    return tuple(_ops.kfac_option_choices(name))
