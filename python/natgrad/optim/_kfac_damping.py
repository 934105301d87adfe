"""natgrad.KFAC's step-size control: the Levenberg–Marquardt damping adaptation (Martens &
Grosse, 2015, §6.5: compare the loss reduction of a step with the reduction its quadratic model
predicted) and the KL trust region on the momentum-accumulated step."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from natgrad.optim._hyper import resolved_number
from natgrad.optim._kfac_step import weighted_inner

if TYPE_CHECKING:  # pragma: no cover
    from natgrad.optim.kfac import KFAC


def adapt_damping(opt: KFAC, closure, loss_before, before: dict, grads: dict) -> None:
    """Levenberg–Marquardt: compare the loss reduction with the quadratic model's."""
    deltas = {p: p.detach() - old for p, old in before.items()}
    predicted = sum(float((grads[p] * d).sum()) for p, d in deltas.items())
    curvature = 0.0
    for p, d in deltas.items():
        curvature += opt._damping(p) * float(d.pow(2).sum())
    for block in opt._blocks:
        if block.has_factors and all(p in deltas for p in block.params):
            curvature += float(block.quad_form([deltas[p] for p in block.params]))
    model_change = predicted + 0.5 * curvature
    opt._suspend_capture = True
    try:
        with torch.enable_grad():
            loss_after = closure()
    finally:
        opt._suspend_capture = False
    change = opt._comm.mean_scalar(float(loss_after)) - opt._comm.mean_scalar(float(loss_before))
    rho = change / model_change if model_change < 0 else -math.inf
    opt.last_reduction_ratio = rho
    omega = opt.damping_adaptation_decay ** opt.damping_adaptation_interval
    if rho > 0.75:
        opt._damping_multiplier *= omega
    elif rho < 0.25:
        opt._damping_multiplier /= omega
    opt._damping_multiplier = min(max(opt._damping_multiplier, 1e-8), 1e8)


def trust_region(opt: KFAC, k: int, updates: dict, grads: dict) -> float:
    r"""The KL trust-region scale ν of step ``k``, bounding the step actually taken.

    With heavy-ball momentum the step is :math:`\eta\,b_{new}`, :math:`b_{new} = \nu(\mu b + u)`
    (plus weight decay, outside the trust region), not :math:`\eta u`. Its quadratic KL under the
    damped curvature :math:`\hat F` (for which :math:`\hat F u = g` exactly) is

    .. math::
        \tfrac12\,\eta^2 \nu^2 (\mu b + u)^\top \hat F (\mu b + u)
        = \tfrac12\,\eta^2 \nu^2 (\mu^2 s + 2\mu \langle b, g\rangle + \langle u, g\rangle),

    where :math:`s = b^\top \hat F b` is carried from the previous step (exact while the
    curvature is unchanged; with weight decay, its share of ``b`` is counted in the cross term).
    ν = min(1, sqrt(κ / (η²(μ²s + 2μ⟨b,g⟩ + ⟨u,g⟩)))), and each parameter's share of the new
    :math:`s` (ν² times its terms; a share may be negative, the sum is not) is kept in ``opt.state[p]["kl_share"]``
    (a float64 0-d tensor, saved with the momentum buffer). Without momentum this is the usual
    :math:`\min(1, \sqrt{\kappa / (\eta^2 \langle u, g\rangle)})`. One host read per step.
    """
    kl_clip = resolved_number("kl_clip", opt.kl_clip, k, low=0.0, low_open=True, allow_none=True)
    if kl_clip is None or not updates:
        return 1.0
    if not any(opt._group_of[id(p)]["momentum"] for p in updates):  # ⟨u, g⟩ only: no extra read
        total = weighted_inner(updates, grads, lambda p: opt._group_of[id(p)]["lr"] ** 2)
        return min(1.0, math.sqrt(kl_clip / total)) if total > 0 and math.isfinite(total) else 1.0
    if _read_already(opt, updates):
        return _trust_region_read(opt, kl_clip, updates)
    shares, weighted, carried = [], [], []
    for p, u in updates.items():
        group, g = opt._group_of[id(p)], grads[p]
        term = (u * g).sum(dtype=torch.float64)
        buf = opt.state[p].get("momentum_buffer") if group["momentum"] else None
        if buf is not None:
            mu = group["momentum"]
            share = opt.state[p].get("kl_share")
            term = term + 2 * mu * (buf * g).sum(dtype=torch.float64)
            if share is not None:
                term = term + mu * mu * share.to(term.device)
        if group["momentum"]:
            carried.append((p, term))
        shares.append(term)
        weighted.append(term * group["lr"] ** 2)
    total = float(torch.stack(weighted).sum())
    nu = min(1.0, math.sqrt(kl_clip / total)) if total > 0 and math.isfinite(total) else 1.0
    for p, term in carried:
        opt.state[p]["kl_share"] = term * (nu * nu)
    return nu


def _read_already(opt: KFAC, updates) -> bool:
    """Whether the directions' single read brought ``⟨u, g⟩`` and ``⟨b, g⟩`` of every parameter
    (the list ops and the per-block path do; the distributed per-block sequence does not)."""
    inner, cross = getattr(updates, "inner", None), getattr(updates, "cross", None)
    return inner is not None and cross is not None and all(p in inner and p in cross for p in updates)


def _trust_region_read(opt: KFAC, kl_clip: float, updates) -> float:
    """:func:`trust_region` from the values read with the directions: the same float64
    arithmetic on host numbers, no reduction and no read (``kl_share`` stays a float64 0-d
    tensor in ``opt.state[p]``, on the CPU; its value is remembered so as not to be read back)."""
    known = opt.__dict__.setdefault("_kl_share_values", {})
    weighted, carried = [], []
    for p in updates:
        group = opt._group_of[id(p)]
        term = updates.inner[p]
        mu = group["momentum"]
        if mu and opt.state[p].get("momentum_buffer") is not None:
            term = term + 2 * mu * updates.cross[p]
            share = opt.state[p].get("kl_share")
            if share is not None:
                cached = known.get(id(p))
                value = cached[1] if cached is not None and cached[0] is share else float(share)
                term = term + mu * mu * value
        if mu:
            carried.append((p, term))
        weighted.append(term * group["lr"] ** 2)
    total = math.fsum(weighted)
    nu = min(1.0, math.sqrt(kl_clip / total)) if total > 0 and math.isfinite(total) else 1.0
    for p, term in carried:
        value = term * (nu * nu)
        share = opt.state[p]["kl_share"] = torch.tensor(value, dtype=torch.float64)
        known[id(p)] = (share, value)
    return nu
