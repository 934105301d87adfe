r"""natgrad.EigenAdam: AdamW in a Kronecker eigenbasis (K-FAC's, or Shampoo's: SOAP)."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad import ops
from natgrad.curvature.block import CurvatureBlock, all_true, max_abs
from natgrad.curvature.estimator import CurvatureEstimator
from natgrad.curvature.kron import KroneckerBlock
from natgrad.curvature.refresh import warm_eigh
from natgrad.distributed.communicator import make_communicator
from natgrad.ops import eigenbasis as eb
from natgrad.ops.rules import Fault
from natgrad.optim._hyper import check_choice, check_group, check_number
from natgrad.optim._table import parameter_table
from natgrad.optim.grafting import make_grafting

__all__ = ["EigenAdam"]

STATE_KEY = "eigen_adam"  # the optimizer-level entry in state_dict()
BASES = ("kfac", "shampoo", "identity")
_NEVER_EXACT = 2 ** 62  # warm_refreshes=None: every refresh after the first is warm (SOAP)
_GROUP_BOUNDS: dict[str, dict[str, Any]] = {"lr": dict(low=0.0), "eps": dict(low=0.0), "weight_decay": dict(low=0.0)}


def _check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (expected a pair (beta1, beta2) in [0, 1))")
    for b in betas:
        check_number(name, b, low=0.0, high=1.0, high_open=True)


def _kronecker_only(block: CurvatureBlock) -> str | None:
    """The estimator's filter: only Kronecker blocks have an eigenbasis to run Adam in."""
    if isinstance(block, KroneckerBlock):
        return None
    return f"natgrad.KFAC's {block.description} has no Kronecker eigenbasis"


class EigenAdam(Optimizer):
    r"""AdamW in the Kronecker eigenbasis of each layer (SOAP, Vyas et al., 2024, with K-FAC's
    Fisher factors as the default basis).

    For each layer with a Kronecker block (the same coverage as :class:`natgrad.KFAC`: Linear,
    Conv1d/2d, Embedding, transformers' Conv1D; its weight and bias packed as
    :math:`\tilde W = [W, b]` of shape :math:`[d_g, d_a]`), let :math:`Q_G, Q_A` be orthonormal
    eigenbases of two Kronecker factors. Each step, with :math:`t` the layer's step count,

    .. math::
        g' = Q_G^\top \nabla\tilde W\, Q_A,\quad m \leftarrow \beta_1 m + (1-\beta_1) g',\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g'^{2},

        \tilde W \leftarrow (1-\eta\omega)\tilde W
            - \eta\, Q_G \Big[\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)}+\epsilon}\Big] Q_A^\top,

    i.e. AdamW (decoupled weight decay ω) run on the rotated gradient. The factors are

    * ``basis="kfac"`` (default): natgrad's Fisher factors :math:`A = \mathbb{E}[\tilde a\tilde
      a^\top]` and :math:`G = \mathbb{E}[gg^\top]`, captured by the same hooks, blocks and
      estimator as :class:`natgrad.KFAC` (EMA decay ``factor_decay``, every
      ``factor_update_period`` steps; a side larger than ``max_factor_dim`` block-diagonal);
    * ``basis="shampoo"``: the gradient's own factors :math:`L \leftarrow \beta L +
      (1-\beta)\nabla\tilde W\nabla\tilde W^\top`, :math:`R \leftarrow \beta R +
      (1-\beta)\nabla\tilde W^\top\nabla\tilde W` (β = ``shampoo_beta``), which makes it SOAP
      (a side larger than ``max_factor_dim`` is not rotated, as SOAP's ``max_precond_dim``);
    * ``basis="identity"``: no rotation, exactly torch.optim.AdamW with ``grafting=None`` (an
      ablation baseline).

    The bases are refreshed every ``basis_update_period`` steps (and at the first step after a
    layer first has factors) from the factors of the *earlier* steps, before this step's
    gradient enters them, as in SOAP: a gradient rotated into the eigenbasis of its own outer
    products is diagonal up to rounding, and Adam would blow that rounding up to full steps. The
    first refresh is an ``eigh``, the later ones one step of subspace iteration from the
    previous basis plus QR (SOAP's refresh; :func:`natgrad.curvature.refresh.warm_eigh`), every
    ``warm_refreshes + 1``-th one exact. Before a layer's first refresh (its first step) its
    basis is the identity: that step is AdamW's. Across a refresh (SOAP's rule,
    :mod:`natgrad.ops.eigenbasis`) the first moment is rotated into the new basis,
    :math:`m \leftarrow R_G^\top m R_A` with :math:`R = Q_\text{old}^\top Q_\text{new}` (exact:
    the same as keeping it in the weight's coordinates), and the second moment is not rotated:
    each eigenvector keeps the entry of the old eigenvector it overlaps most (a re-indexing when
    the refresh reorders them).

    Parameters outside every Kronecker block (norms, attention projections' own blocks,
    ``skip_modules``, parameters of other modules or added later by ``add_param_group``) get
    plain AdamW with the same hyperparameters. A block's hyperparameters are its first
    parameter's group's. :meth:`describe` lists each parameter's treatment.

    Grafting (default ``grafting="adam"``; :mod:`natgrad.optim.grafting`, the rule
    :class:`natgrad.KFAC` shares): each parameter's direction (the bracket above, rotated
    back) is rescaled to the norm of the grafted optimizer's step on its gradient (Adam's with
    the group's β₂ and ε, its second moment kept per parameter), so the eigenbasis sets the
    direction and Adam the step length, as Distributed Shampoo does. ``grafting=None`` is the
    plain rotated AdamW (SOAP).

    Cost per step and layer: four GEMMs (rotate, rotate back: ``d_g²d_a + d_g d_a²`` each way),
    plus the factor GEMMs ("kfac": natgrad.KFAC's; "shampoo": ``L`` and ``R``) and, every
    ``basis_update_period`` steps, one QR (or eigh) per side. On a 784-512-512-10 MLP at batch
    128 on one CPU thread that is about 9x an AdamW step, so it pays off in wall-clock only
    where it needs that many fewer steps (large batches, GPUs, expensive forward passes).

    Faults (natgrad.KFAC's policy): a layer whose gradient holds NaN/Inf, or (``"kfac"``) whose
    captured statistics do, keeps its parameters, moments and factors for the step; a warning
    names it once and :attr:`nonfinite_skips` counts.

    Example::

        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = natgrad.EigenAdam(model, lr=3e-3, weight_decay=0.01)   # Adam in K-FAC's eigenbasis
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        soap = natgrad.EigenAdam(model, basis="shampoo", grafting=None)  # SOAP

    Args:
        model (nn.Module): the model whose layers get blocks (hooked for ``basis="kfac"``).
        params (iterable, optional): parameters or param-group dicts (default:
            ``model.parameters()``). Per group: ``lr``, ``betas``, ``eps``, ``weight_decay``.
        lr (float): learning rate η (default: 3e-3).
        betas (tuple of float): β₁, β₂ in [0, 1) (default: (0.95, 0.95), SOAP's).
        eps (float): ε >= 0 (default: 1e-8).
        weight_decay (float): decoupled weight decay ω >= 0 (default: 0.01).
        basis (str): "kfac", "shampoo" or "identity" (default: "kfac").
        basis_update_period (int): steps between refreshes of the bases (default: 10).
        warm_refreshes (int or None): warm refreshes between exact ones; None: every refresh
            after the first is warm, as in SOAP (default: None).
        grafting (str or None): "adam", "sgd" or None (default: "adam": AdamW's learning rates
            carry over; without it the rotated step's norm differs from Adam's by a model-dependent
            factor, e.g. about 10x smaller on the harness's autoencoder).
        shampoo_beta (float or None): EMA decay of L and R, in [0, 1); None: β₂ (default: None).
        factor_decay (float): EMA decay of A and G ("kfac"), in [0, 1) (default: 0.95).
        factor_update_period (int): steps between updates of A and G ("kfac") (default: 1).
        linear_approx (str): "expand" or "reduce", as for natgrad.KFAC (default: "expand").
        factor_dtype (torch.dtype, optional): dtype of the factors and bases, float32 or
            float64 (default: the weight's, float32 for half precision).
        max_factor_dim (int or None): the largest factor side decomposed whole (default: 2048).
        skip_modules (iterable of str): module names whose parameters get plain AdamW.
    """

    def __init__(self, model: nn.Module, params: Iterable | None = None, *, lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8, weight_decay: float = 0.01,
                 basis: str = "kfac", basis_update_period: int = 10, warm_refreshes: int | None = None,
                 grafting: str | None = "adam", shampoo_beta: float | None = None, factor_decay: float = 0.95,
                 factor_update_period: int = 1, linear_approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, max_factor_dim: int | None = 2048,
                 skip_modules: Iterable[str] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            check_number(name, value, **_GROUP_BOUNDS[name])
        _check_betas("betas", betas)
        check_choice("basis", basis, BASES)
        check_number("basis_update_period", basis_update_period, low=1, integer=True)
        check_number("warm_refreshes", warm_refreshes, low=0, integer=True, allow_none=True)
        check_number("shampoo_beta", shampoo_beta, low=0.0, high=1.0, high_open=True, allow_none=True)
        check_number("factor_decay", factor_decay, low=0.0, high=1.0, high_open=True)
        check_number("factor_update_period", factor_update_period, low=1, integer=True)
        check_number("max_factor_dim", max_factor_dim, low=1, integer=True, allow_none=True)
        check_choice("linear_approx", linear_approx, ("expand", "reduce"))
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"Invalid factor_dtype: {factor_dtype!r} (expected torch.float32, torch.float64 or None)")
        self._grafting = make_grafting(grafting)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.basis, self.grafting = basis, grafting
        self.basis_update_period, self.warm_refreshes = basis_update_period, warm_refreshes
        self.shampoo_beta, self.factor_decay = shampoo_beta, factor_decay
        self.factor_update_period, self.max_factor_dim = factor_update_period, max_factor_dim
        self._steps = 0
        alive = weakref.WeakMethod(self._factor_step_now)  # the hooks must not keep self alive
        #: natgrad.KFAC's curvature estimator: blocks (the coverage), hooks ("kfac"), faults.
        self.estimator = CurvatureEstimator(
            model, [p for g in self.param_groups for p in g["params"]], make_communicator(1.0, True, 25.0, None),
            factor_step=lambda: (m := alive()) is not None and m(), skip_modules=skip_modules,
            linear_approx=linear_approx, factor_dtype=factor_dtype, max_factor_dim=max_factor_dim,
            block_filter=_kronecker_only)
        if self.estimator.communicator.world_size > 1:
            raise ValueError("natgrad.EigenAdam does not support torch.distributed yet")
        #: the rotated layers (Kronecker blocks), by name
        self.layers: dict[str, KroneckerBlock] = {b.name: b for b in self.estimator.blocks
                                                  if isinstance(b, KroneckerBlock)}
        self._layer_of = {id(p): b for b in self.layers.values() for p in b.params}
        #: each rotated layer's state: step, exp_avg, exp_avg_sq (rotated, packed), the basis
        #: they are in (g_basis, a_basis), and for "shampoo" L, R and their eigenvalues
        self.layer_state: dict[str, dict[str, Any]] = {}

    # ---- set-up ---------------------------------------------------------------------------------

    def _factor_step_now(self) -> bool:
        return self.basis == "kfac" and self._steps % self.factor_update_period == 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, with the value checks of ``__init__`` (ValueError naming the key)."""
        check_group(param_group, _GROUP_BOUNDS)
        if "betas" in param_group:
            _check_betas("betas", param_group["betas"])
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Removes the hooks on the model (``basis="kfac"`` then keeps its last bases)."""
        self.estimator.remove_hooks()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ---- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Performs one step; ``closure`` re-evaluates the loss (as in torch.optim). Returns its
        loss, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k, est = self._steps, self.estimator
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        due = k % self.basis_update_period == 0
        if self.basis == "kfac":  # the bases come from earlier steps' factors, never this gradient's own
            warm = _NEVER_EXACT if self.warm_refreshes is None else self.warm_refreshes
            est.update_decompositions(due, "eigen", lambda block: 0.0, False, warm)
        skipped: set[str] = set()
        if self._factor_step_now():
            skipped = est.update_factors(self.factor_decay, "mean") | est.read_factor_faults()
        else:
            est.clear()
        moving = [b for b in self.layers.values()
                  if b.name not in skipped and any(p.grad is not None for p in b.params)]
        grads = {b.name: b.pack([p.grad for p in b.params]) for b in moving}
        plain = [p for g in self.param_groups for p in g["params"]
                 if p.grad is not None and p.requires_grad and id(p) not in self._layer_of]
        finite = all_true([torch.isfinite(max_abs(grads[b.name])) for b in moving]
                          + [torch.isfinite(max_abs(cast(Tensor, p.grad))) for p in plain])
        layer_ok, plain_ok = finite[:len(moving)], finite[len(moving):]
        for b, ok in zip(moving, layer_ok):
            if not ok:
                est.ledger.fault(b.name, Fault.GRADIENTS)
        for p, ok in zip(plain, plain_ok):
            if not ok:
                est.ledger.fault(est.param_name(p), Fault.GRADIENTS, "parameter")
        moving = [b for b, ok in zip(moving, layer_ok) if ok]
        plain = [p for p, ok in zip(plain, plain_ok) if ok]
        directions: dict[Tensor, Tensor] = {}
        for b in moving:
            group = group_of[id(b.params[0])]
            state = self._layer(b, grads[b.name])
            if self.basis == "shampoo":
                if state["step"] > 0:  # factors from earlier gradients (SOAP's order)
                    self._shampoo_refresh(state, due)
                beta = group["betas"][1] if self.shampoo_beta is None else self.shampoo_beta
                eb.shampoo_factors_ema_(state["L"], state["R"], grads[b.name], beta)
            elif self.basis == "kfac":
                self._rebase(state, *self._kfac_basis(b))
            rotated = eb.rotate(grads[b.name], state["g_basis"], state["a_basis"])
            direction = eb.rotate_back(self._adam(state, rotated, group), state["g_basis"], state["a_basis"])
            for p, d in zip(b.params, b.unpack(direction)):
                if p.grad is not None and p.requires_grad:  # a frozen parameter never moves
                    directions[p] = d
        for p in plain:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            directions[p] = self._adam(state, cast(Tensor, p.grad), group_of[id(p)])
        if self._grafting is not None:
            grad_of = {p: cast(Tensor, p.grad) for p in directions}
            directions, _ = self._grafting.graft(
                directions, grad_of, self.state, {p: group_of[id(p)]["betas"][1] for p in directions},
                {p: group_of[id(p)]["eps"] for p in directions})
        for p, d in directions.items():
            group = group_of[id(p)]
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(d.to(p.dtype), alpha=-group["lr"])
        self._steps += 1
        return loss

    @staticmethod
    def _adam(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        """AdamW's moments and bias-corrected direction (before the learning rate)."""
        beta1, beta2 = group["betas"]
        state["step"] = int(state["step"]) + 1
        eb.adam_moments_(state["exp_avg"], state["exp_avg_sq"], grad.to(state["exp_avg"].dtype), beta1, beta2)
        return eb.adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"], beta1, beta2, group["eps"])

    def _layer(self, block: KroneckerBlock, grad: Tensor) -> dict[str, Any]:
        """The layer's state, created at its first step (identity basis)."""
        state = self.layer_state.get(block.name)
        if state is None:
            state = self.layer_state[block.name] = dict(
                step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad), g_basis=None, a_basis=None)
            if self.basis == "shampoo":
                limit = self.max_factor_dim or max(grad.shape)
                opts: dict[str, Any] = dict(dtype=block.factor_dtype, device=grad.device)
                for side, n in (("L", grad.shape[0]), ("R", grad.shape[1])):
                    state[side] = torch.zeros(n, n, **opts) if n <= limit else None
        return state

    @staticmethod
    def _rebase(state: dict[str, Any], g_basis: Tensor | None, a_basis: Tensor | None) -> None:
        """Carries the moments into a new basis, if it changed."""
        if g_basis is state["g_basis"] and a_basis is state["a_basis"]:
            return
        g_change = eb.basis_change(state["g_basis"], g_basis)
        a_change = eb.basis_change(state["a_basis"], a_basis)
        state["exp_avg"] = eb.rebase_first_moment(state["exp_avg"], g_change, a_change)
        state["exp_avg_sq"] = eb.rebase_second_moment(state["exp_avg_sq"], g_change, a_change)
        state["g_basis"], state["a_basis"] = g_basis, a_basis

    @staticmethod
    def _kfac_basis(block: KroneckerBlock) -> tuple[Tensor | None, Tensor | None]:
        """The block's current eigenbasis (identity before its first decomposition; an
        embedding's diagonal A: identity).
        """
        return block.state.get("g_eigenvectors"), block.state.get("a_eigenvectors")

    def _shampoo_refresh(self, state: dict[str, Any], due: bool) -> None:
        """The basis refreshed from Shampoo's factors when due (or first possible)."""
        if not due and "g_values" in state:
            return
        exact = "g_values" not in state
        if not exact and self.warm_refreshes is not None:
            exact = state.get("refreshes", 0) % (self.warm_refreshes + 1) == 0
        state["refreshes"] = state.get("refreshes", 0) + 1
        bases: list[Tensor | None] = []
        for side, key in (("L", "g"), ("R", "a")):
            factor = state[side]
            if factor is None:
                bases.append(None)
                continue
            if exact:
                values, vectors, _ = ops.damped_eigh(factor)
            else:
                values, vectors = warm_eigh(factor, state[f"{key}_values"], state[f"{key}_basis"])
            state[f"{key}_values"] = values
            bases.append(vectors)
        state.setdefault("g_values", None)
        self._rebase(state, bases[0], bases[1])

    # ---- introspection and checkpoints ------------------------------------------------------------

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """How many times each layer's (or parameter's) update was skipped for NaN/Inf."""
        return dict(self.estimator.ledger.faults)

    def _treatment(self, p: Tensor) -> str:
        block = self._layer_of.get(id(p))
        if block is None:
            return "AdamW: " + self.estimator.treatment(p).removeprefix("plain gradient: ")
        shape = f"[W, b] {block.g_dim()}x{block.a_dim()}" if block.bias is not None else \
            f"W {block.g_dim()}x{block.a_dim()}"
        if self.basis == "kfac":
            return f"Adam in the eigenbasis of {self.estimator.treatment(p)} ({shape})"
        if self.basis == "shampoo":
            return f"Adam in the Shampoo eigenbasis (SOAP) of {block.kind} {shape}"
        return f"AdamW ({block.kind} {shape}, basis='identity')"

    def describe(self) -> str:
        """A table of every optimized parameter and its treatment (the eigenbasis its layer's
        Adam runs in, or plain AdamW and why), in natgrad.KFAC's format.
        """
        return parameter_table([(self.estimator.param_name(p), "x".join(map(str, p.shape)) or "scalar",
                                 self._treatment(p)) for g in self.param_groups for p in g["params"]])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (plain AdamW moments, grafting moments, param groups) plus, under
        ``"eigen_adam"``, the step counter, each rotated layer's moments and basis (and Shampoo
        factors), the fault counts and, for ``basis="kfac"``, the estimator's blocks.
        """
        state = super().state_dict()
        curvature = self.estimator.state_dict("eigen") if self.basis == "kfac" else None
        state[STATE_KEY] = {"steps": self._steps, "basis": self.basis, "faults": dict(self.estimator.ledger.faults),
                            "layers": {name: dict(s) for name, s in self.layer_state.items()},
                            "curvature": curvature}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (tensors copied). Checked first (basis, layers,
        shapes): on error the optimizer is unchanged.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get(STATE_KEY), dict):
            raise ValueError(f"state_dict has no {STATE_KEY!r} dict entry: not saved by natgrad.EigenAdam")
        state_dict = dict(state_dict)
        mine = state_dict.pop(STATE_KEY)
        if mine.get("basis") != self.basis:
            raise ValueError(f"state_dict was saved with basis={mine.get('basis')!r}, this optimizer has "
                             f"basis={self.basis!r}")
        for name, layer in mine["layers"].items():
            block = self.layers.get(name)
            if block is None:
                raise ValueError(f"state_dict has moments for a layer this model lacks: {name!r}")
            want = (block.g_dim(), block.a_dim())
            if tuple(layer["exp_avg"].shape) != want:
                raise ValueError(f"state_dict: exp_avg of {name!r} has shape {tuple(layer['exp_avg'].shape)}, "
                                 f"the layer has {want} (was the model's width changed?)")
        if mine["curvature"] is not None:
            self.estimator.check_state_dict(mine["curvature"]["blocks"])
        super().load_state_dict(state_dict)
        self._steps = int(mine["steps"])
        self.estimator.ledger.faults = dict(mine["faults"])
        if mine["curvature"] is not None:
            self.estimator.load_state_dict(mine["curvature"])
        self.layer_state = {name: {k: v.clone() if isinstance(v, Tensor) else v for k, v in layer.items()}
                            for name, layer in mine["layers"].items()}
        if self.basis == "kfac":  # the moments' basis is the block's own (same values): share it
            for name, layer in self.layer_state.items():
                for key, current in zip(("g_basis", "a_basis"), self._kfac_basis(self.layers[name])):
                    if layer[key] is not None and current is not None and torch.equal(layer[key], current):
                        layer[key] = current

