"""natgrad.fisher.compute_fisher: a model's Fisher over data, in the structure you ask for."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from natgrad import ops
from natgrad.curvature import unsupported_reason
from natgrad.fisher.matrices import (BlockDiagonalFisher, DenseFisher, DiagonalFisher,
                                     FisherMatrix, KroneckerBlock, LowRankFisher)
from natgrad.fisher.scores import KINDS, LIKELIHOODS, check_params, score_rows

STRUCTURES = ("dense", "lowrank", "diagonal", "block_diagonal", "kfac")


def compute_fisher(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                   kind: str = "empirical", structure: str = "dense",
                   likelihood: str = "categorical", params: Sequence[nn.Parameter] | None = None,
                   mc_samples: int = 1, generator: torch.Generator | None = None,
                   chunk_size: int = 256) -> FisherMatrix:
    """The Fisher information of ``model`` over ``inputs``: the mean over samples of
    per-sample score outer products, for the label distribution ``kind`` selects.

    Args:
        model (nn.Module): maps ``inputs`` to logits (categorical) or means (Gaussian, unit
            variance). Samples must be independent (no BatchNorm in training mode).
        inputs (Tensor): ``[n, ...]``.
        targets (Tensor, optional): observed labels, needed for ``kind="empirical"``.
        kind (str): "empirical" (observed labels), "mc" (labels sampled from the model,
            ``mc_samples`` draws) or "exact" (expectation over the predictive distribution)
            (default: "empirical").
        structure (str): "dense", "lowrank", "diagonal", "block_diagonal" (one dense block per
            module) or "kfac" (Kronecker blocks A ⊗ G for Linear/Conv2d in the "expand" form,
            dense blocks for other modules) (default: "dense"). See
            :mod:`natgrad.fisher.matrices` for their memory.
        likelihood (str): "categorical" or "gaussian" (default: "categorical").
        params (sequence of nn.Parameter, optional): parameters, in vector order (default: all
            trainable parameters of ``model``).
        mc_samples (int): draws per sample for ``kind="mc"`` (default: 1).
        generator (torch.Generator, optional): CPU generator for ``kind="mc"``.
        chunk_size (int): samples per vectorised batch (default: 256).

    Returns:
        FisherMatrix: over the flattened ``params`` (concatenated in order).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"Invalid structure: {structure!r} (expected one of {STRUCTURES})")
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {KINDS})")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"Invalid likelihood: {likelihood!r} (expected one of {LIKELIHOODS})")
    chosen = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    check_params(chosen)
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("inputs holds no samples")
    rows_kwargs = dict(kind=kind, likelihood=likelihood, mc_samples=mc_samples, generator=generator,
                       chunk_size=chunk_size)
    if structure == "kfac":
        return _kfac(model, inputs, targets, chosen, rows_kwargs)
    if structure == "lowrank":
        return LowRankFisher(score_rows(model, inputs, targets, params=chosen, **rows_kwargs), n)
    sizes = [p.numel() for p in chosen]
    acc = None
    for start in range(0, n, chunk_size):
        y = None if targets is None else targets[start:start + chunk_size]
        u = score_rows(model, inputs[start:start + chunk_size], y, params=chosen, **rows_kwargs)
        if structure == "diagonal":
            part = u.pow(2).sum(0)
        elif structure == "dense":
            part = u.T @ u
        else:
            part = [s.T @ s for s in _module_slices(u, model, chosen)]
        acc = part if acc is None else (
            [a + b for a, b in zip(acc, part)] if isinstance(part, list) else acc + part)
    if structure == "diagonal":
        return DiagonalFisher(acc / n)
    if structure == "dense":
        return DenseFisher(acc / n)
    return BlockDiagonalFisher([DenseFisher(b / n) for b in acc])


def owner_groups(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[nn.Module | None, list[int]]]:
    """Consecutive runs of parameter indices that belong to the same module."""
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    groups: list[tuple[nn.Module | None, list[int]]] = []
    for i, p in enumerate(params):
        m = owner.get(id(p))
        if groups and groups[-1][0] is m:
            groups[-1][1].append(i)
        else:
            groups.append((m, [i]))
    return groups


def _module_slices(u: Tensor, model: nn.Module, params: list[nn.Parameter]) -> list[Tensor]:
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return [u[:, offsets[idx[0]]:offsets[idx[-1] + 1]] for _, idx in owner_groups(model, params)]


def _kron_supported(module: nn.Module | None, params: list[nn.Parameter], idx: list[int]) -> bool:
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or unsupported_reason(module) is not None:
        return False
    own = [module.weight] + ([module.bias] if module.bias is not None else [])
    return [id(params[i]) for i in idx] == [id(p) for p in own]


def _kron_order(module: nn.Module) -> Tensor:
    """Parameter-vector position -> row-major position in the [d_out, d_in (+1)] matrix."""
    d_out = module.weight.shape[0]
    d_in = module.weight[0].numel()
    width = d_in + (module.bias is not None)
    rows = torch.arange(d_out)[:, None] * width
    order = [(rows + torch.arange(d_in)[None, :]).reshape(-1)]
    if module.bias is not None:
        order.append(rows[:, 0] + d_in)
    return torch.cat(order)


def _kfac(model, inputs, targets, params, rows_kwargs) -> BlockDiagonalFisher:
    groups = owner_groups(model, params)
    kron = [m for m, idx in groups if _kron_supported(m, params, idx)]
    factors = _kron_factors(model, inputs, targets, kron, rows_kwargs)
    dense_params = [params[i] for m, idx in groups if m not in factors for i in idx]
    dense = iter(compute_fisher(model, inputs, targets, structure="block_diagonal", params=dense_params,
                                **rows_kwargs).blocks if dense_params else [])
    blocks = []
    for m, idx in groups:
        if m in factors:
            a, g = factors[m]
            blocks.append(KroneckerBlock(a, g, _kron_order(m).to(a.device)))
        else:
            blocks.append(next(dense))
    return BlockDiagonalFisher(blocks)


def _kron_factors(model, inputs, targets, modules, rows_kwargs) -> dict:
    """A and G of each module, averaged over all samples, for the requested label kind."""
    kind, likelihood = rows_kwargs["kind"], rows_kwargs["likelihood"]
    seen: dict[nn.Module, list] = {m: [] for m in modules}
    factors: dict[nn.Module, list] = {}
    handles = [m.register_forward_hook(lambda mod, args, out: seen[mod].append((args[0].detach(), out)))
               for m in modules]
    rows_done = 0
    try:
        for start in range(0, inputs.shape[0], rows_kwargs["chunk_size"]):
            x = inputs[start:start + rows_kwargs["chunk_size"]]
            for m in modules:
                seen[m].clear()
            with torch.enable_grad():
                out = model(x)
                twice = [m for m in modules if len(seen[m]) > 1]
                if twice:
                    raise ValueError("structure='kfac' needs each Linear/Conv2d module called once per "
                                     f"forward; {type(twice[0]).__name__} is called {len(seen[twice[0]])} "
                                     "times (use structure='block_diagonal' or 'diagonal')")
                called = [m for m in modules if seen[m]]  # an unused module (an old head) has F = 0
                losses = pseudo_losses(out, None if targets is None else targets[start:start + len(x)],
                                        kind, likelihood, rows_kwargs["mc_samples"], rows_kwargs["generator"])
                outputs = [seen[m][0][1] for m in called]
                grads_per_loss = [torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
                                  for loss, _ in losses] if called else []
            weight = rows_done / (rows_done + len(x))  # running mean over chunks
            for j, m in enumerate(called):
                a = seen[m][0][0]
                g_parts = [(grads[j], w) for grads, (_, w) in zip(grads_per_loss, losses)]
                factors[m] = _update_module(m, factors.get(m), a, g_parts, weight)
            for m in modules:
                if not seen[m] and m not in factors:
                    factors[m] = _zero_factors(m)
            rows_done += len(x)
    finally:
        for h in handles:
            h.remove()
    return {m: tuple(f) for m, f in factors.items()}


def pseudo_losses(out: Tensor, y: Tensor | None, kind: str, likelihood: str, draws: int,
                  generator: torch.Generator | None) -> list[tuple[Tensor, float]]:
    """(summed loss, weight) pairs whose output gradients are the score rows of :mod:`scores`."""
    if kind == "empirical":
        return [(_batch_nll(out, y, likelihood), 1.0)]
    if kind == "mc":
        pairs = []
        for _ in range(draws):
            with torch.no_grad():
                if likelihood == "categorical":
                    labels = torch.multinomial(torch.softmax(out.detach().float(), -1).cpu(), 1,
                                               generator=generator).squeeze(1).to(out.device)
                else:
                    labels = out.detach() + torch.randn(out.shape, generator=generator).to(out)
            pairs.append((_batch_nll(out, labels, likelihood), 1.0 / draws))
        return pairs
    if likelihood == "gaussian":
        return [(out[:, o].sum(), 1.0) for o in range(out.shape[1])]
    probs = torch.softmax(out.detach(), -1)
    return [(_batch_nll(out, torch.full((out.shape[0],), c, device=out.device), "categorical", probs[:, c].sqrt()), 1.0)
            for c in range(out.shape[1])]


def _batch_nll(out, y, likelihood, weights=None):
    if likelihood == "categorical":
        per = torch.nn.functional.cross_entropy(out, y, reduction="none")
    else:
        per = 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)
    return (per * weights).sum() if weights is not None else per.sum()


def _zero_factors(m: nn.Module) -> list[Tensor]:
    """A = 0 and G = 0 for a module the forward never called (its gradients are all zero)."""
    d_in = m.weight[0].numel() + (m.bias is not None)
    opts = dict(dtype=m.weight.dtype, device=m.weight.device)
    return [torch.zeros(d_in, d_in, **opts), torch.zeros(m.weight.shape[0], m.weight.shape[0], **opts)]


def _update_module(m, current, a, g_parts, weight):
    """Running mean (over chunks) of A and of G = Σ_parts w·G_part for one module."""
    bias = m.bias is not None
    if isinstance(m, nn.Conv2d):
        a_new = ops.conv2d_act_factor(a, m.kernel_size, m.stride, m.padding, m.dilation, bias)
        g_new = sum(w * ops.conv2d_grad_factor(g, math.sqrt(g.shape[2] * g.shape[3])) for g, w in g_parts)
    else:
        positions = a.numel() // a.shape[-1] // a.shape[0]
        a_new = ops.linear_act_factor(a, bias)
        g_new = sum(w * ops.linear_grad_factor(g, math.sqrt(positions)) for g, w in g_parts)
    if current is None:
        return [a_new, g_new]
    return [weight * current[0] + (1 - weight) * a_new, weight * current[1] + (1 - weight) * g_new]
