"""natgrad.KFAC's arguments: their ranges (the C++ table both frontends share,
``csrc/kfac/kfac_rules.h``), which of them a param group or a schedule may set, and the checks
that name the first invalid one.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from natgrad import ops
from natgrad.curvature.block import CURVATURE_DTYPES
from natgrad.likelihoods import LIKELIHOODS
from natgrad.optim._hyper import Schedule, check_choice, check_flag, check_number, resolved_number

__all__ = ["BOUNDS", "GROUP_BOUNDS", "GROUP_DEFAULTS", "SCHEDULED", "check_arguments", "resolve"]

_OPTION_BOUNDS = ops.kfac_option_bounds()
#: Each numeric option's range, as check_number keyword arguments.
BOUNDS = {name: bound.check_kwargs() for name, bound in _OPTION_BOUNDS.items()}
#: The options a param group may override.
GROUP_DEFAULTS = tuple(name for name, bound in _OPTION_BOUNDS.items() if bound.per_group)
#: The options that accept a callable of the step (a schedule).
SCHEDULED = {"damping", "factor_update_period", "inverse_update_period", "kl_clip"}  # callables allowed
#: A param group's checks.
GROUP_BOUNDS = {name: dict(BOUNDS[name], allow_callable=name in SCHEDULED) for name in GROUP_DEFAULTS}


def resolve(name: str, value: Schedule | None, step: int) -> Any:
    """A scheduled hyperparameter's value at ``step``, checked against its bounds (kl_clip may be
    None).
    """
    if name == "kl_clip":
        return resolved_number(name, value, step, allow_none=True, **BOUNDS[name])
    return resolved_number(name, value, step, **BOUNDS[name])


def check_arguments(*, model: Any, lr: Any, momentum: Any, weight_decay: Any, damping: Any,
                    factor_decay: Any, factor_update_period: Any, inverse_update_period: Any,
                     kl_clip: Any, inverse_method: Any, pi_correction: Any, eigenvalue_correction: Any,
                     warm_refreshes: Any,
                     adaptive_damping: Any, damping_adaptation_interval: Any, damping_adaptation_decay: Any,
                     adaptive_learning_rate: Any, adaptive_momentum: Any, adaptive_period: Any, likelihood: Any,
                     nll_scale: Any, fisher_type: Any, loss_reduction: Any, linear_approx: Any, factor_dtype: Any,
                     inverse_dtype: Any, max_factor_dim: Any, seed: Any, grad_worker_fraction: Any,
                     triangle_packing: Any, bucket_cap_mb: Any) -> None:
    """Raises TypeError/ValueError naming the first invalid argument of ``natgrad.KFAC``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    values = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                  factor_decay=factor_decay, factor_update_period=factor_update_period,
                  inverse_update_period=inverse_update_period, kl_clip=kl_clip, adaptive_period=adaptive_period,
                  nll_scale=nll_scale)
    for name, bounds in BOUNDS.items():
        check_number(name, values[name], **bounds, allow_callable=name in SCHEDULED,
                     allow_none=name == "kl_clip")
    check_choice("inverse_method", inverse_method, ops.kfac_option_choices("inverse_method"))
    if fisher_type == "exact":
        raise ValueError("Invalid fisher_type: 'exact' (natgrad.KFAC estimates 'empirical' or "
                         "'mc'; the exact Fisher is natgrad.fisher.compute_fisher's)")
    check_choice("fisher_type", fisher_type, ("empirical", "mc"))
    check_choice("loss_reduction", loss_reduction, ops.kfac_option_choices("loss_reduction"))
    check_choice("linear_approx", linear_approx, ("expand", "reduce"))
    check_number("damping_adaptation_interval", damping_adaptation_interval, low=1, integer=True)
    check_number("damping_adaptation_decay", damping_adaptation_decay, low=0.0, high=1.0,
                 low_open=True, high_open=True)
    check_number("grad_worker_fraction", grad_worker_fraction, low=0.0, high=1.0, low_open=True)
    check_number("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
    check_number("seed", seed, integer=True)
    check_number("warm_refreshes", warm_refreshes, low=0, integer=True)
    check_number("max_factor_dim", max_factor_dim, low=1, integer=True, allow_none=True)
    if pi_correction is not None:
        check_flag("pi_correction", pi_correction)
    for name, flag in (("adaptive_damping", adaptive_damping), ("triangle_packing", triangle_packing),
                       ("eigenvalue_correction", eigenvalue_correction),
                       ("adaptive_learning_rate", adaptive_learning_rate), ("adaptive_momentum", adaptive_momentum)):
        check_flag(name, flag)
    check_choice("likelihood", likelihood, tuple(LIKELIHOODS))
    if adaptive_momentum and not adaptive_learning_rate:
        raise ValueError("Invalid adaptive_momentum: True needs adaptive_learning_rate=True (μ is chosen "
                         "jointly with α by the quadratic model)")
    if eigenvalue_correction and (inverse_method != "eigen" or pi_correction):
        raise ValueError(f"Invalid eigenvalue_correction: True needs inverse_method='eigen' and no "
                         f"pi_correction (EKFAC damps exactly), got inverse_method={inverse_method!r}, "
                         f"pi_correction={pi_correction!r}")
    if adaptive_damping and callable(damping):
        raise ValueError("Invalid damping: a callable schedule cannot be combined with "
                         "adaptive_damping=True (the adaptation owns the damping)")
    for name, dt in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
        if dt is not None and dt not in CURVATURE_DTYPES:
            raise ValueError(f"Invalid {name}: {dt!r} (expected torch.float32, torch.float64 or None for the "
                             "weight's dtype, float32 for a half-precision weight; half-precision curvature "
                             "loses the running average and cannot be decomposed: keep it float32 under "
                             "autocast, which is the default)")
