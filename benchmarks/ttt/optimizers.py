"""The optimizers of the time-to-target harness, their search spaces, the quasi-random trial
sampler and the shared learning-rate schedule.

Every optimizer is wrapped in a :class:`Trainer` with one knob the protocol turns,
:meth:`Trainer.set_schedule` (the warmup+cosine factor of the run's progress), so that the
same schedule family reaches every optimizer, natgrad.KFAC's trust region included.

Search spaces (:data:`SPACES`, written into the JSON): log-uniform learning rate plus the
optimizer's one or two other key hyperparameters; the same space on every workload (the
autoencoder is trained on a per-pixel mean loss for that reason). Trials are points of a
scrambled Halton sequence (``scipy.stats.qmc.Halton``, fixed seed) mapped into the space.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# name -> {hyperparameter: (low, high, "log" | "linear")}. Everything not listed is fixed
# (FIXED below) at the optimizer's documented default.
SPACES: dict[str, dict[str, tuple[float, float, str]]] = {
    "SGD": {"lr": (1e-3, 1.0, "log"), "one_minus_momentum": (0.01, 0.2, "log")},
    "AdamW": {"lr": (2e-4, 2e-2, "log"), "weight_decay": (1e-4, 0.3, "log")},
    "Muon": {"lr": (2e-3, 0.1, "log"), "adamw_lr": (2e-4, 2e-2, "log")},
    "SOAP": {"lr": (2e-4, 2e-2, "log"), "one_minus_beta2": (0.005, 0.1, "log")},
    "natgrad.KFAC": {"lr": (0.03, 1.0, "log"), "damping": (1e-4, 0.1, "log"),
                     "kl_clip": (1e-4, 0.1, "log")},
    "natgrad.EKFAC": {"lr": (0.03, 1.0, "log"), "damping": (1e-4, 0.1, "log"),
                      "kl_clip": (1e-4, 0.1, "log")},
    "natgrad.EigenAdam": {"lr": (2e-4, 2e-2, "log"), "one_minus_beta2": (0.005, 0.1, "log")},
    "natgrad.EigenAdam-shampoo": {"lr": (2e-4, 2e-2, "log"), "one_minus_beta2": (0.005, 0.1, "log")},
    "natgrad.KFAC-adaptive": {"damping": (1e-3, 10.0, "log"), "kl_clip": (1e-4, 0.1, "log")},
    "kfac-pytorch": {"lr": (0.01, 1.0, "log"), "damping": (1e-4, 0.1, "log")},
}
FIXED: dict[str, dict[str, Any]] = {
    "SGD": {"nesterov": True, "weight_decay": 0.0},
    "AdamW": {"betas": (0.9, 0.999), "eps": 1e-8},
    "Muon": {"momentum": 0.95, "nesterov": True, "weight_decay": 0.1, "adjust_lr_fn": "original",
             "adamw": {"betas": (0.9, 0.999), "weight_decay": 0.01},
             "muon_params": "2-D weights of hidden Linear/Conv2d layers and attention in_proj "
                            "(conv filters flattened to [out, in*k*k]); AdamW for the input and "
                            "output layers, embeddings, biases and norm gains"},
    "SOAP": {"betas[0]": 0.95, "weight_decay": 0.01, "precondition_frequency": 10,
             "max_precondition_dim": 10000, "package": "pytorch-optimizer==4.1.0"},
    "natgrad.KFAC": {"momentum": 0.9, "factor_decay": 0.95, "factor_update_period": 1,
                     "inverse_update_period": 10, "inverse_method": "eigen",
                     "kl_clip_schedule": "kl_clip x factor^2 (the step bound follows the lr schedule)"},
    "natgrad.EKFAC": {"eigenvalue_correction": True, "momentum": 0.9, "factor_decay": 0.95,
                      "factor_update_period": 1, "inverse_update_period": 10, "inverse_method": "eigen",
                      "kl_clip_schedule": "kl_clip x factor^2 (the step bound follows the lr schedule)"},
    "natgrad.EigenAdam": {"basis": "kfac", "betas[0]": 0.95, "weight_decay": 0.01, "basis_update_period": 10,
                          "factor_decay": 0.95, "factor_update_period": 1, "eps": 1e-8, "grafting": "adam"},
    "natgrad.EigenAdam-shampoo": {"basis": "shampoo", "betas[0]": 0.95, "weight_decay": 0.01,
                                  "basis_update_period": 10, "shampoo_beta": "beta2", "eps": 1e-8,
                                  "grafting": "adam"},
    "natgrad.KFAC-adaptive": {"adaptive_learning_rate": True, "adaptive_momentum": True, "adaptive_period": 1,
                              "adaptive_damping": True, "damping_adaptation_interval": 5,
                              "damping_adaptation_decay": 0.95,
                              "likelihood": "the workload's loss (natgrad likelihood and nll_scale)",
                              "factor_decay": 0.95, "factor_update_period": 1,
                              "inverse_update_period": 10, "inverse_method": "eigen",
                              "lr_schedule": "none: lr is unused, the quadratic model of each batch chooses "
                                             "the learning rate and momentum; kl_clip bounds the chosen step's "
                                             "quadratic form under the exact Fisher",
                              "damping": "the initial damping is tuned; Levenberg-Marquardt adapts it every 5 "
                                         "steps from the batch's loss re-evaluated after the update (on the clock)"},
    "kfac-pytorch": {"factor_update_steps": 1, "inv_update_steps": 10, "factor_decay": 0.95,
                     "kl_clip": 0.001, "inner optimizer": "SGD momentum 0.9"},
}
OPTIMIZERS = ("SGD", "AdamW", "Muon", "SOAP", "natgrad.KFAC", "natgrad.EKFAC", "natgrad.KFAC-adaptive",
              "natgrad.EigenAdam", "natgrad.EigenAdam-shampoo", "kfac-pytorch")
# The error pip gave on this machine (recorded, not faked): kfac-pytorch is not on its index.
KFAC_PYTORCH_INSTALL_ERROR = (
    "pip install kfac-pytorch: ERROR: Could not find a version that satisfies the requirement "
    "kfac-pytorch (from versions: none); ERROR: No matching distribution found for kfac-pytorch")


def workload_reason(name: str, likelihood: str | None) -> str | None:
    """Why optimizer ``name`` does not run on a workload whose loss is ``likelihood`` (None: it
    does): the adaptive learning rate needs the loss's closed-form output Fisher."""
    if name == "natgrad.KFAC-adaptive" and likelihood is None:
        return "its quadratic model needs the loss's closed-form output Fisher, which natgrad lacks for this loss"
    return None


def unavailable_reason(name: str) -> str | None:
    """Why optimizer ``name`` cannot run here (None when it can)."""
    if name == "SOAP" and importlib.util.find_spec("pytorch_optimizer") is None:
        return "pytorch-optimizer is not installed (requirements-peers.txt pins 4.1.0)"
    if name == "kfac-pytorch" and importlib.util.find_spec("kfac") is None:
        return KFAC_PYTORCH_INSTALL_ERROR
    return None


# ---- trial sampler ----------------------------------------------------------------------------

def unit_points(n: int, dims: int, seed: int = 0) -> list[list[float]]:
    """``n`` points of a scrambled Halton sequence in [0, 1)^dims (deterministic in ``seed``)."""
    from scipy.stats import qmc

    return qmc.Halton(d=dims, scramble=True, seed=seed).random(n).tolist()


def to_space(u: list[float], space: dict[str, tuple[float, float, str]]) -> dict[str, float]:
    """Maps a unit point into ``space`` (log-uniform or uniform per dimension)."""
    out = {}
    for ui, (name, (lo, hi, kind)) in zip(u, space.items()):
        if kind == "log":
            out[name] = float(math.exp(math.log(lo) + ui * (math.log(hi) - math.log(lo))))
        else:
            out[name] = float(lo + ui * (hi - lo))
    return out


def sample_trials(name: str, n: int, seed: int = 0) -> list[dict[str, float]]:
    """The ``n`` trial hyperparameters of optimizer ``name`` (the same for a given seed)."""
    space = SPACES[name]
    return [to_space(u, space) for u in unit_points(n, len(space), seed)]


# ---- schedule ---------------------------------------------------------------------------------

WARMUP_FRACTION = 0.05


def schedule_factor(progress: float, warmup: float = WARMUP_FRACTION) -> float:
    """Linear warmup over the first ``warmup`` of the budget (from 1% of the peak), then cosine
    decay to 0 at the end; ``progress`` = training time so far / budget."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return max(p / warmup, 0.01)
    return 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))


# ---- trainers ---------------------------------------------------------------------------------

class Trainer:
    """Optimizers behind one interface: ``zero_grad``, ``step``, ``set_schedule(factor)``. With
    ``closure_step`` the loop hands ``step`` a closure (zero_grad, loss, backward) instead of
    running it first: the optimizer evaluates the batch's loss itself, and again after its update
    (natgrad.KFAC's Levenberg–Marquardt damping)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], before_step: Callable[[], None] | None = None,
                 closure_step: bool = False):
        self.optimizers = optimizers
        self.before_step = before_step
        self.closure_step = closure_step
        self.base = [[g["lr"] for g in o.param_groups] for o in optimizers]
        self.factor = 1.0

    def set_schedule(self, factor: float) -> None:
        self.factor = factor
        for o, base in zip(self.optimizers, self.base):
            for g, lr in zip(o.param_groups, base):
                g["lr"] = lr * factor

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if self.before_step is not None:
            self.before_step()
        if closure is not None:
            (only,) = self.optimizers
            return only.step(closure)
        for o in self.optimizers:
            o.step()
        return None


def muon_split(model: nn.Module, io_modules: tuple[str, ...]
               ) -> tuple[list[tuple[nn.Parameter, nn.Parameter]], list[nn.Parameter]]:
    """(hidden matrices as (parameter, 2-D view) pairs, the rest) per torch.optim.Muon's docs:
    hidden Linear/Conv2d weights and attention in_proj weights go to Muon (conv filters viewed
    as [out, in*k*k] on the same storage, as in the reference implementation); everything else
    (input and output layers, embeddings, biases, norm gains) goes to AdamW."""
    hidden: list[nn.Parameter] = []
    for name, mod in model.named_modules():
        if name in io_modules:
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            hidden.append(mod.weight)
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            hidden.append(mod.in_proj_weight)
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    pairs = [(p, p if p.dim() == 2 else nn.Parameter(p.data.view(p.shape[0], -1))) for p in hidden]
    return pairs, rest


def make_trainer(name: str, model: nn.Module, hp: dict[str, float], io_modules: tuple[str, ...] = (),
                 kfac_kwargs: dict[str, Any] | None = None,
                 likelihood: tuple[str | None, float] = ("categorical", 1.0)) -> Trainer:
    """Optimizer ``name`` on ``model`` with trial hyperparameters ``hp`` (see :data:`SPACES`,
    :data:`FIXED`)."""
    if name == "SGD":
        return Trainer([torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=1 - hp["one_minus_momentum"],
                                        nesterov=True)])
    if name == "AdamW":
        return Trainer([torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])])
    if name == "Muon":
        pairs, rest = muon_split(model, io_modules)
        f = FIXED["Muon"]
        muon = torch.optim.Muon([v for _, v in pairs], lr=hp["lr"], momentum=f["momentum"], nesterov=True,
                                weight_decay=f["weight_decay"], adjust_lr_fn=f["adjust_lr_fn"])
        adamw = torch.optim.AdamW(rest, lr=hp["adamw_lr"], **f["adamw"])
        views = [(p, v) for p, v in pairs if v is not p]

        def share_grads() -> None:  # conv filters: the 2-D view gets the 4-D gradient's view
            for p, v in views:
                v.grad = None if p.grad is None else p.grad.view(v.shape)
        return Trainer([muon, adamw], share_grads if views else None)
    if name == "SOAP":
        from pytorch_optimizer import SOAP

        f = FIXED["SOAP"]
        return Trainer([SOAP(model.parameters(), lr=hp["lr"], betas=(f["betas[0]"], 1 - hp["one_minus_beta2"]),
                             weight_decay=f["weight_decay"], precondition_frequency=f["precondition_frequency"],
                             max_precondition_dim=f["max_precondition_dim"])])
    if name in ("natgrad.KFAC", "natgrad.EKFAC"):
        return _natgrad_kfac(name, model, hp, kfac_kwargs or {})
    if name in ("natgrad.EigenAdam", "natgrad.EigenAdam-shampoo"):
        import natgrad

        f = FIXED[name]
        return Trainer([natgrad.EigenAdam(model, lr=hp["lr"], betas=(f["betas[0]"], 1 - hp["one_minus_beta2"]),
                                          weight_decay=f["weight_decay"], basis=f["basis"],
                                          basis_update_period=f["basis_update_period"], grafting=f["grafting"])])
    if name == "natgrad.KFAC-adaptive":
        return _natgrad_kfac_adaptive(model, hp, kfac_kwargs or {}, likelihood)
    if name == "kfac-pytorch":
        return _kfac_pytorch(model, hp)
    raise ValueError(f"unknown optimizer {name!r}")


def _natgrad_kfac(name: str, model: nn.Module, hp: dict[str, float], kfac_kwargs: dict[str, Any]) -> Trainer:
    """natgrad.KFAC, or EKFAC (``eigenvalue_correction=True``) for "natgrad.EKFAC"."""
    import natgrad

    f = FIXED[name]
    holder: dict[str, Trainer] = {}
    kappa = hp["kl_clip"]
    # While the trust region binds, the step length is set by kl_clip, not lr: the bound on the
    # squared step follows the schedule (kl_clip x factor^2), so the schedule shapes every step.
    opt = natgrad.KFAC(model, lr=hp["lr"], damping=hp["damping"],
                       kl_clip=lambda _step: kappa * max(holder["t"].factor, 1e-6) ** 2,
                       momentum=f["momentum"], factor_decay=f["factor_decay"],
                       factor_update_period=f["factor_update_period"],
                       inverse_update_period=f["inverse_update_period"],
                       inverse_method=f["inverse_method"],
                       eigenvalue_correction=f.get("eigenvalue_correction", False), **kfac_kwargs)
    holder["t"] = Trainer([opt])
    return holder["t"]


def _natgrad_kfac_adaptive(model: nn.Module, hp: dict[str, float], kfac_kwargs: dict[str, Any],
                           likelihood: tuple[str | None, float]) -> Trainer:
    """natgrad.KFAC with Martens & Grosse's adaptive learning rate and momentum (kfac-jax's
    example defaults) under the workload's ``(likelihood, nll_scale)``: only the damping is
    tuned; the schedule's lr factor has nothing to scale."""
    import natgrad

    words = ("lr_schedule", "likelihood", "damping")  # descriptions, not arguments
    f = {k: v for k, v in FIXED["natgrad.KFAC-adaptive"].items() if k not in words}
    name, scale = likelihood
    return Trainer([natgrad.KFAC(model, damping=hp["damping"], kl_clip=hp["kl_clip"], likelihood=name,
                                 nll_scale=scale, **f, **kfac_kwargs)], closure_step=True)


def _kfac_pytorch(model: nn.Module, hp: dict[str, float]) -> Trainer:  # pragma: no cover
    """kfac-pytorch's KFACPreconditioner in front of SGD (its documented use). Not installable
    on this machine (:data:`KFAC_PYTORCH_INSTALL_ERROR`), so this adapter has never run here."""
    from kfac.preconditioner import KFACPreconditioner

    f = FIXED["kfac-pytorch"]
    sgd = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=0.9)
    pre = KFACPreconditioner(model, factor_update_steps=f["factor_update_steps"],
                             inv_update_steps=f["inv_update_steps"], damping=hp["damping"],
                             factor_decay=f["factor_decay"], kl_clip=f["kl_clip"],
                             lr=lambda _step: sgd.param_groups[0]["lr"])
    return Trainer([sgd], pre.step)


@dataclass
class Spec:
    """What the JSON says about one optimizer."""

    name: str
    space: dict[str, tuple[float, float, str]]
    fixed: dict[str, Any]
    schedule: str = (f"linear warmup over the first {WARMUP_FRACTION:.0%} of the CPU-time budget, "
                     "then cosine decay to 0 at the budget (factor of the training CPU time spent)")


def spec(name: str) -> dict[str, Any]:
    """The search space, fixed settings and schedule of ``name``, JSON-ready."""
    s = Spec(name, SPACES[name], FIXED[name])
    return {"space": {k: {"low": lo, "high": hi, "scale": kind} for k, (lo, hi, kind) in s.space.items()},
            "fixed": s.fixed, "schedule": s.schedule}
