r"""The matrix-free Fisher: ``F v`` without forming U, F or any block of it.

Every Fisher natgrad computes is a generalized Gauss–Newton matrix over the model's outputs,

.. math::
    F = \frac{1}{n} \sum_i J_i^\top H_i J_i,

with :math:`J_i` the Jacobian of sample i's output w.r.t. the parameters and :math:`H_i` an
output-space matrix that the ``fisher_type`` fixes:

* ``"exact"`` — the Fisher of the predictive distribution, in closed form: categorical logits
  ``[n, ..., C]``: :math:`H = \mathrm{diag}(p) - pp^\top` per position; unit-variance Gaussian:
  :math:`H = I`; Bernoulli logits: :math:`H = \mathrm{diag}(p(1-p))`, :math:`p = \sigma(f)`;
* ``"empirical"`` — :math:`H_i = r_i r_i^\top` with :math:`r_i = \nabla_f \ell(f_i, y_i)` at the
  observed targets;
* ``"mc"`` — :math:`H_i = \frac1K \sum_k r_{ik} r_{ik}^\top` at ``K`` labels drawn from the model,
  drawn once when the matrix is built, chunk by chunk in the same order as ``score_rows``
  (so the same generator gives the same labels as the dense structures).

:meth:`ImplicitFisher.mv` computes :math:`J v` with one forward-mode pass (``torch.func.jvp``),
applies :math:`H` per sample, and pulls the result back with one reverse-mode pass
(``torch.func.vjp`` over the same forward), batched over each chunk of samples: cost about one
gradient step plus a forward-mode pass, memory about one gradient step's activations plus their
tangents. :meth:`quad_form` and :meth:`gram` need only forward-mode passes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from typing_extensions import override

from natgrad.curvature.block import max_abs
from natgrad.fisher.matrices import FisherMatrix, _check_damping
from natgrad.fisher.scores import check_request, functional_model, score_rows
from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood

__all__ = ["ImplicitFisher"]


class ImplicitFisher(FisherMatrix):
    """The Fisher of ``model`` over ``inputs`` as a linear operator (see the module docstring).

    Built by ``compute_fisher(..., structure="implicit")`` (same arguments). It holds the inputs
    and the output-side data (residuals ``r`` or probabilities), never a ``p``-sized matrix. It is
    the Fisher at the parameter values it was built at: changing a parameter in place afterwards
    makes every product raise (build a new one).

    Args:
        model (nn.Module): maps a batch to logits (categorical) or means (Gaussian).
        inputs (Tensor): ``[n, ...]``.
        targets (Tensor, optional): observed labels (``fisher_type="empirical"``).
        fisher_type (str): "empirical", "mc" or "exact" (default: "empirical").
        likelihood (str or Likelihood): "categorical", "gaussian" or "bernoulli" (default: "categorical").
        params (sequence of nn.Parameter, optional): default all trainable; the vector layout is
            the order of ``model.named_parameters()`` (as for every structure).
        mc_samples (int): label draws per sample for "mc" (default: 1).
        generator (torch.Generator, optional): CPU generator for "mc".
        chunk_size (int): samples per jvp/vjp call (bounds memory) (default: 256).
        loss_fn (callable, optional): per-sample loss ``loss_fn(output[None], target[None])``
            replacing the likelihood's NLL for "empirical" (as in ``score_rows``).
    """

    structure = "implicit"

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                 fisher_type: str = "empirical", likelihood: str | Likelihood = "categorical",
                 params: Sequence[nn.Parameter] | None = None, mc_samples: int = 1,
                 generator: torch.Generator | None = None, chunk_size: int = 256,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        lik, chosen = check_request(model, inputs, targets, fisher_type, likelihood, params,
                                    mc_samples, chunk_size)
        if loss_fn is not None and (fisher_type != "empirical" or not callable(loss_fn)):
            raise ValueError("loss_fn must be a callable, and only fisher_type='empirical' uses it")
        if not isinstance(lik, (Categorical, Gaussian, Bernoulli)):
            raise ValueError(f"structure='implicit' needs a closed-form output Fisher: likelihood "
                             f"'categorical', 'gaussian' or 'bernoulli', got {type(lik).__name__}")
        self.model, self.params, self.likelihood = model, chosen, lik
        self.fisher_type, self.loss_fn = fisher_type, loss_fn
        self.names, self._values, self._output = functional_model(model, chosen)
        by_name = dict(model.named_parameters())
        self._live = [by_name[n] for n in self.names]
        self._versions = [p._version for p in self._live]
        self._sizes = [v.numel() for v in self._values.values()]
        self.num_samples = inputs.shape[0]
        self.chunks: list[tuple[Tensor, Tensor | None, list]] = []  # (x, probs or None, passes)
        for start in range(0, inputs.shape[0], chunk_size):
            x = inputs[start:start + chunk_size]
            y = None if targets is None else targets[start:start + chunk_size]
            self.chunks.append((x, *self._output_side(x, y, mc_samples, generator)))

    # ---- construction ---------------------------------------------------------------------------

    def _output_side(self, x: Tensor, y: Tensor | None, draws: int, generator) -> tuple[Tensor | None, list]:
        """Probabilities (exact categorical) or the passes ``(target, weight, residual)`` whose
        residual rows ``r = w ∇_f ℓ(f, target)`` give ``H = Σ_passes r rᵀ``.
        """
        with torch.no_grad():
            out = self._output(self._values, x)
        if self.fisher_type == "exact":
            if isinstance(self.likelihood, Gaussian):
                return None, []
            return (torch.softmax(out, -1) if isinstance(self.likelihood, Categorical) else torch.sigmoid(out)), []
        if self.fisher_type == "empirical" and self.loss_fn is None:
            self.likelihood.check(out, cast(Tensor, y))
        # check_request made sure "empirical" has targets
        passes = [(cast(Tensor, y), None)] if self.fisher_type == "empirical" else \
            self.likelihood.pseudo_targets(out, "mc", None, draws, generator)
        return None, [(t, w, self._residual(out, t, w)) for t, w in passes]

    def _residual(self, out: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        with torch.enable_grad():
            f = out.detach().requires_grad_(True)
            if self.loss_fn is None:
                loss = self.likelihood.weighted_nll(f, target, weight)
            else:
                fn = self.loss_fn
                loss = vmap(lambda o, t: fn(o[None], t[None]).sum())(f, target).sum()
            (r,) = torch.autograd.grad(loss, f)
        if not bool(torch.isfinite(r).all()):
            raise FloatingPointError("ImplicitFisher: the loss gradient w.r.t. the outputs holds "
                                     "NaN/Inf (did the model overflow?)")
        return r

    # ---- the output-space matrix H ----------------------------------------------------------

    def _apply_h(self, u: Tensor, probs: Tensor | None, passes: list) -> Tensor:
        """``H u`` per sample, ``u`` shaped like the chunk's output."""
        if self.fisher_type == "exact":
            if probs is None:  # unit Gaussian
                return u
            if isinstance(self.likelihood, Bernoulli):
                return probs * (1 - probs) * u
            return probs * (u - (probs * u).sum(-1, keepdim=True))
        out = torch.zeros_like(u)
        for _, _, r in passes:
            s = (r * u).flatten(1).sum(1)  # r_iᵀ u_i per sample
            out = out + r * s.reshape(-1, *([1] * (u.dim() - 1)))
        return out

    # ---- products ---------------------------------------------------------------------------

    @property
    @override
    def num_params(self) -> int:
        return sum(self._sizes)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (that of the products)."""
        return next(iter(self._values.values())).dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return next(iter(self._values.values())).device

    def _tangents(self, v: Tensor) -> dict[str, Tensor]:
        self._check_fresh()
        return {n: t.view_as(self._values[n]) for n, t in zip(self.names, torch.split(v, self._sizes))}

    def mv(self, v: Tensor) -> Tensor:
        """``F v`` for ``v`` of shape ``[p]`` or ``[p, k]`` (columns one at a time): one
        jvp and one vjp per chunk of samples.
        """
        self.check_vector(v, "v", allow_matrix=True)
        if v.dim() == 2:
            return torch.stack([self.mv(c) for c in v.T], 1)
        tangents = self._tangents(v.to(self.dtype))
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        for x, probs, passes in self.chunks:
            def with_tangent(values, x=x):
                return jvp(lambda vals: self._output(vals, x), (values,), (tangents,))

            # torch.func.vjp is annotated with a 2-or-3 tuple union, not overloaded on has_aux
            _, pull_back, jv = vjp(with_tangent, self._values, has_aux=True)  # type: ignore[misc]
            (grads,) = pull_back(self._apply_h(jv, probs, passes))
            del pull_back, jv
            for part, n in zip(torch.split(total, self._sizes), self.names):
                part.add_(grads.pop(n).reshape(-1))  # frees each gradient as it is added
        return total.div_(self.num_samples).to(v.dtype)

    def quad_form(self, v: Tensor) -> Tensor:
        """``vᵀ F v`` from forward-mode passes only (no reverse pass)."""
        self.check_vector(v, "v")
        tangents = self._tangents(v.to(self.dtype))
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for x, probs, passes in self.chunks:
            # torch.func.jvp is annotated with a 2-or-3 tuple union, not overloaded on has_aux
            _, jv = jvp(lambda vals, x=x: self._output(vals, x), (self._values,), (tangents,))  # type: ignore[misc]
            total += (jv * self._apply_h(jv, probs, passes)).sum()
        return total / self.num_samples

    def gram(self, v: Tensor) -> Tensor:
        """``VᵀFV`` (``[k, k]``) for the columns of ``v`` (``[p, k]``): one forward-mode pass per
        column and chunk, no reverse pass; the diagonal is :meth:`quad_form` of each column, the
        rest the cross terms ``v_iᵀ F v_j``.

        >>> fisher.gram(torch.stack([step, previous_step], 1))  # doctest: +SKIP
        """
        self.check_vector(v, "v", allow_matrix=True)
        columns = v[:, None] if v.dim() == 1 else v
        tangents = [self._tangents(c.to(self.dtype).contiguous()) for c in columns.T]
        total = torch.zeros(len(tangents), len(tangents), dtype=self.dtype, device=self.device)
        for x, probs, passes in self.chunks:
            jvs = [jvp(lambda vals, x=x: self._output(vals, x), (self._values,), (t,))[1] for t in tangents]
            for i, ju in enumerate(jvs):
                hju = self._apply_h(ju, probs, passes)
                for j in range(i, len(jvs)):
                    total[i, j] += (jvs[j] * hju).sum()
        total = torch.triu(total) + torch.triu(total, 1).T
        return total / self.num_samples

    def trace(self, num_probes: int = 32, generator: torch.Generator | None = None) -> Tensor:
        """A Hutchinson **estimate** of ``tr F``: the mean of ``zᵀ F z`` over ``num_probes``
        Rademacher vectors ``z`` (unbiased; its variance is ``2(‖F‖²_F − Σ F_jj²)/num_probes``).
        Each probe costs one forward-mode pass. Use :meth:`diagonal` for the exact trace.
        """
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"Invalid num_probes: {num_probes!r} (expected an int >= 1)")
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for _ in range(num_probes):
            z = torch.randint(0, 2, (self.num_params,), generator=generator).to(self.dtype) * 2 - 1
            total += self.quad_form(z.to(self.device))
        return total / num_probes

    def diagonal(self) -> Tensor:
        """``diag F``, exactly, from per-sample gradients of each pass (``score_rows``, chunk by
        chunk: memory ``chunk_size × p``): one pass per sample for "empirical", per draw for
        "mc", per class (categorical logits ``[n, C]`` only) or output element for "exact".
        """
        self._check_fresh()
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        kwargs: dict[str, Any] = dict(likelihood=self.likelihood, params=self.params,
                                      chunk_size=max(len(c[0]) for c in self.chunks))
        for x, _, passes in self.chunks:
            if self.fisher_type == "exact":
                total += score_rows(self.model, x, fisher_type="exact", **kwargs).pow(2).sum(0)
                continue
            for target, weight, _ in passes:
                rows = score_rows(self.model, x, target, fisher_type="empirical", loss_fn=self.loss_fn, **kwargs)
                total += (rows if weight is None else rows * weight[:, None]).pow(2).sum(0)
        return total / self.num_samples

    def solve(self, v: Tensor, damping: float, *, tol: float | None = None, max_iters: int | None = None,
              preconditioner: FisherMatrix | Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``(F + damping·I)⁻¹ v`` by conjugate gradient (:func:`natgrad.solvers.conjugate_gradient`;
        ``tol`` defaults to 1e-10 in float64 and 1e-5 otherwise, ``max_iters`` to p). A solve
        that stops at ``max_iters`` before ``tol`` warns (RuntimeWarning); the result of the last
        solve is kept as ``last_solve``.
        """
        from natgrad.solvers import conjugate_gradient

        _check_damping(damping)
        self.check_vector(v, "v", allow_matrix=True)
        if v.dim() == 2:
            return torch.stack([self.solve(c, damping, tol=tol, max_iters=max_iters,
                                           preconditioner=preconditioner) for c in v.T], 1)
        if tol is None:
            tol = 1e-10 if self.dtype == torch.float64 else 1e-5
        self.last_solve = conjugate_gradient(self, v, damping=damping, tol=tol, max_iters=max_iters or self.num_params,
                                             preconditioner=preconditioner, warn=True)
        return self.last_solve.solution

    # ---- checks -------------------------------------------------------------------------------

    def check_vector(self, v: object, name: str = "v", allow_matrix: bool = False) -> None:
        """Raises ValueError naming ``name`` unless ``v`` is a finite floating-point vector of
        length p (or a ``[p, k]`` matrix when ``allow_matrix``).
        """
        shapes = f"[{self.num_params}]" + (f" or [{self.num_params}, k]" if allow_matrix else "")
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape {shapes}, got "
                             f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.dim() not in ((1, 2) if allow_matrix else (1,)) or v.shape[0] != self.num_params:
            raise ValueError(f"{name} must have shape {shapes} (one entry per parameter), got "
                             f"{tuple(v.shape)}")
        if not bool(torch.isfinite(max_abs(v))):  # no p-sized temporaries, unlike isfinite(v)
            raise ValueError(f"{name} holds NaN or Inf")

    def _check_fresh(self) -> None:
        if any(p._version != k for p, k in zip(self._live, self._versions)):
            raise RuntimeError("ImplicitFisher: the model's parameters changed in place since this "
                               "Fisher was built; build a new one at the new parameters")

    @override
    def tensors(self) -> list[Tensor]:
        held = []
        for x, probs, passes in self.chunks:
            held += [x] + ([probs] if probs is not None else [])
            held += [t for target, weight, r in passes for t in (target, weight, r) if isinstance(t, Tensor)]
        return held
