r"""EWC-aware K-FAC preconditioning: natgrad.KFAC solves with the curvature of the regularized
objective, :math:`F_{task} + \lambda F_{old} + \gamma I`, instead of :math:`F_{task} + \gamma I`.

Why. The EWC penalty :math:`\frac\lambda2 \Delta^\top F_{old} \Delta` has Hessian
:math:`\lambda F_{old}`. A preconditioner that ignores it steps along the penalty's gradient with
the scale of the task's curvature only, which for large λ overshoots (plain SGD diverges once
:math:`\lambda \max F_{old} > 2/\eta`); with the sum in the preconditioner the penalty's part of
the step is a damped Newton step on the quadratic, stable for any λ.

Approximations (per Kronecker block, the task's curvature :math:`A \otimes G` from K-FAC's
factors; the packed gradient :math:`X` is ``[d_out, d_in(+1)]``, :math:`F: X \mapsto G X A`):

* ``"generalized"`` (the default). The old Fisher is split into a Kronecker part
  :math:`A_0 \otimes G_0` and a diagonal rest :math:`E` (packed ``[d_out, d_in(+1)]``):
  Kronecker EWC has :math:`E = 0` (one task exactly; several tasks are pooled as
  :math:`A_0 = \operatorname{mean}_t A_t`, :math:`G_0 = \sum_t G_t`); diagonal EWC's Fisher
  :math:`F` (non-negative, packed) is split into its best rank-one fit :math:`u v^\top`
  (:math:`A_0 = \operatorname{diag} v`, :math:`G_0 = \operatorname{diag} u`) and the rest. The
  damping is factored into the old term with π-weighting (Martens & Grosse, 2015, §6.3):
  :math:`B_A = A_0 + \pi\sqrt\gamma I`, :math:`B_G = \lambda G_0 + \frac{\sqrt\gamma}{\pi} I`,
  :math:`\pi^2 = \frac{\operatorname{tr}A_0 / d_A}{\operatorname{tr}\lambda G_0 / d_G}`, so
  that :math:`B_A \otimes B_G = \lambda A_0\otimes G_0 + \gamma I + ` two cross terms (the
  usual over-damping of factored damping). Generalized eigendecompositions (whitening by
  ``eigh``, then ``eigh``, float64) :math:`P_A^\top B_A P_A = I,\ P_A^\top A P_A = D_A` and the
  same for G diagonalise both Kronecker products **simultaneously**, so
  :math:`A\otimes G + B_A\otimes B_G` is inverted exactly:
  :math:`u = P_G [(P_G^\top X P_A) \oslash (d_G d_A^\top + 1 + (P_G^{\circ 2})^\top \lambda E
  P_A^{\circ 2})] P_A^\top` (the diagonal rest enters by its diagonal in that basis, as EKFAC
  corrects eigenvalues). Cost per refresh: three ``eigh`` of each factor's size (the two of
  :math:`B` only after a consolidation), per step four matrix products, as K-FAC's own solve.
* ``"eigenbasis"``: keep K-FAC's eigenbasis :math:`V_G \otimes V_A` of the task's factors and
  correct its eigenvalues with the old Fisher's diagonal in that basis (EKFAC-style):
  :math:`S = \lambda_G \lambda_A^\top + \lambda\,\mathrm{diag}_{V}(F_{old}) + \gamma`, with
  :math:`\mathrm{diag}_V(F_{old}) = (V_G^{\circ 2})^\top F (V_A^{\circ 2})` (diagonal) or
  :math:`\mathrm{diag}(V_G^\top G_0 V_G)\,\mathrm{diag}(V_A^\top A_0 V_A)^\top` (Kronecker).
  Exact damping, but only the diagonal of :math:`F_{old}` in the task's basis: far less
  accurate once :math:`\lambda F_{old}` dominates (kept for comparison).

Errors against the dense :math:`(F + \lambda F_{old} + \gamma I)^{-1}\nabla` on a tiny float64
model are measured in ``tests/python/regularizers/test_ewc_curvature.py`` and stated in the EWC guide. On the
continual benchmark's MLP (Fashion-MNIST, λ = 10, γ = 0.1, after one task) against a PCG solve of
the exact operator: 0.37 on the 785x100 layer (plain K-FAC: 0.24; the π cross terms over-damp
there) and 0.43 on the head (plain K-FAC: 1.09). A first variant that kept γI exact by its
diagonal in the generalized basis was 5x more accurate on the tiny model but 2.5x off on that
layer, whose input factor is singular (pixels that never light up).

Scope: Kronecker blocks with full factors (``KroneckerBlock.full_factors``: Linear and
convolution layers, whose Fisher EWC stores); other parameters keep K-FAC's treatment
(Embedding's Kronecker solve, the plain gradient of fallback parameters).
The decompositions are refreshed whenever K-FAC refreshes the block's own (its
``inverse_update_period``), when damping or λ change, and after every ``consolidate``.
Nothing here is saved: re-attach after loading checkpoints.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.kron import KroneckerBlock

APPROXIMATIONS = ("auto", "generalized", "eigenbasis")


class ConsolidatedFisher(Protocol):
    """What the prior reads of a :class:`natgrad.EWC`: its model, λ, the stored tasks and a
    revision number bumped whenever they change.
    """

    model: nn.Module
    lambda_: float
    tasks: list[dict[str, Any]]
    revision: int


class EWCCurvature:
    """The handle :meth:`natgrad.EWC.attach` returns: while attached, every full-factor Kronecker
    block of ``optimizer`` preconditions with ``F + λ·F_old + damping`` (see the module docstring).
    The prior is installed by the optimizer's curvature estimator, which wraps those blocks
    (:class:`natgrad.curvature.prior.PriorBlock`) until :meth:`detach`.

    Args:
        ewc (natgrad.EWC): the regularizer (its ``model`` must be the optimizer's model).
        optimizer (natgrad.KFAC): the optimizer.
        approximation (str): "auto" ("generalized" for Kronecker EWC, "eigenbasis" for diagonal
            EWC), "generalized" (Kronecker EWC only) or "eigenbasis" (default: "auto").
    """

    def __init__(self, ewc: ConsolidatedFisher, optimizer, approximation: str = "auto") -> None:
        from natgrad.optim.kfac import KFAC

        if not isinstance(optimizer, KFAC):
            raise TypeError(f"EWC.attach(optimizer): expected a natgrad.KFAC, got {type(optimizer).__name__}")
        if optimizer.model is not ewc.model:
            raise ValueError("EWC.attach(optimizer): the optimizer must train the EWC's model "
                             "(optimizer.model is not ewc.model)")
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"Invalid approximation: {approximation!r} (expected one of {APPROXIMATIONS})")
        if approximation == "auto":
            approximation = "generalized"
        self.ewc, self.approximation = ewc, approximation
        names = {id(p): n for n, p in ewc.model.named_parameters()}
        self._estimator = optimizer.estimator
        self._cache: dict[str, tuple[tuple, tuple]] = {}
        self._split: dict[str, tuple[tuple, tuple]] = {}
        self.blocks = self._estimator.install_prior(
            self, lambda b: isinstance(b, KroneckerBlock) and b.full_factors)
        self._names = {b.name: tuple(names[id(p)] for p in b.params) for b in self.blocks}

    def detach(self) -> None:
        """Restores plain K-FAC preconditioning (the optimizer's state is untouched)."""
        self._estimator.remove_prior(self)
        self._cache.clear()
        self._split.clear()

    # ---- the old Fisher of a block ---------------------------------------------------------------

    def old_fisher(self, block: KroneckerBlock) -> tuple[str, tuple[Tensor, ...]] | None:
        """``("kron", (A0, G0))`` or ``("diag", (F,))`` (packed) summed over the consolidated
        tasks, or None when no task penalises this block.
        """
        names = self._names[block.name]
        a_list, g_list, diag = [], [], None
        for task in self.ewc.tasks:
            kron = task["kron"].get(names)
            if kron is not None:
                a_list.append(kron.state["A"])
                g_list.append(kron.state["G"])
            elif any(n in task["diag"] for n in names):
                d = block.pack([task["diag"].get(n) for n in names])
                diag = d if diag is None else diag + d
        if a_list:
            return "kron", (sum(a_list) / len(a_list), sum(g_list))
        return ("diag", (diag,)) if diag is not None else None

    # ---- preconditioning -------------------------------------------------------------------------

    def precondition(self, block: CurvatureBlock, packed: Tensor, damping: float) -> Tensor | None:
        """``(A⊗G + λ·F_old + damping)⁻¹`` on a packed gradient, or None (K-FAC's own solve)
        when no task penalises the block or λ = 0.
        """
        block = cast(KroneckerBlock, block)  # installed on Kronecker blocks only (__init__)
        lam = self.ewc.lambda_
        key = (*_decomposition_id(block), damping, lam, self.ewc.revision)
        cached = self._cache.get(block.name)
        if cached is None or not _same_key(cached[0], key):
            old = self.old_fisher(block) if lam > 0 else None
            if old is None or not any(bool(t.abs().sum() > 0) for t in old[1]):
                parts: tuple = ()
            elif self.approximation == "generalized":
                split_key = (lam, damping, self.ewc.revision)
                if self._split.get(block.name, (None,))[0] != split_key:  # changes with the tasks
                    self._split[block.name] = (split_key, _old_split(old, lam, damping))
                parts = ("generalized", *_generalized(block, self._split[block.name][1]))
            else:
                parts = ("eigenbasis", *_eigenbasis(block, old, lam, damping))
            cached = self._cache[block.name] = (key, parts)
        parts = cached[1]
        if not parts:
            return None
        x = packed.to(parts[1].dtype)
        if parts[0] == "generalized":
            _, p_g, p_a, scale = parts
            out = p_g @ ((p_g.mT @ x @ p_a) / scale) @ p_a.mT
        else:
            _, v_g, v_a, denom = parts
            out = v_g @ ((v_g.mT @ x @ v_a) / denom) @ v_a.mT
        return out.to(packed.dtype)


def _decomposition_id(block: KroneckerBlock) -> tuple:
    """Changes whenever K-FAC recomputes (or loads) the block's decomposition: the tensor itself
    (held by the cache, so that a new decomposition can never reuse its identity) and its
    version.
    """
    t = block.state.get("g_eigenvectors", block.state.get("g_inverse"))
    return (t, t._version) if t is not None else (None, block.state["A"]._version)


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two cache keys are equal (tensors by identity)."""
    return len(a) == len(b) and all(x is y if isinstance(x, Tensor) else x == y for x, y in zip(a, b))


def _whitening(b: Tensor) -> Tensor:
    """``W`` with ``Wᵀ b' W = I`` (float64), where ``b'`` is the symmetric PSD ``b`` with its
    eigenvalues floored at 10⁻⁶ of their mean (a singular ``b``, e.g. the input factor of pixels
    that never light up, stays invertible).
    """
    e, v = torch.linalg.eigh(0.5 * (b + b.mT))
    e = e.clamp_min(1e-6 * max(float(e.clamp_min(0).mean()), 1e-30))
    return v / e.sqrt()


def _generalized_eigh(a: Tensor, whiten: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, P)`` with ``Pᵀ b' P = I`` and ``Pᵀ a P = diag(d)`` for ``whiten = _whitening(b)``."""
    c = whiten.mT @ a @ whiten
    d, q = torch.linalg.eigh(0.5 * (c + c.mT))
    return d.clamp_min(0), whiten @ q


def _old_split(old: tuple[str, tuple[Tensor, ...]], lam: float, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """The whitenings of the damped old factors ``A_0 + π√γ I`` and ``λ G_0 + √γ/π I`` and the
    diagonal rest ``λ E`` (packed; zero for Kronecker EWC) (see the module docstring); float64.
    """
    kind, tensors = old
    if kind == "kron":
        a0, g0 = (t.to(torch.float64) for t in tensors)
        rest = torch.zeros((), dtype=torch.float64, device=a0.device)
    else:  # diagonal F_old [d_out, d_in]: its best rank-1 fit u vᵀ (u, v >= 0) is diag(v) ⊗ diag(u)
        f = tensors[0].to(torch.float64).clamp_min(0)
        u, sigma, v = torch.linalg.svd(f, full_matrices=False)
        u, v = u[:, 0].abs() * sigma[0].sqrt(), v[0].abs() * sigma[0].sqrt()
        a0, g0 = torch.diag(v), torch.diag(u)
        rest = lam * (f - torch.outer(u, v))
    g0 = lam * g0
    ta, tg = float(torch.trace(a0)) / a0.shape[0], float(torch.trace(g0)) / g0.shape[0]
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    root = math.sqrt(damping)
    eye_a = torch.eye(a0.shape[0], dtype=a0.dtype, device=a0.device)
    eye_g = torch.eye(g0.shape[0], dtype=g0.dtype, device=g0.device)
    return _whitening(a0 + pi * root * eye_a), _whitening(g0 + root / pi * eye_g), rest


def _generalized(block: KroneckerBlock, split: tuple[Tensor, Tensor, Tensor]):
    """``P_G, P_A`` and the divisor of the "generalized" solve (see the module docstring)."""
    f64 = torch.float64
    a, g = block.state["A"].to(f64), block.state["G"].to(f64)
    w_a, w_g, rest = split
    d_a, p_a = _generalized_eigh(a, w_a)
    d_g, p_g = _generalized_eigh(g, w_g)
    scale = torch.outer(d_g, d_a) + 1.0
    if rest.dim():  # diagonal EWC: the rest's diagonal in the generalized basis
        scale = scale + ((p_g * p_g).mT @ rest @ (p_a * p_a)).clamp_min(0)
    dtype = block.inverse_dtype
    return p_g.to(dtype), p_a.to(dtype), scale.to(dtype)


def _eigenbasis(block: KroneckerBlock, old: tuple[str, tuple[Tensor, ...]], lam: float, damping: float):
    """K-FAC's eigenbasis and the corrected eigenvalues ``λ_G λ_Aᵀ + λ·diag_V(F_old) + γ``."""
    f64 = torch.float64
    s = block.state
    if "a_eigenvectors" in s:
        e_a, v_a = s["a_eigenvalues"].to(f64), s["a_eigenvectors"].to(f64)
        e_g, v_g = s["g_eigenvalues"].to(f64), s["g_eigenvectors"].to(f64)
    else:  # inverse_method="inverse" keeps no eigenbasis: decompose the factors here
        e_a, v_a = torch.linalg.eigh(s["A"].to(f64))
        e_g, v_g = torch.linalg.eigh(s["G"].to(f64))
    kind, tensors = old
    if kind == "kron":
        a0, g0 = (t.to(f64) for t in tensors)
        prior = torch.outer(((v_g.mT @ g0) * v_g.mT).sum(1), ((v_a.mT @ a0) * v_a.mT).sum(1))
    else:
        prior = (v_g * v_g).mT @ tensors[0].to(f64) @ (v_a * v_a)
    denom = torch.outer(e_g.clamp_min(0), e_a.clamp_min(0)) + lam * prior.clamp_min(0) + damping
    dtype = block.inverse_dtype
    return v_g.to(dtype), v_a.to(dtype), denom.to(dtype)
