"""Per-sample score rows: the matrix U whose rows give a model's Fisher as F = UᵀU / n.

The rows are the weighted per-sample gradients ``w·∇ℓ(f(x_n), y)`` of the passes a
:class:`natgrad.likelihoods.Likelihood` defines for the requested ``fisher_type``: one row per
sample ("empirical"), per sample and draw ("mc", weight ``1/sqrt(draws)``), or per sample and
class / output element ("exact"). They are computed with torch.func (``vmap`` over ``grad`` of
``functional_call``), in chunks of samples, without Python loops over samples. The model must
treat samples independently (no BatchNorm in training mode).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from natgrad._vocabulary import _UNSET, FISHER_TYPES, check_choice, renamed_argument
from natgrad.likelihoods import LIKELIHOODS, Likelihood, check_count, get_likelihood

KINDS = FISHER_TYPES  # deprecated name of FISHER_TYPES
__all__ = ["FISHER_TYPES", "KINDS", "LIKELIHOODS", "check_inputs", "check_params", "check_request", "functional_model",
           "score_rows"]


def check_params(params: Sequence[Tensor]) -> None:
    """Parameters must be floating point and require grad (clear errors otherwise)."""
    if not params:
        raise ValueError("params must hold at least one parameter")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise ValueError(f"params[{i}] must be a floating-point tensor, got "
                             f"{getattr(p, 'dtype', type(p).__name__)}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad: "
                             "pass only trainable parameters")


def check_inputs(inputs: Tensor, targets: Tensor | None, what: str = "inputs") -> None:
    """A non-empty batch of finite inputs (and finite float targets) with matching lengths: the
    one check of a Fisher estimate's data (``torch.ops.natgrad.likelihood_check_batch``, shared
    with the C++ frontend), after the Python types.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{what} must be a Tensor, got {type(inputs).__name__}")
    if targets is not None and not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    for name, t in ((what, inputs), ("targets", targets)):
        if isinstance(t, Tensor) and t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (shapes only, no values): a Fisher needs data")
    torch.ops.natgrad.likelihood_check_batch(inputs, targets, what)


def check_request(model: nn.Module, inputs: Tensor, targets: Tensor | None, fisher_type: str,
                  likelihood: str | Likelihood, params: Sequence[nn.Parameter] | None,
                  mc_samples: int, chunk_size: int) -> tuple[Likelihood, list[nn.Parameter]]:
    """The one validation of a Fisher request (``compute_fisher``, ``score_rows``): returns the
    likelihood object and the chosen parameters (default: every trainable one).
    """
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    lik = get_likelihood(likelihood)
    check_count("mc_samples", mc_samples)
    check_count("chunk_size", chunk_size)
    if fisher_type == "empirical" and targets is None:
        raise ValueError("targets are required for fisher_type='empirical'")
    check_inputs(inputs, targets)
    if params is not None and (isinstance(params, Tensor) or not hasattr(params, "__iter__")):
        raise TypeError(f"params must be a sequence of parameters, got {type(params).__name__}")
    chosen = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    check_params(chosen)
    return lik, chosen


def functional_model(model: nn.Module, params: Sequence[nn.Parameter]
                     ) -> tuple[list[str], dict[str, Tensor], Callable[[dict[str, Tensor], Tensor], Tensor]]:
    """``model`` as a function of ``params``: their names (in the order of ``params``, the
    order of every flat vector), their detached values by name, and ``output(values, x)`` — the
    batched forward with those values and every other parameter and buffer as they are
    (torch.func.functional_call; on copies of the buffers, which it never changes).
    """
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    ids = {id(p) for p in params}
    if any(id(p) not in name_of for p in params) or len(ids) != len(params):
        raise ValueError("params must be distinct parameters of model")
    names = [name_of[id(p)] for p in params]
    frozen = {n: p.detach() for n, p in named.items() if id(p) not in ids}
    buffers = dict(model.named_buffers())

    def output(train: dict[str, Tensor], x: Tensor) -> Tensor:
        # copies of the buffers: a forward that updates them (BatchNorm in training mode) leaves
        # the model's untouched and may run under torch.func transforms
        copies = {n: b.clone() for n, b in buffers.items()}
        return functional_call(model, ({**train, **frozen}, copies), (x,))

    return names, {n: named[n].detach() for n in names}, output


def score_rows(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
               fisher_type: str = _UNSET, likelihood: str | Likelihood = "categorical",
               params: Sequence[nn.Parameter] | None = None, mc_samples: int = 1,
               generator: torch.Generator | None = None, chunk_size: int = 256,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
               kind: str = _UNSET) -> Tensor:
    """The rows U ([rows, p], p = total size of ``params``) with F = UᵀU / n_samples.

    Args:
        model (nn.Module): maps a batch of inputs to outputs (logits or Gaussian means).
        inputs (Tensor): ``[n, ...]`` samples.
        targets (Tensor, optional): labels for ``fisher_type="empirical"``.
        fisher_type (str): "empirical", "mc" or "exact" (default: "empirical").
        likelihood (str): "categorical" (logits) or "gaussian" (unit variance) (default:
            "categorical").
        params (sequence of nn.Parameter, optional): which parameters (default: all trainable).
        mc_samples (int): draws per sample for ``fisher_type="mc"`` (default: 1).
        generator (torch.Generator, optional): CPU generator for ``fisher_type="mc"``.
        chunk_size (int): samples per vmap call (bounds memory) (default: 256).
        loss_fn (callable, optional): per-sample loss ``loss_fn(output[None], target[None])``
            replacing the likelihood's NLL for ``fisher_type="empirical"``.
        kind (str): deprecated spelling of ``fisher_type``.
    """
    return score_rows_and_losses(model, inputs, targets, fisher_type=fisher_type, likelihood=likelihood,
                                 params=params, mc_samples=mc_samples, generator=generator,
                                 chunk_size=chunk_size, loss_fn=loss_fn, kind=kind, _stacklevel=4)[0]


def score_rows_and_losses(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                          fisher_type: str = _UNSET, likelihood: str | Likelihood = "categorical",
                          params: Sequence[nn.Parameter] | None = None, mc_samples: int = 1,
                          generator: torch.Generator | None = None, chunk_size: int = 256,
                          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                          kind: str = _UNSET, _stacklevel: int = 3) -> tuple[Tensor, Tensor | None]:
    """:func:`score_rows` and, for ``fisher_type="empirical"``, the per-sample losses ``[n]``
    from the same forward pass (None otherwise).
    """
    fisher_type = renamed_argument("fisher_type", fisher_type, "kind", kind, "empirical",
                                   "score_rows", stacklevel=_stacklevel)
    lik, chosen = check_request(model, inputs, targets, fisher_type, likelihood, params,
                                mc_samples, chunk_size)
    names, values, output_of = _one_sample_model(model, chosen)
    if fisher_type == "empirical" and loss_fn is None:
        with torch.no_grad():  # one sample's forward: validates the targets before any work
            first = output_of(values, inputs[0])
            # check_request made sure "empirical" has targets
            lik.check(first.expand(inputs.shape[0], *first.shape[1:]), cast(Tensor, targets))
    rows, losses = [], []
    for start in range(0, inputs.shape[0], chunk_size):
        x = inputs[start:start + chunk_size]
        y = None if targets is None else targets[start:start + chunk_size]
        passes: Sequence[tuple[Tensor | None, Tensor | None]]
        if fisher_type == "empirical":
            passes = [(y, None)]
        else:
            with torch.no_grad():
                out = vmap(output_of, in_dims=(None, 0))(values, x)[:, 0]
            passes = lik.pseudo_targets(out, fisher_type, y, mc_samples, generator)
        for target, weight in passes:
            g, loss = _weighted_grads(output_of, values, x, target, weight, lik, loss_fn)
            rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1))
            losses.append(loss)
    return torch.cat(rows), (torch.cat(losses) if fisher_type == "empirical" else None)


def _one_sample_model(model: nn.Module, params: Sequence[nn.Parameter]):
    """:func:`functional_model` with ``output_of(values, x)`` taking one sample ``x`` (run as a
    batch of one), the form torch.func.vmap over samples needs.
    """
    names, values, batch_output = functional_model(model, params)

    def output_of(train: dict[str, Tensor], x: Tensor) -> Tensor:
        return batch_output(train, x[None])

    return names, values, output_of


def pass_rows(model: nn.Module, inputs: Tensor, passes: Sequence[tuple[Tensor, Tensor | None]],
              params: Sequence[nn.Parameter], likelihood: Likelihood,
              loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
              chunk_size: int = 256) -> Tensor:
    """The rows ``w·∇ℓ(f(x_i), y_i)`` over ``params`` for given (targets, weight) passes over the
    whole batch, pass-major (``[len(passes) · n, p]``), in chunks of samples. Inputs are not
    validated here (callers did).
    """
    names, values, output_of = _one_sample_model(model, params)
    rows = []
    for target, weight in passes:
        for start in range(0, inputs.shape[0], chunk_size):
            end = start + chunk_size
            w = None if weight is None else weight[start:end]
            g, _ = _weighted_grads(output_of, values, inputs[start:end], target[start:end], w,
                                   likelihood, loss_fn)
            rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1))
    return torch.cat(rows)


def _weighted_grads(output_of, values, x, target, weight, lik: Likelihood, loss_fn):
    """Per-sample ``w·∇ℓ`` (a dict of ``[n, *param]`` tensors) and the unweighted losses."""
    def per_sample(v, xi, yi, wi):
        out = output_of(v, xi)
        loss = loss_fn(out, yi[None]) if loss_fn is not None else lik.nll(out, yi[None], "sum")
        return (loss if wi is None else wi * loss), loss.detach()

    in_dims = (None, 0, 0, None if weight is None else 0)
    return vmap(grad(per_sample, has_aux=True), in_dims=in_dims)(values, x, target, weight)
