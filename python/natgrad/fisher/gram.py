r"""A batch's per-sample gradient rows ``U`` as a sum of per-layer parts, most of them implicit.

``F = UᵀU / n`` is the batch's empirical (or sampled, or exact) Fisher; its damped solve by the
Woodbury identity only needs the Gram matrix ``U Uᵀ`` and the products ``U v`` and ``Uᵀ w``:

.. math::
    (F + \lambda I)^{-1} v = \bigl(v - U^\top (U U^\top + n\lambda I)^{-1} U v\bigr) / \lambda .

For the layers whose kind forms implicit rows (:mod:`natgrad.curvature.layers`: Linear with any
leading shape, convolutions, Embedding, and any kind :func:`natgrad.curvature.register_layer`
adds) the three come from the layer's captured inputs ``X`` and output gradients ``G`` (the C++
ops of :mod:`natgrad.ops.gram`, through the kind): the Gram of a Linear layer is
``(X Xᵀ) ∘ (G Gᵀ)``, ``U v`` and ``Uᵀ w`` are one GEMM each, and
``U`` is never formed. Every other parameter (LayerNorm, a weight used functionally or shared
between modules, a layer called on a reshaped batch, ...) gets explicit torch.func rows, and the
parts add up in one Gram matrix. Rows are pass-major: ``fisher_type="mc"``/``"exact"`` run one
backward pass per sampled label / class (weights ``sqrt(p_c)``), the same passes for both kinds.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad.curvature import LayerKind, capturing, kind_of, kronecker_block, owner_groups, parameter_users
from natgrad.fisher.scores import check_request, pass_rows, score_rows, score_rows_and_losses
from natgrad.likelihoods import Likelihood

__all__ = ["CHUNK_ELEMENTS", "BatchRows", "DenseRows", "LayerRows", "collect_rows", "supported_layers"]

#: weight entries per block of a layer's direction (see :meth:`LayerRows.tmv_chunks`)
CHUNK_ELEMENTS = 1 << 17


@dataclass
class DenseRows:
    """Explicit rows ``[R, Σ numel]`` over the parameters ``index`` (positions in the caller's
    parameter list), concatenated flat in that order.
    """

    rows: Tensor
    index: list[int]
    shapes: list[torch.Size]

    def tensors(self) -> list[Tensor]:
        """The tensors with one block of rows per sample (for gathering)."""
        return [self.rows]

    def with_tensors(self, tensors: list[Tensor]) -> DenseRows:
        """A copy holding ``tensors`` (in :meth:`tensors` order)."""
        return DenseRows(tensors[0], self.index, self.shapes)

    def row_bound(self) -> float:
        """An upper bound on ``|U_rk|`` over this part's entries."""
        return _max_abs(self.rows)

    def gram(self) -> Tensor:
        """``U Uᵀ`` of these columns."""
        return self.rows @ self.rows.T

    def mv(self, vs: Sequence[Tensor]) -> Tensor:
        """``U v`` for ``v`` given per parameter (indexed like the caller's list)."""
        return self.rows @ torch.cat([vs[i].reshape(-1).to(self.rows.dtype) for i in self.index])

    def tmv_chunks(self, w: Tensor) -> Iterator[tuple[int, tuple, Tensor]]:
        """``Uᵀ w`` as ``(parameter index, () (the whole parameter), tensor)``."""
        for i, t in zip(self.index, self.tmv_like(self.rows.T @ w)):
            yield i, (), t

    def diagonal(self, num_samples: int) -> list[Tensor]:
        """``diag(UᵀU) / n`` per parameter."""
        return self.tmv_like(self.rows.pow(2).sum(0) / num_samples)

    def tmv_like(self, flat: Tensor) -> list[Tensor]:
        """A flat vector over these columns as one tensor per parameter."""
        sizes = [math.prod(s) for s in self.shapes]
        return [part.view(s) for part, s in zip(flat.split(sizes), self.shapes)]


@dataclass
class LayerRows:
    """One supported layer's rows, implicitly: its input ``x`` ``[N, ...]`` (indices for
    Embedding) and output gradients ``g`` ``[R, ...]`` (pass-major); parameters ``index``
    (weight, then bias if the layer has one and it is optimized). The products are the layer
    kind's (:class:`natgrad.curvature.LayerKind`).
    """

    module: nn.Module
    kind: LayerKind
    x: Tensor
    g: Tensor
    index: list[int]

    def tensors(self) -> list[Tensor]:
        """The tensors this representation holds: the layer's inputs and output gradients."""
        return [self.x, self.g]

    def with_tensors(self, tensors: list[Tensor]) -> LayerRows:
        """The same rows over other tensors (e.g. all-gathered across ranks)."""
        return LayerRows(self.module, self.kind, tensors[0], tensors[1], self.index)

    @property
    def _bias(self) -> bool:
        return len(self.index) == 2

    def row_bound(self) -> float:
        """An upper bound on ``|U_rk|``: positions × max|activation| × max|output gradient|."""
        return self.kind.row_bound(self.module, self.x, self.g, self._bias)

    def gram(self) -> Tensor:
        """This layer's share of ``U Uᵀ``, ``[n, n]``, without forming ``U``."""
        return self.kind.gram(self.module, self.x, self.g, self._bias)

    def mv(self, vs: Sequence[Tensor]) -> Tensor:
        """``U v`` for this layer's part of ``v`` (``vs`` indexed like the parameters), ``[n]``."""
        w = vs[self.index[0]].to(self.g.dtype)
        b = vs[self.index[1]].to(self.g.dtype) if self._bias else None
        return self.kind.rows_mv(self.module, self.x, self.g, w, b)

    def tmv_chunks(self, w: Tensor) -> Iterator[tuple[int, tuple, Tensor]]:
        """``Uᵀ w`` in blocks of at most :data:`CHUNK_ELEMENTS` weight entries (blocks of output
        features, as the kind chooses), as ``(parameter index, index into the parameter,
        block)``, so the caller never holds a whole layer's direction at once.
        """
        return self.kind.rows_tmv(self.module, self.x, self.g, w, self.index, CHUNK_ELEMENTS)


Part = DenseRows | LayerRows


@dataclass
class BatchRows:
    """``U`` (``num_rows`` rows over ``num_params`` parameters) of ``num_samples`` samples as a
    sum of column blocks; ``F = UᵀU / num_samples``.
    """

    parts: list[Part]
    num_samples: int
    num_params: int
    last_rung: int = field(default=0)
    #: set by :meth:`directions` before its first yield: every direction is provably finite
    #: (so a caller may apply each part as it comes)
    finite_guaranteed: bool = field(default=False)

    @property
    def num_rows(self) -> int:
        """The number of per-sample rows ``n`` (samples, or samples × classes for the exact Fisher)."""
        part = self.parts[0]
        return part.rows.shape[0] if isinstance(part, DenseRows) else part.g.shape[0]

    @property
    def implicit(self) -> bool:
        """Whether any part is a layer's implicit rows."""
        return any(isinstance(p, LayerRows) for p in self.parts)

    def gram(self) -> Tensor:
        """``U Uᵀ`` ``[R, R]``, summed over the parts."""
        total = self.parts[0].gram()
        for part in self.parts[1:]:
            total = total + part.gram().to(total.dtype)
        return total

    def mv(self, vs: Sequence[Tensor]) -> Tensor:
        """``U v`` ``[R]`` for ``v`` given as one tensor per parameter."""
        total = self.parts[0].mv(vs)
        for part in self.parts[1:]:
            total = total + part.mv(vs).to(total.dtype)
        return total

    def diagonal(self) -> list[Tensor]:
        """``diag(F)`` per parameter (explicit rows only)."""
        out: list[Tensor | None] = [None] * self.num_params
        for part in self.parts:
            if not isinstance(part, DenseRows):
                raise RuntimeError("BatchRows.diagonal needs explicit rows (rows='explicit')")
            for i, d in zip(part.index, part.diagonal(self.num_samples)):
                out[i] = d
        return out  # type: ignore[return-value]

    def directions(self, vs: Sequence[Tensor], damping: float) -> Iterator[tuple[int, tuple, Tensor]]:
        """``(F + λI)⁻¹ v`` by the Woodbury identity. Solves the small system now (setting
        ``last_rung`` and ``finite_guaranteed``) and returns an iterator of ``(parameter index,
        index into the parameter, block)`` that forms the direction one block at a time, so a
        caller that applies each at once never holds all of it. A batch of explicit rows alone is solved by the
        ``woodbury_solve`` op (which picks the n×n or p×p system by cost).
        """
        if len(self.parts) == 1 and isinstance(self.parts[0], DenseRows):
            part = self.parts[0]
            rows = part.rows
            if rows.shape[0] != self.num_samples:  # the op normalises by its row count
                rows = rows * math.sqrt(rows.shape[0] / self.num_samples)
            flat = torch.cat([vs[i].reshape(-1).to(rows.dtype) for i in part.index])
            res = ops.woodbury_solve(rows, flat, damping)
            self.last_rung = int(res.rung)
            self.finite_guaranteed = math.isfinite(_max_abs(res.solution))
            return ((i, (), t) for i, t in zip(part.index, part.tmv_like(res.solution)))
        gram_res = ops.gram_solve(self.gram(), self.mv(vs), self.num_samples * damping)
        self.last_rung = int(gram_res.rung)
        y = gram_res.solution
        # |(v - Uᵀy)_k| / λ <= (max|v| + R max|y| max|U|) / λ: below the dtype's range, every
        # direction is finite without looking at it.
        peak_v = _max_abs_all([vs[i] for part in self.parts for i in part.index])
        peak_u = max(part.row_bound() for part in self.parts)
        limit = min(torch.finfo(_dtype(part)).max for part in self.parts) / 4
        self.finite_guaranteed = (peak_v + self.num_rows * _max_abs(y) * peak_u) / damping < limit
        return self._parts_directions(vs, y, damping)

    def _parts_directions(self, vs: Sequence[Tensor], y: Tensor, damping: float) -> Iterator[tuple[int, tuple, Tensor]]:
        """``(v − Uᵀy)/λ`` block by block (in place on each ``Uᵀy`` block)."""
        for part in self.parts:
            for i, where, u in part.tmv_chunks(y.to(_dtype(part))):
                v = vs[i][where]
                yield i, where, u.view_as(v).sub_(v).div_(-damping)

    def gathered(self, all_gather: Callable[[Tensor], list[Tensor]], world: int) -> BatchRows:
        """Every rank's rows (equal shards): inputs concatenated in rank order, rows reordered
        so that they stay pass-major over the whole batch.
        """
        parts = []
        for part in self.parts:
            tensors = part.tensors()
            new = []
            for k, t in enumerate(tensors):
                pieces = all_gather(t)
                if isinstance(part, LayerRows) and k == 0:  # inputs: one row per sample
                    new.append(torch.cat(pieces))
                    continue
                stacked = torch.stack(pieces)  # [world, P * n, ...]
                local = self.num_samples
                passes = t.shape[0] // local
                stacked = stacked.reshape(world, passes, local, *t.shape[1:]).transpose(0, 1)
                new.append(stacked.reshape(passes * world * local, *t.shape[1:]))
            parts.append(part.with_tensors(new))
        return BatchRows(parts, self.num_samples * world, self.num_params)


def _max_abs(t: Tensor) -> float:
    """Max |t| as a float (NaN if t holds NaN; 0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


def _max_abs_all(tensors: Sequence[Tensor]) -> float:
    """Max |t| over several tensors with one host read."""
    ends = [torch.stack(torch.aminmax(t)).to(torch.float64).abs() for t in tensors if t.numel()]
    return float(torch.cat(ends).max()) if ends else 0.0


def _dtype(part: Part) -> torch.dtype:
    return part.rows.dtype if isinstance(part, DenseRows) else part.g.dtype


def supported_layers(model: nn.Module,
                     params: Sequence[nn.Parameter]) -> dict[str, tuple[LayerKind, nn.Module, list[int]]]:
    """The modules whose rows can be implicit: ``name -> (kind, module, parameter indices)``. A
    module qualifies when it has a Kronecker block for exactly the optimized parameters it owns,
    none of them is shared with another module, and its kind forms its rows implicitly.
    """
    users = parameter_users(model)
    out = {}
    for name, module, idx in owner_groups(model, params):
        block, _ = kronecker_block(name, module, [params[i] for i in idx])
        if block is None or module is None or any(len(users.get(id(params[i]), ())) > 1 for i in idx):
            continue
        kind = kind_of(module)
        if kind is None or not kind.implicit_rows(module):
            continue
        out[name] = (kind, module, idx)
    return out


def _finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every floating tensor is finite: NaN/Inf reach min or max, so two scalars per
    tensor decide it (one aminmax pass each, one host read for all).
    """
    ends = [torch.stack(torch.aminmax(t)).to(torch.float64)
            for t in tensors if t.numel() and t.is_floating_point()]
    return torch.isfinite(torch.cat(ends)).all() if ends else torch.tensor(True)


def _per_sample_losses(out: Tensor, targets: Tensor, lik: Likelihood, loss_fn) -> Tensor:
    if loss_fn is None:
        return lik.nll(out, targets, "none")
    return torch.vmap(lambda o, t: loss_fn(o[None], t[None]).reshape(()))(out, targets)


def collect_rows(model: nn.Module, inputs: Tensor, targets: Tensor, params: Sequence[nn.Parameter], *,
                 fisher_type: str, likelihood: str | Likelihood, loss_fn=None,
                 generator: torch.Generator | None = None, chunk_size: int = 256,
                 implicit: bool = True) -> tuple[BatchRows, Tensor, list[Tensor]]:
    """The batch's rows for ``fisher_type``, its per-sample losses ``[n]`` (detached) and the
    batch-mean gradient per parameter, all validated finite (FloatingPointError otherwise).

    With ``implicit`` one forward and one backward pass per Fisher pass (plus torch.func rows for
    unsupported parameters); otherwise every row is explicit (torch.func, as
    :func:`natgrad.fisher.score_rows`). Inputs and targets are checked first (ValueError: empty
    batch, NaN/Inf, mismatched lengths or shapes).
    """
    lik, chosen = check_request(model, inputs, targets, "empirical", likelihood, params, 1, chunk_size)
    n = inputs.shape[0]
    if not implicit:
        kwargs: dict[str, Any] = dict(params=chosen, likelihood=lik, chunk_size=chunk_size)
        rows, empirical_losses = score_rows_and_losses(model, inputs, targets, fisher_type="empirical",
                                                       loss_fn=loss_fn, **kwargs)
        assert empirical_losses is not None  # always returned for fisher_type="empirical"
        flat_mean = rows.mean(0)
        if fisher_type != "empirical":
            rows = score_rows(model, inputs, fisher_type=fisher_type, generator=generator, **kwargs)
        part = DenseRows(rows, list(range(len(chosen))), [p.shape for p in chosen])
        _check_finite([rows, flat_mean, empirical_losses])
        return BatchRows([part], n, len(chosen)), empirical_losses.detach(), part.tmv_like(flat_mean)
    layers = supported_layers(model, chosen)
    with torch.enable_grad(), capturing({k: v[1] for k, v in layers.items()}) as caps:
        out = model(inputs)
        records = {name: list(cap.records) for name, cap in caps.items()}  # cleared on exit
    if loss_fn is None:
        lik.check(out, targets)
    elif out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"the model's output must have one entry per input ({n}), got shape {tuple(out.shape)}")
    losses = _per_sample_losses(out, targets, lik, loss_fn)
    passes = None if fisher_type == "empirical" else lik.pseudo_targets(out.detach(), fisher_type, None, 1, generator)
    data = {}
    for name, (kind, module, idx) in layers.items():
        x = kind.rows_input(module, [r.input for r in records[name]], n)
        if x is not None:
            data[name] = x
    recs = {name: records[name] for name in data}
    outputs = [cast(Tensor, r.output) for name in data for r in recs[name]]  # set by the forward hook
    grads = torch.autograd.grad(losses.sum(), outputs + list(chosen), retain_graph=passes is not None,
                                allow_unused=True)
    # autograd's fresh gradient buffers become the means in place (no second parameter-sized
    # copy), unless one is also a layer's output gradient (a parameter added to an output as is)
    shared = {g.data_ptr() for g in grads[:len(outputs)] if g is not None}
    mean = [torch.zeros_like(p) if g is None else (g / n if g.data_ptr() in shared else g.div_(n))
            for p, g in zip(chosen, grads[len(outputs):])]
    per_pass = [grads[:len(outputs)]]
    for k, (target, weight) in enumerate(passes or []):
        per_pass.append(torch.autograd.grad(lik.weighted_nll(out, target, weight), outputs,
                                            retain_graph=k + 1 < len(passes or []), allow_unused=True))
    per_pass = per_pass[1:] if passes is not None else per_pass
    parts: list[Part] = []
    covered: set[int] = set()
    k = 0
    for name, x in data.items():
        kind, module, idx = layers[name]
        count = len(recs[name])
        passes_grads = [[(torch.zeros_like(r.output) if g is None else g).detach()
                         for r, g in zip(recs[name], pass_grads[k:k + count])] for pass_grads in per_pass]
        k += count
        g = kind.rows_grads(module, x, passes_grads)
        parts.append(LayerRows(module, kind, x.detach(), g, idx))
        covered.update(idx)
    rest = [i for i in range(len(chosen)) if i not in covered]
    if rest:
        fisher_passes = passes if passes is not None else [(targets, None)]
        rows = pass_rows(model, inputs, fisher_passes, [chosen[i] for i in rest], lik,
                         loss_fn if passes is None else None, chunk_size)
        parts.append(DenseRows(rows, rest, [chosen[i].shape for i in rest]))
    _check_finite([losses] + mean + [t for part in parts for t in part.tensors()])
    return BatchRows(parts, n, len(chosen)), losses.detach(), mean


def _check_finite(tensors: Sequence[Tensor]) -> None:
    if not bool(_finite_flag(tensors)):
        raise FloatingPointError("NaturalGradient.backward: the per-sample gradients or losses hold "
                                 "NaN or Inf (finite inputs, but the model overflowed?); .grad and "
                                 "the parameters were not changed")
