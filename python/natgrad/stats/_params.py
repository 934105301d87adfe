"""Shared plumbing of :mod:`natgrad.stats`.

Parameter flattening, argument checks, the ``log_prob`` functional seen by :mod:`torch.func`,
and the guarded inverse of an information matrix.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.func import jacfwd

from natgrad.stats._probs import check_probabilities, use_exact_logits

#: One tensor, or a sequence of tensors (Python real numbers are accepted and become 0-dim).
ParamsLike = Tensor | float | Sequence[Tensor | float]
#: ``dist_factory(*params) -> Distribution``.
DistFactory = Callable[..., Distribution]

SINGULAR_ADVICE = (
    "The parameters are not (locally) identifiable in this parametrisation. Reparametrise to a "
    "minimal set of parameters (e.g. drop one logit of a Categorical, or fix a redundant "
    "parameter), add damping (information + λ·I with a small λ > 0), or pass pinv=True to use "
    "the Moore–Penrose pseudo-inverse (valid only for directions in the range of the matrix)."
)


@dataclass(frozen=True)
class FlatParams:
    """Parameters flattened into one detached vector ``θ`` of length ``P``.

    ``θ = concat(params[0].reshape(-1), params[1].reshape(-1), ...)``: this is the order of the
    rows and columns of every information matrix in :mod:`natgrad.stats`.
    """

    flat: Tensor  #: ``[P]``, detached, in the promoted floating dtype
    shapes: tuple[torch.Size, ...]  #: shape of each parameter
    numels: tuple[int, ...]  #: number of elements of each parameter
    single: bool  #: the caller passed one tensor rather than a sequence

    @property
    def size(self) -> int:
        """``P``, the total number of scalar parameters."""
        return int(self.flat.numel())

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split a ``[P]`` vector back into tensors shaped like the parameters."""
        return tuple(c.reshape(s) for c, s in zip(flat.split(self.numels), self.shapes, strict=True))

    def restructure(self, flat: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Like :meth:`unflatten`, but one tensor when the caller passed one tensor."""
        parts = self.unflatten(flat)
        return parts[0] if self.single else parts


def flatten_params(params: ParamsLike, name: str = "params") -> FlatParams:
    """Checks and flattens parameters.

    Args:
        params: one tensor or a sequence of tensors / real numbers, all floating point.
        name: the argument name used in error messages.

    Returns:
        FlatParams: the detached flat vector ``θ`` (promoted to a common floating dtype).

    Raises:
        TypeError: if a parameter is not a tensor or real number, or is not floating point.
        ValueError: if there are no parameters, one is empty, or they live on different devices.
    """
    items: list[Any]
    if isinstance(params, (Tensor, numbers.Real)):
        single, items = True, [params]
    elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        single, items = False, list(params)
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(params).__name__}")
    if not items:
        raise ValueError(f"{name} must hold at least one parameter tensor, got an empty sequence")
    tensors: list[Tensor] = []
    for i, p in enumerate(items):
        label = name if single else f"{name}[{i}]"
        if isinstance(p, bool) or not isinstance(p, (Tensor, numbers.Real)):
            raise TypeError(f"{label} must be a floating-point tensor, got {type(p).__name__}")
        if not isinstance(p, Tensor):
            p = torch.tensor(float(p), dtype=torch.get_default_dtype())
        if not p.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got dtype {p.dtype}")
        if p.numel() == 0:
            raise ValueError(f"{label} must have at least one element, got shape {tuple(p.shape)}")
        tensors.append(p.detach())
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name} must all live on one device, got {sorted(map(str, devices))}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.to(dtype).reshape(-1) for t in tensors])
    return FlatParams(
        flat=flat,
        shapes=tuple(t.shape for t in tensors),
        numels=tuple(int(t.numel()) for t in tensors),
        single=single,
    )


#: Dtypes whose statistics are computed in float64 (and returned in the caller's dtype).
_PROMOTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def in_working_precision(fp: FlatParams) -> FlatParams:
    """The parameters in the dtype the statistics are computed in.

    float16 / bfloat16 / float32 parameters are promoted to float64 (where the device has it):
    torch's ``log_prob`` formulas cancel terms of order 1 around the derivative, whose error is
    then multiplied by ``∂logits/∂p = 1/(p(1−p))``, so that in float32 the scores and Hessians
    of e.g. ``Binomial(probs=1e-9)`` would be noise. Results are cast back by the callers.
    """
    if fp.flat.dtype in _PROMOTED_DTYPES and fp.flat.device.type != "mps":
        return dataclasses.replace(fp, flat=fp.flat.to(torch.float64))
    return fp


def build_distribution(dist_factory: DistFactory, fp: FlatParams, tensors: Sequence[Tensor]) -> Distribution:
    """Calls ``dist_factory(*tensors)`` and checks the distribution it returns.

    This is the one validation point of the distributions of :mod:`natgrad.stats`. In order:
    the probability parameters must lie inside the range where the Fisher information is
    finite (:func:`natgrad.stats._probs.check_probabilities`: e.g. Bernoulli ``probs`` in the
    open interval (0, 1)); then torch's own parameter constraints are checked. The returned
    distribution has the exact logits of its probabilities (see :func:`make_distribution`).

    Args:
        dist_factory: the user's factory.
        fp: the flattened parameters (for the shapes in error messages).
        tensors: parameter tensors shaped like ``fp.shapes``.

    Raises:
        TypeError: if ``dist_factory`` is not callable or does not return a Distribution.
        ValueError: if a probability parameter lies on the boundary of (or outside) its range,
            naming the parameter and the range; if the factory raised (typically mismatched
            parameter shapes or values outside the parameter's constraint).
    """
    if not callable(dist_factory):
        raise TypeError(f"dist_factory must be callable, got {type(dist_factory).__name__}")
    # First without torch's validation, so that the probability ranges are reported by one
    # check with one message (torch rejects some boundaries, e.g. Geometric probs 0, but not
    # others, e.g. Bernoulli probs 0), then with it, whatever the global default: importing
    # torch._dynamo (torch.compile) turns Distribution argument validation off process-wide.
    check_probabilities(_call_factory(dist_factory, fp, tensors, validate=False))
    return use_exact_logits(_call_factory(dist_factory, fp, tensors, validate=True))


def _call_factory(dist_factory: DistFactory, fp: FlatParams, tensors: Sequence[Tensor], *,
                  validate: bool) -> Distribution:
    """``dist_factory(*tensors)`` with argument validation on or off, with clear errors."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(validate)
    try:
        dist = dist_factory(*tensors)
    except (RuntimeError, ValueError, IndexError) as err:
        shapes = [tuple(s) for s in fp.shapes]
        raise ValueError(
            f"dist_factory(*params) failed for params of shapes {shapes} "
            f"(mismatched or non-broadcastable shapes, or values outside the support?): {err}"
        ) from err
    finally:
        Distribution.set_default_validate_args(previous)
    if not isinstance(dist, Distribution):
        raise TypeError(
            "dist_factory must return a torch.distributions.Distribution, "
            f"got {type(dist).__name__}"
        )
    return dist


def make_distribution(dist_factory: DistFactory, tensors: Sequence[Tensor]) -> Distribution:
    """``dist_factory(*tensors)`` for the functionals differentiated by :mod:`torch.func`.

    Argument validation of the distribution is switched off (it is data-dependent control
    flow, which vmap cannot trace; the parameters went through :func:`build_distribution`
    first), and distributions built from ``probs`` get their exact, unclamped logits: torch's
    ``probs_to_logits`` clamps probabilities to ``[eps, 1 − eps]``, whose derivative is 0
    outside that interval (see :mod:`natgrad.stats._probs`).
    """
    dist = dist_factory(*tensors)
    dist._validate_args = False
    return use_exact_logits(dist)


def leaf_params(fp: FlatParams) -> tuple[Tensor, ...]:
    """Fresh leaf copies of the parameters (shaped like the originals) that require grad."""
    return tuple(t.clone().requires_grad_(True) for t in fp.unflatten(fp.flat))


def make_log_prob(dist_factory: DistFactory, fp: FlatParams) -> Callable[[Tensor, Tensor], Tensor]:
    """The functional ``(θ, x) ↦ log p_θ(x)`` (summed over the batch dims) for torch.func.

    Argument validation of the distribution is switched off inside the functional: it is data-
    dependent control flow, which vmap cannot trace, and the inputs were validated beforehand.
    """

    def log_prob(flat: Tensor, value: Tensor) -> Tensor:
        return make_distribution(dist_factory, fp.unflatten(flat)).log_prob(value).sum()

    return log_prob


def check_depends_on_params(dist: Distribution, value: Tensor, leaves: Sequence[Tensor], single: bool) -> None:
    """Raises if ``dist.log_prob(value)`` has no autograd path to one of the parameters.

    Args:
        dist: the distribution built from ``leaves`` (which require grad).
        value: a value in the support of ``dist``.
        leaves: the parameter tensors the distribution was built from.
        single: whether the caller passed a single tensor (for the error message).

    Raises:
        ValueError: naming the first parameter ``log_prob`` does not depend on.
    """
    lp = dist.log_prob(value).sum()
    grads = torch.autograd.grad(lp, list(leaves), allow_unused=True) if lp.requires_grad else [None] * len(leaves)
    for i, g in enumerate(grads):
        if g is None:
            label = "params" if single else f"params[{i}]"
            raise ValueError(
                f"log_prob of the distribution returned by dist_factory has no gradient with respect "
                f"to {label}: the factory must build the distribution from the parameter tensors it "
                "receives (it ignores or detaches this one)"
            )


def forward_jacobian(func: Callable[[Tensor], Tensor], order: int = 1) -> Callable[[Tensor], Tensor]:
    """``jacfwd(func)`` (``order=2``: ``jacfwd(jacfwd(func))``), quiet about torch internals.

    The first forward-mode call of a process makes torch script its JVP decompositions, which
    emits a DeprecationWarning about ``torch.jit.script`` that the user can do nothing about.
    """
    jac = jacfwd(jacfwd(func)) if order == 2 else jacfwd(func)

    def wrapped(x: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            return jac(x)

    return wrapped


def check_square(matrix: Tensor, name: str) -> None:
    """Raises unless ``matrix`` is a finite, floating ``[P, P]`` tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(matrix).__name__}")
    if not matrix.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {matrix.dtype}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a square [P, P] matrix with P >= 1, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} must be finite, got NaN or Inf entries")


def inverse_information(matrix: Tensor, name: str, *, pinv: bool = False, rcond: float | None = None) -> Tensor:
    """Inverse of a symmetric positive-definite information matrix, refusing singular ones.

    With eigendecomposition ``I = V diag(λ) Vᵀ`` (of the symmetrised matrix), the inverse is
    ``V diag(1/λ) Vᵀ``. The matrix counts as singular when ``λ_min <= rcond · λ_max`` (default
    ``rcond = 100 · P · eps(dtype)``); with ``pinv=True`` eigenvalues below that threshold are
    dropped instead (Moore–Penrose pseudo-inverse).

    Args:
        matrix: ``[P, P]`` information matrix.
        name: argument name for error messages.
        pinv: use the pseudo-inverse instead of raising on a singular matrix.
        rcond: relative eigenvalue threshold.

    Returns:
        Tensor: ``[P, P]`` symmetric (pseudo-)inverse.

    Raises:
        ValueError: if the matrix is singular or indefinite (and ``pinv`` is False).
    """
    check_square(matrix, name)
    p = matrix.shape[0]
    if rcond is None:
        rcond = 100.0 * p * torch.finfo(matrix.dtype).eps
    elif not (isinstance(rcond, numbers.Real) and 0 <= rcond < 1):
        raise ValueError(f"rcond must be a real number in [0, 1), got {rcond!r}")
    sym = 0.5 * (matrix + matrix.mT)
    evals, evecs = torch.linalg.eigh(sym)
    scale = evals.abs().max()
    tol = rcond * scale
    if pinv:
        if bool((evals < -tol).any()):
            raise ValueError(
                f"{name} is indefinite (smallest eigenvalue {float(evals[0]):.3e}): an information "
                "matrix must be positive semi-definite; is θ a maximum of the likelihood?"
            )
        inv_evals = torch.where(evals > tol, 1.0 / evals.clamp_min(torch.finfo(evals.dtype).tiny), 0.0)
        return (evecs * inv_evals) @ evecs.mT
    if bool(evals[0] < -tol):
        raise ValueError(
            f"{name} is not positive definite (smallest eigenvalue {float(evals[0]):.3e}, largest "
            f"{float(evals[-1]):.3e}): is θ a (local) maximum of the likelihood? " + SINGULAR_ADVICE
        )
    if bool(evals[0] <= tol) or float(scale) == 0.0:
        raise ValueError(
            f"{name} is singular (smallest eigenvalue {float(evals[0]):.3e}, largest "
            f"{float(evals[-1]):.3e}, relative threshold rcond={rcond:.1e}). " + SINGULAR_ADVICE
        )
    return (evecs / evals) @ evecs.mT


def as_information_matrix(fisher: Any, name: str = "fisher") -> Tensor:
    """Accepts a ``[P, P]`` tensor or any result object with a ``.matrix`` tensor."""
    matrix = getattr(fisher, "matrix", fisher)
    check_square(matrix, name)
    return matrix


__all__ = [
    "DistFactory",
    "FlatParams",
    "ParamsLike",
    "SINGULAR_ADVICE",
    "as_information_matrix",
    "build_distribution",
    "check_depends_on_params",
    "check_square",
    "flatten_params",
    "forward_jacobian",
    "in_working_precision",
    "inverse_information",
    "leaf_params",
    "make_distribution",
    "make_log_prob",
]
