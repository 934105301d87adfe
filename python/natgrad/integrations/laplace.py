"""A laplace-torch curvature backend built on natgrad's Fisher: Laplace approximations whose
Kronecker factors (and diagonal) come from :func:`natgrad.fisher.compute_fisher`, the estimator
natgrad.KFAC runs on every step.

Importing this module imports ``laplace`` (``pip install laplace-torch``)::

    from laplace import Laplace
    from natgrad.integrations.laplace import NatgradBackend

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=NatgradBackend)
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x_test, link_approx="probit")

Backends: :class:`NatgradGGN` (``NatgradBackend``: the generalized Gauss-Newton, which for the
categorical and unit-Gaussian likelihoods is natgrad's ``fisher_type="exact"`` Fisher, or the
Monte-Carlo Fisher with ``backend_kwargs={"stochastic": True}``) and :class:`NatgradEF` (the
empirical Fisher). They implement ``kron`` and ``diag``; ``full`` and the Jacobians of the glm
predictive are laplace-torch's own (torch.func).

Conventions (laplace-torch's, as its curvlinops backend follows them): a batch of ``M`` of the
``N`` training points contributes, for a layer with natgrad factors ``(A, G)`` (means over the
batch, bias as A's last row/column), the weight factors ``[√c·s·M·G, √c·(M/N)·A_w]`` (``A_w``: A
without the bias row) and the bias block ``c·s·M·A_bb·G``, so that factors summed over the
batches give ``N·G ⊗ mean A``: the sum over the data, not natgrad's mean. natgrad's Fisher is the
base likelihood's (unit-variance Gaussian for "regression"); laplace-torch's is that of its
``lossfunc`` (``MSELoss(reduction="sum")``, twice the Gaussian NLL), ``s`` times natgrad's
(``s = 1/c`` for the GGN, ``1/c²`` for the empirical Fisher), multiplied by ``c = factor``
(1/2 for regression, 1 for classification) spread evenly over the two factors as
``Kron.__mul__`` does. So the GGN equals the likelihood's, and the empirical Fisher for
regression is twice the Gaussian likelihood's, as in laplace-torch's other backends. The
returned loss is ``factor`` times the summed loss, as laplace-torch's.

Scope: a Linear or Conv2d layer (natgrad's Kronecker blocks) and any 1-d parameter of another
module (its block of natgrad's dense Fisher); another parameter raises ValueError naming it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from natgrad.fisher.compute import compute_fisher
from natgrad.fisher.matrices import BlockDiagonalFisher, BlockFisher, DenseFisher
from natgrad.integrations import require

_laplace = require("laplace.curvature", "laplace-torch", "natgrad.integrations.laplace")
_utils = require("laplace.utils", "laplace-torch", "natgrad.integrations.laplace")
CurvatureInterface: Any = _laplace.CurvatureInterface
GGNInterface: Any = _laplace.GGNInterface
EFInterface: Any = _laplace.EFInterface

__all__ = ["NatgradBackend", "NatgradEF", "NatgradGGN", "NatgradInterface"]

_LIKELIHOODS = {"classification": "categorical", "regression": "gaussian"}


class NatgradInterface(CurvatureInterface):
    """laplace-torch's CurvatureInterface on natgrad's Fisher (see the module docstring); use
    :class:`NatgradGGN` or :class:`NatgradEF`.
    """

    #: natgrad's ``fisher_type`` of this backend
    fisher_type = "exact"

    def _natgrad_fisher(self, x: Tensor, y: Tensor, structure: str, kwargs: dict[str, Any]) -> Any:
        if not isinstance(x, Tensor):
            raise TypeError(f"natgrad's laplace backend needs tensor inputs, got {type(x).__name__}")
        options = dict(kwargs)
        mc_samples = options.pop("mc_samples", 1)
        approx = options.pop("kfac_approx", "expand")
        options.pop("N", None)
        if options or approx != "expand":
            unknown = sorted(options) + ([f"kfac_approx={approx!r}"] if approx != "expand" else [])
            raise ValueError(f"natgrad's laplace backend does not take {unknown} (it takes mc_samples and "
                             "kfac_approx='expand')")
        targets = y if self.fisher_type == "empirical" else None
        if self.fisher_type == "empirical" and self.likelihood == "regression" and y.dim() == 1:
            targets = y.unsqueeze(-1)
        return compute_fisher(self.model, x, targets,
                              fisher_type=self.fisher_type, structure=structure,
                              likelihood=_LIKELIHOODS[str(self.likelihood)], params=self.params,
                              mc_samples=mc_samples)

    @property
    def _loss_scale(self) -> float:
        """What turns natgrad's likelihood Fisher into that of laplace-torch's ``lossfunc``
        (``1/factor`` times the likelihood's NLL): ``1/factor`` for the GGN, its square for the
        empirical Fisher.
        """
        return self.factor ** (-2 if self.fisher_type == "empirical" else -1)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return self.factor * self.lossfunc(self.model(x), y).detach()

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """The batch's summed loss (times ``factor``) and its Kronecker curvature (a
        ``laplace.utils.Kron``, one entry per parameter in order).
        """
        fisher = cast(BlockDiagonalFisher, self._natgrad_fisher(x, y, "kfac", kwargs))
        # laplace-torch's lossfunc's factors, times ``factor`` spread evenly over a pair (Kron.__mul__)
        M, root, scale = len(x), self.factor ** 0.5, self._loss_scale
        kfacs: list[list[Tensor]] = []
        owner: dict[int, tuple[Any, int]] = {}
        for block in fisher.blocks:
            params = block.block.params if isinstance(block, BlockFisher) else None
            for i, p in enumerate(params or []):
                owner[id(p)] = (block, i)
        dense = iter(b for b in fisher.blocks if isinstance(b, DenseFisher))
        dense_of = _dense_slices(self.params, owner, dense)
        for name, p in zip(self.params_dict, self.params):
            if id(p) in owner:
                block, i = owner[id(p)]
                factors = block.block.factors()
                A, G = factors["A"], factors["G"]
                if A.dim() != 2:
                    raise ValueError(f"natgrad's laplace backend: parameter {name!r} has no Kronecker factors "
                                     "laplace-torch can use (an Embedding's A is diagonal)")
                has_bias = block.block.bias is not None
                if i == 0:
                    A_w = A[:-1, :-1] if has_bias else A
                    kfacs.append([root * scale * M * G, root * (M / N) * A_w])
                else:
                    kfacs.append([self.factor * scale * M * A[-1, -1] * G])
            elif p.dim() == 1:
                kfacs.append([self.factor * scale * M * dense_of[id(p)]])
            else:
                raise ValueError(f"natgrad's laplace backend: parameter {name!r} (shape {tuple(p.shape)}) is "
                                 "neither in a Linear/Conv2d layer nor 1-d, so laplace-torch's Kron cannot hold it")
        return self._loss(x, y), _utils.Kron(kfacs)

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The batch's summed loss (times ``factor``) and the diagonal of its curvature, summed
        over the batch, flattened in parameter order.
        """
        fisher = self._natgrad_fisher(x, y, "diagonal", kwargs)
        return self._loss(x, y), len(x) * self.factor * self._loss_scale * fisher.diagonal().reshape(-1)


def _dense_slices(params: list[nn.Parameter], owner: dict, dense: Iterator[DenseFisher]) -> dict[int, Tensor]:
    """Each parameter outside the Kronecker blocks: its diagonal block of natgrad's dense Fisher
    of its module (one dense block per module, in parameter order).
    """
    out: dict[int, Tensor] = {}
    block: Tensor | None = None
    offset = 0
    for p in (q for q in params if id(q) not in owner):
        if block is None or offset >= block.shape[0]:
            block, offset = next(dense).matrix, 0
        n = p.numel()
        out[id(p)] = block[offset:offset + n, offset:offset + n]
        offset += n
    return out


class NatgradGGN(NatgradInterface, GGNInterface):
    """laplace-torch's GGN from natgrad's Fisher: ``fisher_type="exact"`` (or "mc" with
    ``stochastic=True``, ``num_samples`` draws).

    Example::

        la = Laplace(model, "regression", hessian_structure="kron", backend=NatgradGGN)
    """

    def __init__(self, model: nn.Module, likelihood: Any, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", stochastic: bool = False, num_samples: int = 1) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic=stochastic, num_samples=num_samples)
        self.fisher_type = "mc" if stochastic else "exact"


class NatgradEF(NatgradInterface, EFInterface):
    """laplace-torch's empirical Fisher from natgrad's (``fisher_type="empirical"``).

    Example::

        la = Laplace(model, "classification", hessian_structure="kron", backend=NatgradEF)
    """

    fisher_type = "empirical"


#: the default natgrad backend: the GGN
NatgradBackend = NatgradGGN
