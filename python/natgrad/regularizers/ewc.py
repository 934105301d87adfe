"""natgrad.EWC: elastic weight consolidation with a per-sample Fisher (Kirkpatrick et al., 2017),
online EWC (Schwarz et al., 2018) and the Kronecker-factored Laplace penalty (Ritter et al., 2018).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad._vocabulary import _UNSET, FISHER_TYPES, check_choice, renamed_argument
from natgrad.curvature import (
    CurvatureBlock,
    capturing,
    kind_of,
    make_block,
    owner_groups,
    parameter_owners,
    parameter_users,
)
from natgrad.fisher.compute import compute_fisher
from natgrad.fisher.matrices import BlockDiagonalFisher, BlockFisher
from natgrad.fisher.scores import check_inputs
from natgrad.likelihoods import check_count, get_likelihood

__all__ = ["EWC"]

MODES = ("separate", "online")
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
    from the data term only (the penalty does not pass through the layers' outputs). Call
    :meth:`attach` once so that K-FAC preconditions with ``F_task + λ·F_old + damping`` (the
    curvature of the penalized loss): λ can then be as large as forgetting needs.

    Bad input never reaches the stored Fisher: :meth:`consolidate` raises ValueError naming the
    task and what was not finite (inputs, targets or the resulting Fisher) and leaves this
    object unchanged.

    Args:
        model (nn.Module): the model (its trainable named parameters are consolidated).
        lambda_ (float): λ >= 0 (default: 1.0).
        mode (str): "separate" or "online" (default: "separate").
        gamma (float): decay γ in [0, 1] of the online Fisher (default: 1.0).
        fisher_type (str): "empirical", "mc" or "exact" (default: "empirical"); ``fisher`` is
            its deprecated spelling.
        structure (str): "diagonal" or "kfac" (the K-FAC blocks natgrad.KFAC uses for Linear,
            Conv2d and Embedding layers; other parameters diagonal) (default: "diagonal").
        likelihood (str): "categorical" or "gaussian" (default: "categorical").
        train_mode (bool): estimate in training mode (default: False).
        mc_samples (int): label draws per sample for ``fisher_type="mc"`` (default: 1).
        process_group (ProcessGroup, optional): with torch.distributed initialised, each rank passes its shard of the
            task's data to :meth:`consolidate` and the Fisher is the sample-weighted mean over
            ranks (default: the world group).
    """

    def __init__(self, model: nn.Module, lambda_: float = 1.0, *, mode: str = "separate",
                 gamma: float = 1.0, fisher_type: str = _UNSET, structure: str = "diagonal",
                 likelihood: str = "categorical", train_mode: bool = False, mc_samples: int = 1,
                 process_group=None, fisher: str = _UNSET) -> None:
        fisher_type = renamed_argument("fisher_type", fisher_type, "fisher", fisher, "empirical", "natgrad.EWC")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        for name, value in (("lambda_", lambda_), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Invalid {name}: {value!r} (expected a number)")
        if not isinstance(mode, str):
            raise ValueError(f"Invalid mode: {mode!r} (expected one of 'separate', 'online')")
        torch.ops.natgrad.ewc_check_options(float(lambda_), float(gamma), mode, "lambda_")
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        check_choice("structure", structure, STRUCTURES)
        get_likelihood(likelihood)
        check_count("mc_samples", mc_samples)
        if not isinstance(train_mode, bool):
            raise ValueError(f"Invalid train_mode: {train_mode!r} (expected True or False)")
        self.model, self.lambda_, self.mode, self.gamma = model, float(lambda_), mode, float(gamma)
        self.fisher_type, self.structure, self.likelihood = fisher_type, structure, likelihood
        self.train_mode, self.mc_samples = train_mode, mc_samples
        self.process_group = process_group
        self.tasks: list[dict[str, Any]] = []  # per task: {"anchor", "diag", "kron"}
        self.revision = 0  # bumped whenever the stored Fisher changes (attached optimizers refresh)

    @property
    def fisher(self) -> str:
        """Deprecated spelling of :attr:`fisher_type`."""
        return self.fisher_type

    # ---- estimation -------------------------------------------------------------------------------

    def consolidate(self, data: Iterable | Tensor, targets: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Estimates the Fisher on a task's data at the current parameters and stores it.

        Args:
            data: an iterable of ``(inputs, targets)`` batches (e.g. a DataLoader), or an input
                tensor with ``targets`` given separately.
            targets (Tensor, optional): labels when ``data`` is a tensor (needed for
                ``fisher_type="empirical"``).
            generator (torch.Generator, optional): for ``fisher_type="mc"``.
        """
        task_no = len(self.tasks) if self.mode == "separate" else 0
        where = f"EWC.consolidate (task {task_no})"
        if not isinstance(data, Tensor) and targets is not None:
            raise TypeError(f"{where}: data must be an input tensor when targets are given, got "
                            f"{type(data).__name__}")
        batches = [(data, targets)] if isinstance(data, Tensor) else list(data)
        for i, batch in enumerate(batches):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"{where}: data must be an input tensor or an iterable of (inputs, "
                                f"targets) batches; batch {i} is a {type(batch).__name__}")
        if not batches or sum(len(x) for x, _ in batches) == 0:
            raise ValueError(f"{where}: data holds no samples")
        for i, (x, y) in enumerate(batches):
            try:
                check_inputs(x, y if self.fisher_type == "empirical" else None)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}, batch {i}: {err}") from None
        was_training = self.model.training
        self.model.train(self.train_mode)
        try:
            diag: dict[str, Tensor] = {}
            kron: dict[tuple[str, ...], CurvatureBlock] = {}
            total = 0
            for x, y in batches:
                d, k = self._estimate(x, y, generator)
                n = len(x)
                for key, value in d.items():
                    diag[key] = torch.ops.natgrad.ewc_running_mean(diag.get(key), value, n, total)
                for key, block in k.items():
                    if key in kron:
                        _weighted_factors(kron[key], block, n, total)
                    else:
                        kron[key] = block
                total += n
        finally:
            self.model.train(was_training)
        _average_over_ranks(list(diag.values()) + [t for b in kron.values() for t in b.factors().values()],
                            total, self.process_group)
        bad = [n for n, t in diag.items() if not bool(torch.isfinite(t).all())]
        bad += [b.name for b in kron.values() if not all(bool(torch.isfinite(t).all()) for t in b.factors().values())]
        if bad:
            raise ValueError(f"{where}: the Fisher of {bad} is not finite (NaN/Inf gradients at "
                             "the current parameters?); nothing was stored")
        anchor = {n: p.detach().clone() for n, p in self._named_params().items()}
        task = {"anchor": anchor, "diag": diag, "kron": kron}
        if self.mode == "online" and self.tasks:
            old = self.tasks[0]
            for key, value in diag.items():
                if key in old["diag"]:
                    diag[key] = torch.ops.natgrad.ewc_online_merge(self.gamma, old["diag"][key], value)
            root = math.sqrt(self.gamma)
            for key, block in kron.items():
                if key in old["kron"]:
                    for name, prev in old["kron"][key].factors().items():
                        block.state[name] = root * prev + block.state[name]
            self.tasks = [task]
        else:
            self.tasks.append(task)
        self.revision += 1

    def _named_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _estimate(self, x: Tensor, y: Tensor | None, generator) -> tuple[dict, dict]:
        named = self._named_params()
        kwargs: dict[str, Any] = dict(fisher_type=self.fisher_type, likelihood=self.likelihood,
                                      mc_samples=self.mc_samples, generator=generator)
        if self.structure == "diagonal":
            return self._diagonal(x, y, named, kwargs), {}
        names, params = list(named), list(named.values())
        fisher = cast(BlockDiagonalFisher, compute_fisher(self.model, x, y, structure="kfac", params=params, **kwargs))
        diag, kron = {}, {}
        for block, (_, _, idx) in zip(fisher.blocks, owner_groups(self.model, params)):
            if isinstance(block, BlockFisher):
                kron[tuple(names[i] for i in idx)] = block.block
                continue
            flat = block.diagonal()
            for i in idx:
                diag[names[i]] = flat[:params[i].numel()].view_as(params[i])
                flat = flat[params[i].numel():]
        return diag, kron

    def _diagonal(self, x, y, named, kwargs) -> dict[str, Tensor]:
        """Per-sample diagonal Fisher: layers whose kind has one (Linear) by the capture hooks +
        the C++ op, the rest by torch.func per-sample gradients (among them a tied weight, whose
        gradient sums every module that uses it: one layer's hooks see only its own use).
        """
        lik = get_likelihood(self.likelihood)
        users = parameter_users(self.model)
        kinds = {name: k for name, m in self.model.named_modules()
                 if (k := kind_of(m)) is not None and k.has_diagonal_fisher
                 and all(p.requires_grad and len(users[id(p)]) == 1 for p in m.parameters(recurse=False))}
        linear = {name: m for name, m in self.model.named_modules() if name in kinds}
        diag: dict[str, list[Tensor]] = {}
        with capturing(linear) as captures, torch.enable_grad():
            out = self.model(x)
            used = [n for n in linear if len(captures[n].records) == 1]  # called once: per-sample rows
            passes = lik.pseudo_targets(out, self.fisher_type, y, self.mc_samples, kwargs["generator"])
            outputs = [cast(Tensor, captures[n].records[0].output) for n in used]  # set by the forward hook
            for target, weight in passes:
                grads = torch.autograd.grad(lik.weighted_nll(out, target, weight), outputs, retain_graph=True)
                for name, g in zip(used, grads):
                    x_in = captures[name].records[0].input
                    if bool(torch.isfinite(x_in).all()) and bool(torch.isfinite(g).all()):
                        d = kinds[name].diagonal_fisher(linear[name], x_in, g.detach())
                    else:  # the op refuses NaN/Inf: a NaN Fisher, which consolidate rejects for every structure
                        d = [torch.full_like(p, math.nan) for p in linear[name].parameters(recurse=False)]
                    diag[name] = [a + b for a, b in zip(diag[name], d)] if name in diag else d
        out_diag: dict[str, Tensor] = {}
        for name in used:
            for key, part in zip(("weight", "bias"), diag[name]):
                out_diag[f"{name}.{key}" if name else key] = part.contiguous()
        rest = [n for n in named if n not in out_diag]
        if rest:
            f = compute_fisher(self.model, x, y, structure="diagonal", params=[named[n] for n in rest], **kwargs)
            flat = f.diagonal()
            for n in rest:
                out_diag[n] = flat[:named[n].numel()].view_as(named[n])
                flat = flat[named[n].numel():]
        return out_diag

    # ---- the penalty --------------------------------------------------------------------------------

    def penalty(self) -> Tensor:
        """``(λ/2) Σ_tasks Σ F (θ − θ*)²`` (or the Kronecker form), differentiable w.r.t. the
        model's parameters. Zero (a 0-dim tensor) before any consolidation. For finite
        parameters it is never NaN: a sum that overflows is ``+inf``.
        """
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
            for names, block in task["kron"].items():
                total = total + _quad_form(block, [named[n] - task["anchor"][n] for n in names])
        return 0.5 * self.lambda_ * total

    def attach(self, optimizer, approximation: str = "auto"):
        """Makes natgrad.KFAC ``optimizer`` precondition with the curvature of the penalized
        objective, ``F_task + λ·F_old + damping``, on every Linear/Conv2d layer (see
        :mod:`natgrad.regularizers.ewc_curvature` for the approximations). Consolidations and
        changes of :attr:`lambda_` made later are picked up at the next step.

        Args:
            optimizer (natgrad.KFAC): an optimizer of this EWC's model.
            approximation (str): "auto", "generalized" (Kronecker EWC) or "eigenbasis"
                (default: "auto": "generalized" for ``structure="kfac"``, "eigenbasis" for
                diagonal EWC).

        Returns:
            EWCCurvature: call its ``detach()`` to restore plain K-FAC preconditioning.
        """
        from natgrad.regularizers.ewc_curvature import EWCCurvature

        return EWCCurvature(self, optimizer, approximation)

    def memory_per_task(self) -> list[int]:
        """Bytes stored per consolidated task (Fisher + anchor)."""
        out = []
        for task in self.tasks:
            tensors = list(task["anchor"].values()) + list(task["diag"].values())
            tensors += [t for block in task["kron"].values() for t in block.factors().values()]
            out.append(sum(t.numel() * t.element_size() for t in tensors))
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Configuration and every task's Fisher and anchor."""
        return {"config": dict(lambda_=self.lambda_, mode=self.mode, gamma=self.gamma,
                               fisher_type=self.fisher_type, structure=self.structure,
                               likelihood=self.likelihood),
                "tasks": [{"anchor": dict(t["anchor"]), "diag": dict(t["diag"]),
                           "kron": {"|".join(k): tuple(b.factors().values()) for k, b in t["kron"].items()}}
                          for t in self.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (λ and the other settings included); checkpoints
        of the previous release (``fisher`` in the config) load too.
        """
        if "tasks" not in state or "config" not in state:
            raise ValueError("not an EWC state_dict (expected keys 'config' and 'tasks')")
        cfg = state["config"]
        by_id = parameter_owners(self.model)
        owners = {n: by_id.get(id(p)) for n, p in self.model.named_parameters()}
        tasks = [{"anchor": dict(t["anchor"]), "diag": dict(t["diag"]),
                  "kron": {tuple(k.split("|")): self._block(tuple(k.split("|")), v, owners)
                           for k, v in t["kron"].items()}}
                 for t in state["tasks"]]
        for i, task in enumerate(tasks):
            for part in ("anchor", "diag"):
                bad = [n for n, t in task[part].items()
                       if not (isinstance(t, Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all()))]
                if bad:
                    raise ValueError(f"EWC state_dict: task {i} {part} of {bad} must be finite "
                                     "floating-point tensors (NaN/Inf or not a tensor)")
        self.lambda_, self.mode, self.gamma = cfg["lambda_"], cfg["mode"], cfg["gamma"]
        self.fisher_type = cfg.get("fisher_type", cfg.get("fisher"))
        self.structure, self.likelihood = cfg["structure"], cfg["likelihood"]
        self.tasks = tasks
        self.revision += 1

    def _block(self, names: tuple[str, ...], factors, owners: dict) -> CurvatureBlock:
        """The curvature block of the layer owning ``names`` (``owners``: parameter name ->
        ``(module name, module)``, a tied weight's by the registry's rule), holding the saved factors.
        """
        owner = owners.get(names[0])
        block = None if owner is None else make_block(owner[0], owner[1])
        if block is None:
            raise ValueError(f"EWC state_dict: no K-FAC layer owns {list(names)} in this model")
        block.load_state_dict({"kind": block.kind, "A": factors[0], "G": factors[1]})
        return block


def _quad_form(block: CurvatureBlock, vectors: list[Tensor]) -> Tensor:
    """``vᵀ F v`` of a consolidated block, never NaN for finite ``v``: ``v`` is scaled by a power
    of two ``s`` with ``max |v/s| <= 1`` (no intermediate overflow against finite factors), the
    form of ``v/s`` is clamped at 0 (F is PSD) and times ``s²`` in float64 overflows to +inf.
    """
    peak = max(float(v.detach().abs().max()) if v.numel() else 0.0 for v in vectors)
    if not math.isfinite(peak):  # NaN/Inf parameters: the form is as non-finite as they are
        return block.quad_form(vectors)
    exp = math.frexp(peak)[1] if peak > 0 else 0
    half, rest = math.ldexp(1.0, -(exp // 2)), math.ldexp(1.0, -(exp - exp // 2))  # each representable
    small = block.quad_form([v * half * rest for v in vectors]).clamp_min(0)
    big = small.to(torch.float64) / half / half / rest / rest
    return torch.where(small > 0, big, torch.zeros_like(big)).to(small.dtype)


def _weighted_factors(acc: CurvatureBlock, new: CurvatureBlock, n: int, seen: int) -> None:
    """Running mean over batches of a block's factors (into ``acc``)."""
    for name, value in new.factors().items():
        acc.state[name] = torch.ops.natgrad.ewc_running_mean(acc.state[name], value, n, seen)


def _average_over_ranks(tensors: list[Tensor], samples: int, group) -> None:
    """Sample-weighted mean of every rank's Fisher (in place), when torch.distributed runs."""
    import torch.distributed as dist

    from natgrad.distributed import collective, group_device

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    count = torch.tensor([float(samples)], dtype=torch.float64, device=group_device(group))
    collective(dist.all_reduce, count, group=group)
    weight = samples / float(count)
    for t in tensors:
        t.mul_(weight)
        collective(dist.all_reduce, t, group=group)
