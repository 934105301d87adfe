"""natgrad.KFAC's argument checks: every hyperparameter is validated with a ValueError that
names it and its value (torch.optim's convention), before anything is built or changed."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from natgrad.optim._hyper import check_choice, check_flag, check_number, resolved_number

if TYPE_CHECKING:  # pragma: no cover
    from natgrad.optim.kfac import KFAC


def check_kfac_arguments(*, model: Any, lr: Any, momentum: Any, weight_decay: Any, damping: Any,
                         factor_decay: Any, factor_update_period: Any, inverse_update_period: Any,
                         kl_clip: Any, inverse_method: Any, pi_correction: Any, warm_refreshes: Any,
                         adaptive_damping: Any,
                         damping_adaptation_interval: Any, damping_adaptation_decay: Any,
                         fisher_type: Any, loss_reduction: Any, linear_approx: Any, factor_dtype: Any,
                         inverse_dtype: Any, seed: Any, grad_worker_fraction: Any,
                         triangle_packing: Any, bucket_cap_mb: Any) -> None:
    """Raises TypeError/ValueError naming the first invalid argument of ``natgrad.KFAC``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    check_number("lr", lr, low=0.0)
    check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    check_number("damping", damping, low=0.0, low_open=True, allow_callable=True)
    check_number("factor_decay", factor_decay, low=0.0, high=1.0, high_open=True)
    check_number("factor_update_period", factor_update_period, low=1, integer=True, allow_callable=True)
    check_number("inverse_update_period", inverse_update_period, low=1, integer=True, allow_callable=True)
    check_number("kl_clip", kl_clip, low=0.0, low_open=True, allow_none=True, allow_callable=True)
    check_choice("inverse_method", inverse_method, ("eigen", "inverse"))
    if fisher_type == "exact":
        raise ValueError("Invalid fisher_type: 'exact' (natgrad.KFAC estimates 'empirical' or "
                         "'mc'; the exact Fisher is natgrad.fisher.compute_fisher's)")
    check_choice("fisher_type", fisher_type, ("empirical", "mc"))
    check_choice("loss_reduction", loss_reduction, ("mean", "sum", "token_mean"))
    check_choice("linear_approx", linear_approx, ("expand", "reduce"))
    check_number("damping_adaptation_interval", damping_adaptation_interval, low=1, integer=True)
    check_number("damping_adaptation_decay", damping_adaptation_decay, low=0.0, high=1.0,
                 low_open=True, high_open=True)
    check_number("grad_worker_fraction", grad_worker_fraction, low=0.0, high=1.0, low_open=True)
    check_number("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
    check_number("seed", seed, integer=True)
    check_number("warm_refreshes", warm_refreshes, low=0, integer=True)
    if pi_correction is not None:
        check_flag("pi_correction", pi_correction)
    for name, flag in (("adaptive_damping", adaptive_damping),
                       ("triangle_packing", triangle_packing)):
        check_flag(name, flag)
    if adaptive_damping and callable(damping):
        raise ValueError("Invalid damping: a callable schedule cannot be combined with "
                         "adaptive_damping=True (the adaptation owns the damping)")
    for name, dt in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ValueError(f"Invalid {name}: {dt!r} (expected a floating torch.dtype or None)")


def checked_skip_modules(skip_modules: Any, model: nn.Module) -> set[str]:
    """``skip_modules`` as a set of names, every one of which names a module of ``model``."""
    try:
        skip = set([skip_modules] if isinstance(skip_modules, str) else skip_modules)
    except TypeError:
        raise TypeError(f"Invalid skip_modules: {skip_modules!r} (expected module names, e.g. "
                        "a list of str)") from None
    unknown = sorted(skip - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"Invalid skip_modules: {unknown} match no module of the model "
                         "(expected qualified names as in model.named_modules())")
    return skip


def check_schedules(opt: KFAC, k: int) -> None:
    """Resolves every scheduled hyperparameter of step ``k`` (raising on an invalid value)."""
    for group in opt.param_groups:
        resolved_number("damping", group["damping"], k, low=0.0, low_open=True)
    resolved_number("kl_clip", opt.kl_clip, k, low=0.0, low_open=True, allow_none=True)
    resolved_number("inverse_update_period", opt.inverse_update_period, k, low=1, integer=True)
    opt._is_factor_step(k)
