"""natgrad.fisher.compute_fisher: a model's Fisher over data, in the structure you ask for."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from natgrad._vocabulary import _UNSET, STRUCTURES, check_choice, renamed_argument
from natgrad.curvature import KroneckerBlock, capturing, kronecker_block, owner_groups
from natgrad.fisher.implicit import ImplicitFisher
from natgrad.fisher.matrices import (
    BlockDiagonalFisher,
    BlockFisher,
    DenseFisher,
    DiagonalFisher,
    FisherMatrix,
    LowRankFisher,
)
from natgrad.fisher.scores import check_request, score_rows
from natgrad.likelihoods import Likelihood, get_likelihood

__all__ = ["STRUCTURES", "compute_fisher", "kfac_blocks"]


def compute_fisher(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                   fisher_type: str = _UNSET, structure: str = "dense",
                   likelihood: str | Likelihood = "categorical",
                   params: Sequence[nn.Parameter] | None = None, mc_samples: int = 1,
                   generator: torch.Generator | None = None, chunk_size: int = 256,
                   kind: str = _UNSET) -> FisherMatrix:
    """The Fisher information of ``model`` over ``inputs``: the mean over samples of
    per-sample score outer products, for the label distribution ``fisher_type`` selects.

    Args:
        model (nn.Module): maps ``inputs`` to logits (categorical) or means (Gaussian, unit
            variance). Samples must be independent (no BatchNorm in training mode).
        inputs (Tensor): ``[n, ...]``.
        targets (Tensor, optional): observed labels, needed for ``fisher_type="empirical"``.
        fisher_type (str): "empirical" (observed labels), "mc" (labels sampled from the model,
            ``mc_samples`` draws) or "exact" (expectation over the predictive distribution)
            (default: "empirical").
        structure (str): "dense", "lowrank", "diagonal", "block_diagonal" (one dense block per
            module) or "kfac" (the Kronecker blocks natgrad.KFAC uses for the layer kinds of
            :mod:`natgrad.curvature.layers`, Linear in the "expand" form, and dense blocks for
            other modules), or "implicit" (nothing stored: exact matrix-free products ``F v = Jᵀ H J v`` by jvp/vjp, see
            :class:`natgrad.fisher.ImplicitFisher`) (default: "dense").
            See :mod:`natgrad.fisher.matrices` for their memory.
        likelihood (str): "categorical" or "gaussian" (default: "categorical").
        params (sequence of nn.Parameter, optional): parameters, in vector order (default: all
            trainable parameters of ``model``).
        mc_samples (int): draws per sample for ``fisher_type="mc"`` (default: 1).
        generator (torch.Generator, optional): CPU generator for ``fisher_type="mc"``.
        chunk_size (int): samples per vectorised batch (default: 256).
        kind (str): deprecated spelling of ``fisher_type``.

    Returns:
        FisherMatrix: over the flattened ``params`` (concatenated in order). For "kfac", a
        :class:`~natgrad.fisher.BlockDiagonalFisher` whose
        :meth:`~natgrad.fisher.BlockDiagonalFisher.kronecker_factors` gives each layer's
        ``(A, G)`` by module name.
    """
    fisher_type = renamed_argument("fisher_type", fisher_type, "kind", kind, "empirical", "compute_fisher")
    check_choice("structure", structure, STRUCTURES)
    lik, chosen = check_request(model, inputs, targets, fisher_type, likelihood, params, mc_samples, chunk_size)
    n = inputs.shape[0]
    rows_kwargs: dict[str, Any] = dict(fisher_type=fisher_type, likelihood=lik, mc_samples=mc_samples,
                       generator=generator, chunk_size=chunk_size)
    if structure == "implicit":
        return ImplicitFisher(model, inputs, targets, params=chosen, **rows_kwargs)
    if structure == "kfac":
        return _kfac(model, inputs, targets, chosen, rows_kwargs)
    if structure == "lowrank":
        return LowRankFisher(score_rows(model, inputs, targets, params=chosen, **rows_kwargs), n)
    acc: list[Tensor] | None = None
    for start in range(0, n, chunk_size):
        y = None if targets is None else targets[start:start + chunk_size]
        u = score_rows(model, inputs[start:start + chunk_size], y, params=chosen, **rows_kwargs)
        if structure == "diagonal":
            part = [u.pow(2).sum(0)]
        elif structure == "dense":
            part = [u.T @ u]
        else:
            part = [s.T @ s for s in _module_slices(u, model, chosen)]
        acc = part if acc is None else [a + b for a, b in zip(acc, part)]
    sums = cast(list[Tensor], acc)  # None only for an empty batch, which fails here as before
    if structure == "diagonal":
        return DiagonalFisher(sums[0] / n)
    if structure == "dense":
        return DenseFisher(sums[0] / n)
    return BlockDiagonalFisher([DenseFisher(b / n) for b in sums])


def _module_slices(u: Tensor, model: nn.Module, params: list[nn.Parameter]) -> list[Tensor]:
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return [u[:, offsets[idx[0]]:offsets[idx[-1] + 1]] for _, _, idx in owner_groups(model, params)]


def _kfac(model, inputs, targets, params, rows_kwargs) -> BlockDiagonalFisher:
    groups = owner_groups(model, params)
    blocks: dict[int, KroneckerBlock] = {}
    for i, (name, module, idx) in enumerate(groups):
        block, _ = kronecker_block(name, module, [params[j] for j in idx])
        if block is not None:
            blocks[i] = block
    kfac_blocks(model, list(blocks.values()), inputs, targets, **rows_kwargs)
    dense_params = [params[j] for i, (_, _, idx) in enumerate(groups) if i not in blocks for j in idx]
    dense = iter(cast(BlockDiagonalFisher, compute_fisher(model, inputs, targets, structure="block_diagonal",
                                                          params=dense_params, **rows_kwargs)).blocks
                 if dense_params else [])
    return BlockDiagonalFisher([BlockFisher(blocks[i]) if i in blocks else next(dense)
                                for i in range(len(groups))])


def kfac_blocks(model: nn.Module, blocks: Sequence[KroneckerBlock], inputs: Tensor,
                targets: Tensor | None = None, *, fisher_type: str = "empirical",
                likelihood: str | Likelihood = "categorical", mc_samples: int = 1,
                generator: torch.Generator | None = None, chunk_size: int = 256) -> None:
    """Fills ``blocks`` (curvature blocks of ``model``'s layers) with their factors averaged over
    all of ``inputs``: the same estimator natgrad.KFAC runs on every step, with the label passes
    of ``fisher_type`` back-propagated through one forward per chunk. A layer the forward never
    calls (an old head) gets zero factors; one called twice per forward raises.
    """
    lik = get_likelihood(likelihood)
    if not blocks:
        return
    seen = 0
    with capturing({b.name: b.module for b in blocks}) as captures:
        for start in range(0, inputs.shape[0], chunk_size):
            x = inputs[start:start + chunk_size]
            y = None if targets is None else targets[start:start + chunk_size]
            for capture in captures.values():
                capture.clear()
            with torch.enable_grad():
                out = model(x)
                twice = [b for b in blocks if len(captures[b.name].records) > 1]
                if twice:
                    raise ValueError(
                        "structure='kfac' needs each layer called once per forward; "
                        f"{type(twice[0].module).__name__} {twice[0].name!r} is called "
                        f"{len(captures[twice[0].name].records)} times (use structure='block_diagonal' or 'diagonal')")
                called = [b for b in blocks if captures[b.name].records]
                # set by the forward hook for every recorded call
                outputs = [cast(Tensor, captures[b.name].records[0].output) for b in called]
                passes = lik.pseudo_targets(out, fisher_type, y, mc_samples, generator)
                grads = [torch.autograd.grad(lik.weighted_nll(out, t, w), outputs, retain_graph=True,
                                             allow_unused=True) for t, w in passes] if called else []
            for j, block in enumerate(called):
                parts = [_zeros_if_none(gs[j], outputs[j]) for gs in grads]
                g = parts[0] if len(parts) == 1 else torch.cat(parts)
                block.update([captures[block.name].records[0].input], [g.detach()],
                             decay=seen / (seen + len(x)), grad_scale=1.0)
            seen += len(x)
    for block in blocks:
        block.ensure_factors()


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g
