"""Per-sample score rows: the matrix U whose rows give a model's Fisher as F = UᵀU / n.

Every Fisher natgrad computes for a model is a mean of outer products of gradients of
per-sample negative log-likelihoods ``ℓ(f(x), y)``; they differ in which labels ``y`` and weights
enter:

* ``"empirical"`` — the observed labels: one row per sample, ``∇ℓ(f(x_n), y_n)``;
* ``"mc"`` — labels sampled from the model's predictive distribution: one row per sample and
  draw, weighted ``1/sqrt(draws)``;
* ``"exact"`` — the expectation over the predictive distribution, for categorical outputs one
  row per sample and class, ``sqrt(p_c) ∇(−log p_c)``; for a unit-variance Gaussian, one row per
  output dimension (the Jacobian, since ``E[(y−f)(y−f)ᵀ] = I``).

Rows are computed with torch.func (``vmap`` over ``grad`` of ``functional_call``), in chunks of
samples, without Python loops over samples. The model must treat samples independently (no
BatchNorm in training mode).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

KINDS = ("empirical", "mc", "exact")
LIKELIHOODS = ("categorical", "gaussian")


def _nll(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """Per-sample negative log-likelihood (up to constants) of one sample's output."""
    if likelihood == "categorical":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction="sum")
    return 0.5 * (output - target).pow(2).sum()


def check_params(params: Sequence[Tensor]) -> None:
    """Parameters must be floating point and require grad (clear errors otherwise)."""
    if not params:
        raise ValueError("params must hold at least one parameter")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] must be floating point, got {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad: "
                             "pass only trainable parameters")


def score_rows(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
               kind: str = "empirical", likelihood: str = "categorical",
               params: Sequence[nn.Parameter] | None = None, mc_samples: int = 1,
               generator: torch.Generator | None = None, chunk_size: int = 256,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """The rows U ([rows, p], p = total size of ``params``) with F = UᵀU / n_samples.

    Args:
        model (nn.Module): maps a batch of inputs to outputs (logits or Gaussian means).
        inputs (Tensor): ``[n, ...]`` samples.
        targets (Tensor, optional): labels for ``kind="empirical"``.
        kind (str): "empirical", "mc" or "exact" (default: "empirical").
        likelihood (str): "categorical" (logits) or "gaussian" (unit variance) (default:
            "categorical").
        params (sequence of nn.Parameter, optional): which parameters (default: all trainable).
        mc_samples (int): draws per sample for ``kind="mc"`` (default: 1).
        generator (torch.Generator, optional): CPU generator for ``kind="mc"``.
        chunk_size (int): samples per vmap call (bounds memory) (default: 256).
        loss_fn (callable, optional): per-sample loss ``loss_fn(output[None], target[None])``
            replacing the likelihood's NLL for ``kind="empirical"``.
    """
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {KINDS})")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"Invalid likelihood: {likelihood!r} (expected one of {LIKELIHOODS})")
    if kind == "empirical" and targets is None:
        raise ValueError("targets are required for kind='empirical'")
    if targets is not None and targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"targets must have one entry per input: got {targets.shape[0]} "
                         f"targets for {inputs.shape[0]} inputs")
    if mc_samples < 1:
        raise ValueError(f"Invalid mc_samples: {mc_samples} (must be >= 1)")
    named = dict(model.named_parameters())
    chosen = list(params) if params is not None else [p for p in named.values() if p.requires_grad]
    check_params(chosen)
    ids = {id(p) for p in chosen}
    names = [n for n, p in named.items() if id(p) in ids]
    if len(names) != len(chosen):
        raise ValueError("params must be parameters of model")
    frozen = {n: p.detach() for n, p in named.items() if id(p) not in ids}
    buffers = dict(model.named_buffers())

    def output_of(train: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, ({**train, **frozen}, buffers), (x[None],))[0]

    def flat(g: dict[str, Tensor]) -> Tensor:
        return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1)

    values = {n: named[n].detach() for n in names}
    rows = []
    for start in range(0, inputs.shape[0], chunk_size):
        x = inputs[start:start + chunk_size]
        rows.append(_chunk_rows(output_of, values, names, x,
                                None if targets is None else targets[start:start + chunk_size],
                                kind, likelihood, mc_samples, generator, loss_fn, flat))
    return torch.cat(rows)


def _chunk_rows(output_of, values, names, x, y, kind, likelihood, mc_samples, generator, loss_fn, flat):
    """Rows of one chunk of samples (see :func:`score_rows`)."""
    if kind == "exact":
        with torch.no_grad():
            out = vmap(output_of, in_dims=(None, 0))(values, x)
        n, outputs = x.shape[0], out[0].numel()
        if likelihood == "categorical" and out.dim() != 2:
            raise ValueError("kind='exact' with a categorical likelihood needs outputs [n, classes], "
                             f"got {tuple(out.shape)}")
        jac = vmap(jacrev(output_of), in_dims=(None, 0))(values, x)  # each [n, *out, *param]
        j = torch.cat([jac[k].reshape(n, outputs, -1) for k in names], 2)  # [n, out, p]
        if likelihood == "gaussian":
            return j.reshape(-1, j.shape[-1])
        probs = torch.softmax(out, -1)
        # ∇(−log p_c) = J ᵀ(p − e_c); weighted by sqrt(p_c): one row per class.
        centered = probs[:, None, :] - torch.eye(probs.shape[1], dtype=probs.dtype)[None]  # [n, c, out]
        rows = torch.einsum("nco,nop->ncp", centered * probs.sqrt()[:, :, None], j)
        return rows.reshape(-1, rows.shape[-1])
    if kind == "empirical":
        per_sample = loss_fn if loss_fn is not None else (lambda o, t: _nll(o, t, likelihood))
        fn = lambda v, xi, yi: per_sample(output_of(v, xi)[None], yi[None])  # noqa: E731
        return flat(vmap(grad(fn), in_dims=(None, 0, 0))(values, x, y))
    with torch.no_grad():
        out = vmap(output_of, in_dims=(None, 0))(values, x)
    draws = []
    for _ in range(mc_samples):
        if likelihood == "categorical":
            p = torch.softmax(out.reshape(-1, out.shape[-1]).float(), -1).cpu()
            labels = torch.multinomial(p, 1, generator=generator).reshape(out.shape[:-1]).to(x.device)
        else:
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)
            labels = out + noise.to(out.dtype)
        fn = lambda v, xi, yi: _nll(output_of(v, xi), yi, likelihood)  # noqa: E731
        draws.append(flat(vmap(grad(fn), in_dims=(None, 0, 0))(values, x, labels)))
    return torch.cat(draws) / mc_samples**0.5 if mc_samples > 1 else draws[0]
