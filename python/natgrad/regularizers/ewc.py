"""natgrad.EWC: elastic weight consolidation with a per-sample Fisher (Kirkpatrick et al., 2017),
online EWC (Schwarz et al., 2018) and the Kronecker-factored Laplace penalty (Ritter et al., 2018).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad.fisher.compute import compute_fisher, owner_groups, pseudo_losses
from natgrad.fisher.matrices import KroneckerBlock

__all__ = ["EWC"]

MODES = ("separate", "online")
FISHERS = ("empirical", "mc", "exact")
STRUCTURES = ("diagonal", "kfac")


class EWC:
    r"""Quadratic penalty that keeps parameters near those that solved earlier tasks.

    After a task, :meth:`consolidate` estimates the Fisher :math:`F` at the current parameters
    :math:`\theta^*` on that task's data and stores both. :meth:`penalty` then returns

    .. math::
        \frac{\lambda}{2} \sum_{t} \sum_i F_{t,i} (\theta_i - \theta^*_{t,i})^2
        \quad\text{(diagonal)}, \qquad
        \frac{\lambda}{2} \sum_{t} \sum_\ell \operatorname{tr}(\Delta W_\ell^\top G_\ell
        \Delta W_\ell A_\ell) \quad\text{(Kronecker-factored, "kfac")},

    a differentiable scalar to add to the next task's loss, computed by the C++ ops.

    Conventions (so λ compares across libraries): the Fisher is the **mean over samples of
    per-sample** quantities, :math:`F = \frac1N \sum_n \nabla\ell_n \nabla\ell_n^\top` (diagonal:
    squared per-sample gradients), never the square of the batch-mean gradient — that common
    shortcut is smaller by up to the batch size and makes λ depend on it. The factor ½ is
    included. ``fisher`` picks the labels: "empirical" (observed), "mc" (sampled from the model),
    "exact" (expectation over the predictive distribution, categorical or unit Gaussian).

    Modes: "separate" keeps one :math:`(F_t, \theta^*_t)` per task; "online" keeps one pair,
    :math:`F \leftarrow \gamma F + F_{new}` and :math:`\theta^* \leftarrow` the latest parameters
    (for "kfac", each factor is combined with weight √γ: see ``_combine``).
    Parameters created after a consolidation (a new head) are not penalised; a consolidated
    parameter that no longer exists makes :meth:`penalty` raise.

    The Fisher is estimated without loops over samples: hooks and the C++ op
    ``linear_diag_fisher`` for Linear layers, per-sample gradients from torch.func for the other
    parameters, and the K-FAC ops for "kfac". By default the model is put in eval mode while
    estimating (``train_mode=True`` keeps training mode: BatchNorm then normalises with batch
    statistics, so per-sample gradients are not independent; eval mode is the sound choice).

    EWC works with any optimizer. With natgrad.KFAC, add ``ewc.penalty()`` to the loss as usual:
    the penalty's gradient joins ``.grad`` and is preconditioned, while the K-FAC statistics come
    from the data term only (the penalty does not pass through the layers' outputs).

    Args:
        model (nn.Module): the model (its trainable named parameters are consolidated).
        lambda_ (float): λ >= 0 (default: 1.0).
        mode (str): "separate" or "online" (default: "separate").
        gamma (float): decay γ in [0, 1] of the online Fisher (default: 1.0).
        fisher (str): "empirical", "mc" or "exact" (default: "empirical").
        structure (str): "diagonal" or "kfac" (Linear/Conv2d layers Kronecker-factored, other
            parameters diagonal) (default: "diagonal").
        likelihood (str): "categorical" or "gaussian" (default: "categorical").
        train_mode (bool): estimate in training mode (default: False).
        mc_samples (int): label draws per sample for ``fisher="mc"`` (default: 1).
        process_group: with torch.distributed initialised, each rank passes its shard of the
            task's data to :meth:`consolidate` and the Fisher is the sample-weighted mean over
            ranks (default: the world group).
    """

    def __init__(self, model: nn.Module, lambda_: float = 1.0, *, mode: str = "separate",
                 gamma: float = 1.0, fisher: str = "empirical", structure: str = "diagonal",
                 likelihood: str = "categorical", train_mode: bool = False, mc_samples: int = 1,
                 process_group=None) -> None:
        if not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_) or lambda_ < 0:
            raise ValueError(f"Invalid lambda_: {lambda_!r} (expected a finite number >= 0)")
        if not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma!r} (expected a number in [0, 1])")
        for name, value, choices in (("mode", mode, MODES), ("fisher", fisher, FISHERS),
                                     ("structure", structure, STRUCTURES),
                                     ("likelihood", likelihood, ("categorical", "gaussian"))):
            if value not in choices:
                raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"Invalid mc_samples: {mc_samples!r} (expected an int >= 1)")
        self.model, self.lambda_, self.mode, self.gamma = model, float(lambda_), mode, float(gamma)
        self.fisher, self.structure, self.likelihood = fisher, structure, likelihood
        self.train_mode, self.mc_samples = train_mode, mc_samples
        self.process_group = process_group
        self.tasks: list[dict[str, Any]] = []  # per task: {"anchor", "diag", "kron"}

    # ---- estimation -------------------------------------------------------------------------------

    def consolidate(self, data: Iterable | Tensor, targets: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Estimates the Fisher on a task's data at the current parameters and stores it.

        Args:
            data: an iterable of ``(inputs, targets)`` batches (e.g. a DataLoader), or an input
                tensor with ``targets`` given separately.
            targets (Tensor, optional): labels when ``data`` is a tensor (needed for
                ``fisher="empirical"``).
            generator (torch.Generator, optional): for ``fisher="mc"``.
        """
        batches = [(data, targets)] if isinstance(data, Tensor) else list(data)
        if not batches or sum(len(x) for x, _ in batches) == 0:
            raise ValueError("data holds no samples")
        was_training = self.model.training
        self.model.train(self.train_mode)
        try:
            diag, kron, total = {}, {}, 0
            for x, y in batches:
                d, k = self._estimate(x, y, generator)
                n = len(x)
                for store, new in ((diag, d), (kron, k)):
                    for key, value in new.items():
                        store[key] = _weighted(store.get(key), value, n, total)
                total += n
        finally:
            self.model.train(was_training)
        _average_over_ranks(diag, kron, total, self.process_group)
        anchor = {n: p.detach().clone() for n, p in self._named_params().items()}
        task = {"anchor": anchor, "diag": diag, "kron": kron}
        if self.mode == "online" and self.tasks:
            old = self.tasks[0]
            for store in ("diag", "kron"):
                for key, value in task[store].items():
                    prev = old[store].get(key)
                    if prev is not None:
                        task[store][key] = _combine(prev, value, self.gamma)
            self.tasks = [task]
        else:
            self.tasks.append(task)

    def _named_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _estimate(self, x: Tensor, y: Tensor | None, generator) -> tuple[dict, dict]:
        named = self._named_params()
        kwargs = dict(kind=self.fisher, likelihood=self.likelihood, mc_samples=self.mc_samples,
                      generator=generator)
        if self.structure == "kfac":
            names, params = list(named), list(named.values())
            fisher = compute_fisher(self.model, x, y, structure="kfac", params=params, **kwargs)
            diag, kron = {}, {}
            for block, (_, idx) in zip(fisher.blocks, owner_groups(self.model, params)):
                if isinstance(block, KroneckerBlock):
                    kron[tuple(names[i] for i in idx)] = (block.a_factor, block.g_factor)
                    continue
                flat = block.diagonal()
                for i in idx:
                    diag[names[i]] = flat[:params[i].numel()].view_as(params[i])
                    flat = flat[params[i].numel():]
            return diag, kron
        return self._diagonal(x, y, named, kwargs), {}

    def _diagonal(self, x, y, named, kwargs) -> dict[str, Tensor]:
        """Per-sample diagonal Fisher: Linear layers by hooks + the C++ op, the rest by
        torch.func per-sample gradients."""
        linear = {m: name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)
                  and all(p.requires_grad for p in m.parameters(recurse=False))}
        seen: dict[nn.Module, list] = {m: [] for m in linear}
        handles = [m.register_forward_hook(lambda mod, a, out: seen[mod].append((a[0].detach(), out)))
                   for m in linear]
        out_diag: dict[str, Tensor] = {}
        try:
            with torch.enable_grad():
                out = self.model(x)
                used = [m for m in linear if len(seen[m]) == 1]  # called once: per-sample rows
                losses = pseudo_losses(out, y, kwargs["kind"], kwargs["likelihood"],
                                       kwargs["mc_samples"], kwargs["generator"])
                for loss, weight in losses:
                    grads = torch.autograd.grad(loss, [seen[m][0][1] for m in used], retain_graph=True)
                    for m, g in zip(used, grads):
                        a = seen[m][0][0]
                        d = weight * ops.linear_diag_fisher(a, g, m.bias is not None, 1.0)
                        name = linear[m]
                        out_diag[name] = out_diag[name] + d if name in out_diag else d
        finally:
            for h in handles:
                h.remove()
        diag: dict[str, Tensor] = {}
        for m in used:
            d, name = out_diag[linear[m]], linear[m]
            diag[f"{name}.weight" if name else "weight"] = d[:, :m.weight.shape[1]].contiguous()
            if m.bias is not None:
                diag[f"{name}.bias" if name else "bias"] = d[:, -1].contiguous()
        rest = [n for n in named if n not in diag]
        if rest:
            f = compute_fisher(self.model, x, y, structure="diagonal", params=[named[n] for n in rest], **kwargs)
            flat = f.diagonal()
            for n in rest:
                diag[n] = flat[:named[n].numel()].view_as(named[n])
                flat = flat[named[n].numel():]
        return diag

    # ---- the penalty --------------------------------------------------------------------------------

    def penalty(self) -> Tensor:
        """``(λ/2) Σ_tasks Σ F (θ − θ*)²`` (or the Kronecker form), differentiable w.r.t. the
        model's parameters. Zero (a 0-dim tensor) before any consolidation."""
        named = dict(self.model.named_parameters())
        ref = next(iter(named.values()))
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for task in self.tasks:
            missing = [n for n in task["anchor"] if n not in named]
            if missing:
                raise ValueError(f"consolidated parameters no longer exist in the model: {missing}")
            for n, star in task["anchor"].items():
                if named[n].shape != star.shape:
                    raise ValueError(f"parameter {n!r} changed shape since consolidation: "
                                     f"{tuple(star.shape)} -> {tuple(named[n].shape)}")
            if task["diag"]:
                names = list(task["diag"])
                total = total + ops.ewc_penalty([named[n] for n in names], [task["diag"][n] for n in names],
                                                [task["anchor"][n] for n in names])
            for names, (a, g) in task["kron"].items():
                delta = _matrix([named[n] for n in names]) - _matrix([task["anchor"][n] for n in names])
                # G ΔW A is the inverse-form product with the factors in place of their inverses.
                total = total + (ops.kfac_precondition_inverse(delta, g, a) * delta).sum()
        return 0.5 * self.lambda_ * total

    def memory_per_task(self) -> list[int]:
        """Bytes stored per consolidated task (Fisher + anchor)."""
        out = []
        for task in self.tasks:
            tensors = list(task["anchor"].values()) + list(task["diag"].values())
            tensors += [t for pair in task["kron"].values() for t in pair]
            out.append(sum(t.numel() * t.element_size() for t in tensors))
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Configuration and every task's Fisher and anchor."""
        return {"config": dict(lambda_=self.lambda_, mode=self.mode, gamma=self.gamma, fisher=self.fisher,
                               structure=self.structure, likelihood=self.likelihood),
                "tasks": [{"anchor": dict(t["anchor"]), "diag": dict(t["diag"]),
                           "kron": {"|".join(k): v for k, v in t["kron"].items()}} for t in self.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (λ and the other settings included)."""
        if "tasks" not in state or "config" not in state:
            raise ValueError("not an EWC state_dict (expected keys 'config' and 'tasks')")
        cfg = state["config"]
        self.lambda_, self.mode, self.gamma = cfg["lambda_"], cfg["mode"], cfg["gamma"]
        self.fisher, self.structure, self.likelihood = cfg["fisher"], cfg["structure"], cfg["likelihood"]
        self.tasks = [{"anchor": dict(t["anchor"]), "diag": dict(t["diag"]),
                       "kron": {tuple(k.split("|")): tuple(v) for k, v in t["kron"].items()}}
                      for t in state["tasks"]]


def _matrix(tensors: list[Tensor]) -> Tensor:
    """[weight, bias] as the [d_out, d_in (+1)] matrix K-FAC factors act on."""
    w = tensors[0].reshape(tensors[0].shape[0], -1)
    return torch.cat([w, tensors[1].reshape(-1, 1)], 1) if len(tensors) > 1 else w


def _weighted(old, new, n: int, seen: int):
    """Running mean over batches of tensors or (A, G) pairs."""
    if old is None:
        return new
    w = seen / (seen + n)
    if isinstance(new, tuple):
        return tuple(w * o + (1 - w) * v for o, v in zip(old, new))
    return w * old + (1 - w) * new


def _combine(old, new, gamma: float):
    """Online EWC: γ·F_old + F_new. Kronecker pairs are combined factor by factor with √γ each,
    (√γA + A')⊗(√γG + G') = γ A⊗G + A'⊗G' + √γ(A⊗G' + A'⊗G): the old term gets exactly γ, and the
    PSD cross terms make it a slight over-estimate (one Kronecker product per layer is kept)."""
    if isinstance(new, tuple):
        root = math.sqrt(gamma)
        return tuple(root * o + v for o, v in zip(old, new))
    return gamma * old + new


def _average_over_ranks(diag: dict, kron: dict, samples: int, group) -> None:
    """Sample-weighted mean of every rank's Fisher (in place), when torch.distributed runs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    count = torch.tensor([float(samples)], dtype=torch.float64)
    dist.all_reduce(count, group=group)
    weight = samples / float(count)
    tensors = list(diag.values()) + [t for pair in kron.values() for t in pair]
    for t in tensors:
        t.mul_(weight)
        dist.all_reduce(t, group=group)
