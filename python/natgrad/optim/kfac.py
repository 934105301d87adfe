r"""natgrad.KFAC: Kronecker-factored approximate curvature as a torch.optim.Optimizer."""
from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad.curvature import GradientPhase, KronBlock, LayerCapture, make_block, unsupported_reason
from natgrad.distributed.communicator import make_communicator
from natgrad.optim._hyper import Schedule, check_choice, check_number, resolved_number
from natgrad.optim._sampling import LIKELIHOODS, sampled_nll

__all__ = ["KFAC"]

STATE_KEY = "kfac"  # the optimizer-level entry in state_dict()
_GROUP_DEFAULTS = ("lr", "momentum", "weight_decay", "damping")


class KFAC(Optimizer):
    r"""K-FAC (Martens & Grosse, 2015; KFC for convolutions, Grosse & Martens, 2016).

    Each supported layer's Fisher block is approximated as :math:`F_\ell \approx A_\ell \otimes
    G_\ell` with :math:`A = \mathbb{E}[\tilde a \tilde a^\top]` (inputs, bias as a ones column)
    and :math:`G = \mathbb{E}[g g^\top]` (per-sample output gradients), both running averages
    :math:`X \leftarrow \rho X + (1-\rho) \hat X` refreshed every ``factor_update_period`` steps.
    Every ``inverse_update_period`` steps the factors are eigendecomposed (or inverted) through
    the ops' fallback ladder. Each step then computes, per layer,

    .. math::
        u_\ell = (A_\ell \otimes G_\ell + \gamma I)^{-1} \nabla_{W_\ell} L
               = V_G\,[(V_G^\top \nabla W V_A) \oslash (\lambda_G \lambda_A^\top + \gamma)]\,V_A^\top,

    (or the π-corrected factored damping), scales all directions by the KL trust region
    :math:`\nu = \min(1, \sqrt{\kappa / \sum_\ell \eta^2 \langle u_\ell, \nabla_\ell\rangle})`,
    adds weight decay and heavy-ball momentum, and steps
    :math:`\theta \leftarrow \theta - \eta\, b`, :math:`b \leftarrow \mu b + \nu u + \omega\theta`.

    Parameters outside supported layers (LayerNorm/BatchNorm affine, grouped convolutions,
    parameters used functionally, layers whose hooks never fired) use the plain gradient in
    place of :math:`u` (same trust region, momentum and weight decay); :meth:`describe` lists
    the treatment of every parameter.

    The standard loop ``loss.backward(); opt.step()`` uses the empirical Fisher. With
    ``fisher_type="mc"`` add one line after the forward pass, ``opt.sample_fisher(output)``,
    which back-propagates labels sampled from the model (categorical or Gaussian) into the G
    factors without touching ``.grad``.

    Args:
        model (nn.Module): the model whose layers are hooked.
        params (iterable, optional): parameters or param-group dicts as for torch.optim (default:
            ``model.parameters()``). Per group: ``lr``, ``momentum``, ``weight_decay``,
            ``damping``.
        lr (float): learning rate η (default: 0.01).
        momentum (float): heavy-ball momentum μ in [0, 1) (default: 0.9).
        weight_decay (float): ω, added to the preconditioned direction (default: 0).
        damping (float or Callable[[int], float]): γ > 0 (default: 1e-3).
        factor_decay (float): EMA decay ρ of the factors in [0, 1) (default: 0.95).
        factor_update_period (int or Callable[[int], int]): steps between factor updates
            (default: 1).
        inverse_update_period (int or Callable[[int], int]): steps between decompositions
            (default: 10).
        kl_clip (float, Callable[[int], float] or None): trust-region size κ; None disables it
            (default: 1e-3).
        inverse_method (str): "eigen" (eigenbasis, exact damping) or "inverse" (damped Cholesky
            inverses; damping enters only at inverse updates) (default: "eigen").
        pi_correction (bool): factored, π-corrected damping (default: False).
        adaptive_damping (bool): Levenberg–Marquardt adaptation of γ from the reduction ratio
            when ``step`` gets a closure (the closure is then evaluated a second time, after the
            update, every ``damping_adaptation_interval`` steps) (default: False).
        damping_adaptation_interval (int): steps between adaptations (default: 5).
        damping_adaptation_decay (float): ω₁ in (0, 1); γ is multiplied by ω₁^interval when the
            ratio exceeds 3/4 and divided by it below 1/4 (default: 0.95).
        fisher_type (str): "empirical" or "mc" (default: "empirical").
        loss_reduction (str): "mean" if the gradient the optimizer sees is the mean over the
            step's samples (also across accumulated micro-batches), "sum" if it is the sum
            (default: "mean").
        linear_approx (str): weight sharing in Linear layers with inputs ``[N, ..., d]``:
            "expand" (positions as extra rows) or "reduce" (averaged per sample)
            (default: "expand").
        factor_dtype, inverse_dtype (torch.dtype, optional): dtypes of factors and of their
            decompositions (default: the weight's dtype).
        skip_modules (iterable of str): qualified module names to leave to the fallback.
        seed (int): seed of the generator used by :meth:`sample_fisher` (plus the rank) (default: 0).
        grad_worker_fraction (float): with torch.distributed, the fraction f in (0, 1] of ranks
            that hold each layer's decomposition (see :mod:`natgrad.distributed.communicator`)
            (default: 1.0).
        triangle_packing (bool): all-reduce symmetric factors as upper triangles (default: True).
        bucket_cap_mb (float): bucket size of the factor/gradient all-reduces (default: 25).
        process_group: torch.distributed group (default: the world when initialised).

    Distributed: when torch.distributed is initialised, ``model`` may be wrapped in
    DistributedDataParallel (gradients are then not averaged twice) or not (the optimizer
    averages them). Each rank holds a shard of the batch; every rank ends each step with the
    parameters a single process would compute on the whole batch. ``state_dict()`` is collective
    (call it on every rank, save from rank 0); it loads on any world size.
    """

    # torch.amp.GradScaler hands this optimizer its scale (``grad_scale``) and overflow flag
    # (``found_inf``) instead of unscaling .grad itself, so that the captured output gradients
    # feeding G are unscaled too. Call ``scaler.step(opt)`` without a prior ``scaler.unscale_``.
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, params: Iterable | None = None, *, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.0, damping: Schedule = 1e-3,
                 factor_decay: float = 0.95, factor_update_period: Schedule = 1,
                 inverse_update_period: Schedule = 10, kl_clip: Schedule | None = 1e-3,
                 inverse_method: str = "eigen", pi_correction: bool = False,
                 adaptive_damping: bool = False, damping_adaptation_interval: int = 5,
                 damping_adaptation_decay: float = 0.95, fisher_type: str = "empirical",
                 loss_reduction: str = "mean", linear_approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None,
                 skip_modules: Iterable[str] = (), seed: int = 0,
                 grad_worker_fraction: float = 1.0, triangle_packing: bool = True,
                 bucket_cap_mb: float = 25.0, process_group=None) -> None:
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
        check_choice("fisher_type", fisher_type, ("empirical", "mc"))
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        check_choice("linear_approx", linear_approx, ("expand", "reduce"))
        check_number("damping_adaptation_interval", damping_adaptation_interval, low=1, integer=True)
        check_number("damping_adaptation_decay", damping_adaptation_decay, low=0.0, high=1.0,
                     low_open=True, high_open=True)
        check_number("grad_worker_fraction", grad_worker_fraction, low=0.0, high=1.0, low_open=True)
        check_number("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
        if adaptive_damping and callable(damping):
            raise ValueError("Invalid damping: a callable schedule cannot be combined with "
                             "adaptive_damping=True (the adaptation owns the damping)")
        for name, dt in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
            if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
                raise ValueError(f"Invalid {name}: {dt!r} (expected a floating torch.dtype or None)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(model.parameters() if params is None else params, defaults)

        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if self._ddp else model
        self._comm = make_communicator(grad_worker_fraction, triangle_packing, bucket_cap_mb, process_group)
        self.factor_decay = factor_decay
        self.factor_update_period = factor_update_period
        self.inverse_update_period = inverse_update_period
        self.kl_clip = kl_clip
        self.inverse_method = inverse_method
        self.pi_correction = pi_correction
        self.adaptive_damping = adaptive_damping
        self.damping_adaptation_interval = damping_adaptation_interval
        self.damping_adaptation_decay = damping_adaptation_decay
        self.fisher_type = fisher_type
        self.loss_reduction = loss_reduction
        self._generator = torch.Generator().manual_seed(seed + self._comm.rank)
        self._phase = GradientPhase(fisher_type=fisher_type)
        self._steps = 0
        self._damping_multiplier = 1.0
        self._faults: dict[str, int] = {}
        self._decomposed: set[str] = set()  # layers decomposed at least once (same on every rank)
        self._ladder: dict[str, int] = {}
        self._suspend_capture = False
        self.last_reduction_ratio: float | None = None
        self._build_blocks(set(skip_modules), linear_approx, factor_dtype, inverse_dtype)

    # ---- set-up ---------------------------------------------------------------------------------

    def _build_blocks(self, skip: set[str], approx: str, factor_dtype, inverse_dtype) -> None:
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        self._blocks: list[KronBlock] = []
        self._captures: dict[str, LayerCapture] = {}
        self._fallback_reason: dict[int, str] = {}
        alive = weakref.WeakMethod(self._capturing)
        for name, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own or not any(id(p) in managed for p in own):
                continue
            block = None if name in skip else make_block(
                name, module, linear_approx=approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
            reason = "skipped by skip_modules" if name in skip else None
            if block is not None:
                reason = unsupported_reason(module)
                if reason is None and (len(own) != len(block.params)
                                       or not all(id(p) in managed for p in block.params)):
                    reason = "only some of its parameters are optimized"
            elif reason is None:
                reason = f"{type(module).__name__} has no Kronecker block"
            if reason is not None:
                for p in own:
                    self._fallback_reason[id(p)] = f"{type(module).__name__} {name!r}: {reason}"
                continue
            self._blocks.append(block)
            self._captures[name] = LayerCapture(module, lambda: (m := alive()) is not None and m(), self._phase)
        captures = list(self._captures.values())
        self._finalizer = weakref.finalize(self, lambda: [c.remove() for c in captures])
        self._block_of = {id(p): b for b in self._blocks for p in b.params}
        self._index_groups()

    def _index_groups(self) -> None:
        """Maps each parameter to its group (refreshed every step: add_param_group may run)."""
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    def _capturing(self) -> bool:
        return not self._suspend_capture and self._is_factor_step(self._steps)

    def _is_factor_step(self, step: int) -> bool:
        period = resolved_number("factor_update_period", self.factor_update_period, step, low=1, integer=True)
        return step % period == 0

    def remove_hooks(self) -> None:
        """Removes every hook this optimizer placed on the model (also done on garbage
        collection). Afterwards all parameters use the fallback preconditioner."""
        self._finalizer()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in _GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])

    # ---- Monte-Carlo Fisher -----------------------------------------------------------------------

    def sample_fisher(self, output: Tensor, likelihood: str = "categorical") -> None:
        """Estimates G from labels sampled from the model's predictive distribution.

        Call after the forward pass and before ``loss.backward()``; one extra backward pass,
        which fills the G statistics only (``.grad`` is untouched). A no-op on steps that do not
        update factors.

        Args:
            output (Tensor): the model's logits (categorical) or means (Gaussian, unit variance).
            likelihood (str): "categorical" or "gaussian" (default: "categorical").
        """
        if self.fisher_type != "mc":
            raise RuntimeError("sample_fisher() needs natgrad.KFAC(..., fisher_type='mc')")
        check_choice("likelihood", likelihood, LIKELIHOODS)
        targets = [r.output for c in self._captures.values() for r in c.records
                   if r.output is not None and r.grad_output is None]
        if not targets or not self._capturing():
            return
        loss = sampled_nll(output, likelihood, self.loss_reduction, self._generator)
        self._phase.sampling = True
        try:
            torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
        finally:
            self._phase.sampling = False

    # ---- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Performs one K-FAC step; ``closure`` (re-evaluating the loss, as in torch.optim) is
        needed for adaptive damping. Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler
        if found_inf is not None and float(found_inf) > 0:
            self._clear_records()
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        k = self._steps
        self._index_groups()
        if not self._ddp:
            self._comm.average_gradients([p.grad for g in self.param_groups for p in g["params"]
                                          if p.grad is not None])
        skipped = self._update_factors(k, inv_scale)
        self._update_inverses(k)
        updates, grads = self._directions(skipped, inv_scale)
        nu = self._trust_region(k, updates, grads)
        adapt = self.adaptive_damping and closure is not None and k % self.damping_adaptation_interval == 0
        before = {p: p.detach().clone() for p in updates} if adapt else None
        self._apply(updates, nu)
        if adapt:
            self._adapt_damping(closure, loss, before, grads)
        self._steps += 1
        return loss

    def _damping(self, param: Tensor) -> float:
        group = self._group_of[id(param)]
        value = resolved_number("damping", group["damping"], self._steps, low=0.0, low_open=True)
        return value * self._damping_multiplier

    def _clear_records(self) -> None:
        for capture in self._captures.values():
            capture.clear()

    def _update_factors(self, k: int, inv_scale: float) -> set[str]:
        skipped: set[str] = set()
        if self._is_factor_step(k):
            records = [self._captures[b.name].complete() for b in self._blocks]
            finite = self._comm.agree([bool(r) and b.records_finite(r) for b, r in zip(self._blocks, records)])
            captured = self._comm.agree([bool(r) for r in records])
            updated = []
            for block, recs, ok, seen in zip(self._blocks, records, finite, captured):
                if ok:
                    block.update_factors(recs, self.factor_decay, self.loss_reduction == "mean", inv_scale)
                    updated.append(block)
                elif seen:  # captured everywhere, but NaN/Inf somewhere: every rank skips
                    skipped.add(block.name)
                    self._fault(block.name, "activations or output gradients")
            samples = next((sum(rec.input.shape[0] for rec in r) for r in records if r), 0)
            self._comm.average_factors(updated, samples)
        self._clear_records()
        return skipped

    def _update_inverses(self, k: int) -> None:
        period = resolved_number("inverse_update_period", self.inverse_update_period, k, low=1, integer=True)
        due = [b for b in self._blocks if b.has_factors and (k % period == 0 or b.name not in self._decomposed)]
        if any(b.name not in self._decomposed for b in due):  # a new layer: (re)assign owners,
            due = [b for b in self._blocks if b.has_factors]  # and every owner recomputes
            self._comm.assign(due)
        for block in due:
            self._decomposed.add(block.name)
            rung = 0
            if self._comm.is_owner(block):
                rung = block.update_inverse(self.inverse_method, self._damping(block.weight), self.pi_correction)
            self._comm.share_decomposition(block, self.inverse_method)
            if rung > 0:
                first = block.name not in self._ladder
                self._ladder[block.name] = self._ladder.get(block.name, 0) + 1
                if first:
                    warnings.warn(f"natgrad.KFAC: decomposing the factors of {block.name!r} needed "
                                  f"fallback-ladder rung {rung}; see natgrad.ops.Rung", stacklevel=3)

    def _directions(self, skipped: set[str], inv_scale: float) -> tuple[dict, dict]:
        updates: dict[Tensor, Tensor] = {}
        grads: dict[Tensor, Tensor] = {}
        done: set[int] = set()
        for block in self._blocks:
            if block.name in skipped:
                done.update(id(p) for p in block.params)  # untouched this step
                continue
            if block.name not in self._decomposed or any(p.grad is None for p in block.params):
                continue
            grad = block.grad_matrix() * inv_scale
            direction = None
            if self._comm.is_grad_worker(block):
                direction = block.precondition(grad, self._damping(block.weight), self.pi_correction)
            direction = self._comm.share_direction(block, direction, grad)
            done.update(id(p) for p in block.params)
            if not (torch.isfinite(grad).all() and torch.isfinite(direction).all()):
                self._fault(block.name, "gradients")
                continue
            for p, g, u in zip(block.params, block.split(grad), block.split(direction)):
                updates[p], grads[p] = u, g
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in done:
                    continue
                g = p.grad * inv_scale
                if not torch.isfinite(g).all():
                    self._fault(f"parameter {tuple(p.shape)}", "gradients")
                    continue
                updates[p], grads[p] = g, g
        return updates, grads

    def _trust_region(self, k: int, updates: dict, grads: dict) -> float:
        kl_clip = resolved_number("kl_clip", self.kl_clip, k, low=0.0, low_open=True, allow_none=True)
        if kl_clip is None or not updates:
            return 1.0
        vg = sum(float((updates[p] * grads[p]).sum()) * self._group_of[id(p)]["lr"] ** 2 for p in updates)
        return 1.0 if vg == 0 else min(1.0, math.sqrt(kl_clip / abs(vg)))

    def _apply(self, updates: dict, nu: float) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p not in updates:
                    continue
                d = updates[p].mul(nu)
                if group["weight_decay"]:
                    d.add_(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                p.add_(d, alpha=-group["lr"])

    def _adapt_damping(self, closure, loss_before, before: dict, grads: dict) -> None:
        """Levenberg–Marquardt: compare the loss reduction with the quadratic model's."""
        deltas = {p: p.detach() - old for p, old in before.items()}
        predicted = sum(float((grads[p] * d).sum()) for p, d in deltas.items())
        curvature = 0.0
        for p, d in deltas.items():
            curvature += self._damping(p) * float(d.pow(2).sum())
        for block in self._blocks:
            if block.has_factors and all(p in deltas for p in block.params):
                delta = torch.cat([deltas[p].reshape(block.weight.shape[0], -1) for p in block.params], 1) \
                    if block.kind != "embedding" else deltas[block.weight].T
                curvature += float(block.curvature_product(delta))
        model_change = predicted + 0.5 * curvature
        self._suspend_capture = True
        try:
            with torch.enable_grad():
                loss_after = closure()
        finally:
            self._suspend_capture = False
        change = self._comm.mean_scalar(float(loss_after)) - self._comm.mean_scalar(float(loss_before))
        rho = change / model_change if model_change < 0 else -math.inf
        self.last_reduction_ratio = rho
        omega = self.damping_adaptation_decay ** self.damping_adaptation_interval
        if rho > 0.75:
            self._damping_multiplier *= omega
        elif rho < 0.25:
            self._damping_multiplier /= omega
        self._damping_multiplier = min(max(self._damping_multiplier, 1e-8), 1e8)

    def _fault(self, where: str, what: str) -> None:
        if where not in self._faults:
            warnings.warn(f"natgrad.KFAC: NaN or Inf in the {what} of {where}; its update is "
                          "skipped this step (parameters untouched)", stacklevel=4)
        self._faults[where] = self._faults.get(where, 0) + 1

    # ---- introspection and checkpoints ------------------------------------------------------------

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """How many times each layer's update was skipped because of NaN/Inf."""
        return dict(self._faults)

    @property
    def damping_multiplier(self) -> float:
        """The adaptive-damping multiplier applied to every group's damping (1.0 if unused)."""
        return self._damping_multiplier

    def describe(self) -> str:
        """A table of every optimized parameter and the preconditioner it gets."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                block = self._block_of.get(id(p))
                if block is not None and (self._captures[block.name].fired or block.has_factors):
                    how = f"K-FAC {block.kind}" + (f" ({block.approx})" if hasattr(block, "approx") else "")
                elif block is not None:
                    how = "plain gradient until its hooks fire (none so far: is the layer used functionally?)"
                else:
                    how = "plain gradient: " + self._fallback_reason.get(id(p), "not owned by any module")
                rows.append((names.get(id(p), "<unnamed>"), "x".join(map(str, p.shape)) or "scalar", how))
        width = [max(len(r[i]) for r in rows + [("parameter", "shape", "")]) for i in range(2)]
        lines = [f"{'parameter':<{width[0]}}  {'shape':<{width[1]}}  preconditioner"]
        lines += [f"{n:<{width[0]}}  {s:<{width[1]}}  {h}" for n, s, h in rows]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (momentum buffers, param groups) plus, under ``"kfac"``, the step
        counter, factors, decompositions, damping multiplier, fault counts and sampler state."""
        self._comm.gather_decompositions(self._blocks, self.inverse_method)
        state = super().state_dict()
        state[STATE_KEY] = {
            "steps": self._steps,
            "damping_multiplier": self._damping_multiplier,
            "faults": dict(self._faults),
            "ladder": dict(self._ladder),
            "decomposed": sorted(self._decomposed),
            "generator": self._generator.get_state(),
            "blocks": {b.name: b.state_dict() for b in self._blocks},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; curvature tensors are restored uncast."""
        state_dict = dict(state_dict)
        kfac = state_dict.pop(STATE_KEY, None)
        if kfac is None:
            raise ValueError(f"state_dict has no {STATE_KEY!r} entry: not saved by natgrad.KFAC")
        mine = {b.name for b in self._blocks}
        if set(kfac["blocks"]) - mine:
            raise ValueError(f"state_dict has curvature for layers this model lacks: "
                             f"{sorted(set(kfac['blocks']) - mine)}")
        super().load_state_dict(state_dict)
        self._steps = int(kfac["steps"])
        self._damping_multiplier = float(kfac["damping_multiplier"])
        self._faults, self._ladder = dict(kfac["faults"]), dict(kfac["ladder"])
        self._generator.set_state(kfac["generator"])
        self._decomposed = set(kfac.get("decomposed", ()))
        for block in self._blocks:
            block.state = {}
            if block.name in kfac["blocks"]:
                block.load_state_dict(kfac["blocks"][block.name])
        if self._decomposed:
            self._comm.assign([b for b in self._blocks if b.has_factors])
