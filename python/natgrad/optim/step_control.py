"""natgrad.KFAC's step-size control: the KL trust region on the momentum-accumulated step and the
Levenberg–Marquardt damping adaptation (Martens & Grosse, 2015, §6.5: compare the loss reduction
of a step with the reduction its quadratic model predicted).
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from natgrad import ops


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
        ``group_of`` maps ``id(p)`` to ``p``'s param group, ``state`` is the optimizer's state.

        The rule is :func:`natgrad.ops.kfac_trust_region`, on host numbers: ``⟨u, g⟩`` and
        ``⟨b, g⟩`` as the directions read them (``updates.inner``, ``updates.cross``), otherwise
        reduced here and read at once with the carried shares it does not know.
        """
        if kl_clip is None or not updates:
            return 1.0
        params = list(updates)
        groups = [group_of[id(p)] for p in params]
        buffers = [state[p].get("momentum_buffer") if g["momentum"] else None for p, g in zip(params, groups)]
        inner: dict = getattr(updates, "inner", None) or {}
        cross: dict = getattr(updates, "cross", None) or {}
        read = all(p in inner and (b is None or p in cross) for p, b in zip(params, buffers))
        slots: list[float | Tensor] = []  # ⟨u, g⟩, ⟨b, g⟩, the carried share, per parameter
        for p, buf in zip(params, buffers):
            slots.append(inner[p] if read else (updates[p] * grads[p]).sum(dtype=torch.float64))
            if buf is None:
                slots += [0.0, 0.0]
                continue
            slots.append(cross[p] if read else (buf * grads[p]).sum(dtype=torch.float64))
            slots.append(self._share(p, state[p].get("kl_share")))
        pending = [v for v in slots if isinstance(v, Tensor)]
        got = iter(torch.stack([t.to(pending[0].device) for t in pending]).tolist() if pending else [])
        values = [next(got) if isinstance(v, Tensor) else v for v in slots]  # one host read at most
        region = ops.kfac_trust_region(kl_clip, values[0::3], values[1::3], [g["lr"] for g in groups],
                                       [g["momentum"] for g in groups], values[2::3])
        for p, group, value in zip(params, groups, region.kl_share):
            if group["momentum"]:
                device = "cpu" if read else updates[p].device
                share = state[p]["kl_share"] = torch.tensor(value, dtype=torch.float64, device=device)
                self._known[id(p)] = (share, value)
        return region.nu

    def _share(self, p: Tensor, share: Tensor | None) -> float | Tensor:
        """The carried share of ``p``: 0 without one, its value when this object wrote it, else
        the tensor (to be read).
        """
        if share is None:
            return 0.0
        cached = self._known.get(id(p))
        return cached[1] if cached is not None and cached[0] is share else share.to(torch.float64)


class DampingAdaptation:
    """Levenberg–Marquardt adaptation of the damping: a multiplier of every group's damping,
    shrunk by ω₁^interval when the reduction ratio ρ exceeds 3/4 and grown by it below 1/4
    (kept in [1e-8, 1e8]; the rule is :func:`natgrad.ops.kfac_adapt_damping`).
    """

    def __init__(self) -> None:
        self.multiplier = 1.0
        self.last_ratio: float | None = None

    def update(self, change: float, model_change: float, decay: float, interval: int) -> None:
        """Adapts the multiplier from a step's loss ``change`` and its quadratic model's
        ``model_change``; ``decay`` is ω₁, ``interval`` the steps between adaptations.
        """
        self.multiplier, self.last_ratio = ops.kfac_adapt_damping(self.multiplier, change, model_change,
                                                                  decay, interval)
