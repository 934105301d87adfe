"""natgrad.KFAC's step-size control: the KL trust region on the momentum-accumulated step and the
Levenberg–Marquardt damping adaptation (Martens & Grosse, 2015, §6.5: compare the loss reduction
of a step with the reduction its quadratic model predicted)."""
from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor


def trust_region_scale(kl_clip: float, total: float) -> float:
    r"""ν = min(1, sqrt(κ / total)) for the step's weighted KL ``total`` (1 when it is not a
    positive finite number)."""
    return min(1.0, math.sqrt(kl_clip / total)) if total > 0 and math.isfinite(total) else 1.0


def reduction_ratio(change: float, model_change: float) -> float:
    """ρ: the loss change over the change the quadratic model predicted (−∞ unless the model
    predicted a decrease)."""
    return change / model_change if model_change < 0 else -math.inf


class TrustRegion:
    r"""The KL trust-region scale ν of a step, bounding the step actually taken.

    With heavy-ball momentum the step is :math:`\eta\,b_{new}`, :math:`b_{new} = \nu(\mu b + u)`
    (plus weight decay, outside the trust region), not :math:`\eta u`. Its quadratic KL under the
    damped curvature :math:`\hat F` (for which :math:`\hat F u = g` exactly) is

    .. math::
        \tfrac12\,\eta^2 \nu^2 (\mu b + u)^\top \hat F (\mu b + u)
        = \tfrac12\,\eta^2 \nu^2 (\mu^2 s + 2\mu \langle b, g\rangle + \langle u, g\rangle),

    where :math:`s = b^\top \hat F b` is carried from the previous step (exact while the
    curvature is unchanged; with weight decay, its share of ``b`` is counted in the cross term).
    ν = min(1, sqrt(κ / (η²(μ²s + 2μ⟨b,g⟩ + ⟨u,g⟩)))), and each parameter's share of the new
    :math:`s` (ν² times its terms; a share may be negative, the sum is not) is kept in the
    optimizer's ``state[p]["kl_share"]`` (a float64 0-d tensor, saved with the momentum buffer).
    Without momentum this is the usual :math:`\min(1, \sqrt{\kappa / (\eta^2 \langle u, g\rangle)})`.
    One host read per step, none when the directions brought ``⟨u, g⟩`` and ``⟨b, g⟩``.
    """

    def __init__(self) -> None:
        # the value of each kl_share tensor this object wrote, so as not to read it back:
        # id(parameter) -> (the tensor, its value)
        self._known: dict[int, tuple[Tensor, float]] = {}

    def scale(self, kl_clip: float | None, updates: dict, grads: dict, group_of: dict[int, dict],
              state: MutableMapping[Tensor, Any]) -> float:
        """ν of the step ``updates`` (directions by parameter) with gradients ``grads``;
        ``group_of`` maps ``id(p)`` to ``p``'s param group, ``state`` is the optimizer's state."""
        if kl_clip is None or not updates:
            return 1.0
        if not any(group_of[id(p)]["momentum"] for p in updates):  # ⟨u, g⟩ only: no extra read
            total = self._weighted_inner(updates, grads, lambda p: group_of[id(p)]["lr"] ** 2)
            return trust_region_scale(kl_clip, total)
        inner, cross = getattr(updates, "inner", None), getattr(updates, "cross", None)
        if inner is not None and cross is not None and all(p in inner and p in cross for p in updates):
            return self._scale_read(kl_clip, updates, group_of, state)
        weighted, carried = [], []
        for p, u in updates.items():
            group, g = group_of[id(p)], grads[p]
            term = (u * g).sum(dtype=torch.float64)
            buf = state[p].get("momentum_buffer") if group["momentum"] else None
            if buf is not None:
                mu = group["momentum"]
                share = state[p].get("kl_share")
                term = term + 2 * mu * (buf * g).sum(dtype=torch.float64)
                if share is not None:
                    term = term + mu * mu * share.to(term.device)
            if group["momentum"]:
                carried.append((p, term))
            weighted.append(term * group["lr"] ** 2)
        nu = trust_region_scale(kl_clip, float(torch.stack(weighted).sum()))
        for p, term in carried:
            state[p]["kl_share"] = term * (nu * nu)
        return nu

    @staticmethod
    def _weighted_inner(updates: dict, grads: dict, weight: Callable[[Tensor], float]) -> float:
        """``Σ_p weight(p) ⟨u_p, g_p⟩`` (from ``updates.inner`` when it was read already,
        otherwise with one host read)."""
        inner = getattr(updates, "inner", None)
        if inner is not None and all(p in inner for p in updates):
            return math.fsum(inner[p] * weight(p) for p in updates)
        terms = [(updates[p] * grads[p]).sum(dtype=torch.float64) * weight(p) for p in updates]
        return float(torch.stack(terms).sum())

    def _scale_read(self, kl_clip: float, updates, group_of, state) -> float:
        """:meth:`scale` from the values read with the directions: the same float64 arithmetic
        on host numbers, no reduction and no read (``kl_share`` stays a float64 0-d tensor in
        ``state[p]``, on the CPU; its value is remembered so as not to be read back)."""
        weighted, carried = [], []
        for p in updates:
            group = group_of[id(p)]
            term = updates.inner[p]
            mu = group["momentum"]
            if mu and state[p].get("momentum_buffer") is not None:
                term = term + 2 * mu * updates.cross[p]
                share = state[p].get("kl_share")
                if share is not None:
                    cached = self._known.get(id(p))
                    value = cached[1] if cached is not None and cached[0] is share else float(share)
                    term = term + mu * mu * value
            if mu:
                carried.append((p, term))
            weighted.append(term * group["lr"] ** 2)
        nu = trust_region_scale(kl_clip, math.fsum(weighted))
        for p, term in carried:
            value = term * (nu * nu)
            share = state[p]["kl_share"] = torch.tensor(value, dtype=torch.float64)
            self._known[id(p)] = (share, value)
        return nu


class DampingAdaptation:
    """Levenberg–Marquardt adaptation of the damping: a multiplier of every group's damping,
    shrunk by ω₁^interval when the reduction ratio ρ exceeds 3/4 and grown by it below 1/4
    (kept in [1e-8, 1e8])."""

    def __init__(self) -> None:
        self.multiplier = 1.0
        self.last_ratio: float | None = None

    def update(self, change: float, model_change: float, decay: float, interval: int) -> None:
        """Adapts the multiplier from a step's loss ``change`` and its quadratic model's
        ``model_change``; ``decay`` is ω₁, ``interval`` the steps between adaptations."""
        rho = reduction_ratio(change, model_change)
        self.last_ratio = rho
        omega = decay ** interval
        if rho > 0.75:
            self.multiplier *= omega
        elif rho < 0.25:
            self.multiplier /= omega
        self.multiplier = min(max(self.multiplier, 1e-8), 1e8)
