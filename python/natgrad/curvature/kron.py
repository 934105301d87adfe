"""Kronecker-factored curvature blocks: one per nn.Linear, nn.Conv2d or nn.Embedding layer.

A block owns its layer's factors ``A`` (activation side) and ``G`` (gradient side), their
decompositions, and the preconditioning of the layer's gradient. All linear algebra runs in the
C++ ops (:mod:`natgrad.ops`); the optimizer decides when each method is called.

Scaling. The Fisher is the mean over samples of per-sample gradient outer products. Captured
output gradients of a loss averaged over the step's ``N`` samples are ``1/N`` times per-sample
gradients, and a sample's gradient sums over its ``R`` weight-sharing positions (tokens, pixels),
so the "expand" approximation (Eschenhagen et al., 2023; KFC for convolutions) uses
``A = mean over rows of ã ãᵀ`` and ``G = N² R · mean over rows of g gᵀ``, i.e.
``grad_scale = N·sqrt(R)`` (``sqrt(R)`` for a summed loss). "reduce" averages activations and
sums gradients over positions first, then ``grad_scale = N`` (1 for a sum).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad import ops
from natgrad.curvature.capture import Record

_STATE_KEYS = ("A", "G", "a_eigenvalues", "a_eigenvectors", "g_eigenvalues", "g_eigenvectors",
               "a_inverse", "g_inverse")


class KronBlock:
    """Base class: factors, decompositions and preconditioning of one layer's weight (+bias).

    Args:
        name (str): the module's qualified name in the model (checkpoint key).
        module (nn.Module): the layer.
        factor_dtype (torch.dtype or None): dtype of A and G (default: the weight's dtype).
        inverse_dtype (torch.dtype or None): dtype of decompositions (default: factor dtype).
    """

    kind = "kron"

    def __init__(self, name: str, module: nn.Module, factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None) -> None:
        self.name = name
        self.module = module
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = getattr(module, "bias", None)
        self.factor_dtype = factor_dtype or self.weight.dtype
        self.inverse_dtype = inverse_dtype or self.factor_dtype
        self.state: dict[str, Tensor] = {}

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this block preconditions (weight, then bias if any)."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def has_factors(self) -> bool:
        """Whether factors have been estimated at least once."""
        return "A" in self.state

    @property
    def has_inverse(self) -> bool:
        """Whether a decomposition is available for preconditioning."""
        return "g_eigenvectors" in self.state or "g_inverse" in self.state

    def grad_matrix(self) -> Tensor:
        """The layer gradient as ``[d_out, d_in (+1)]``, bias folded in as the last column."""
        g = self.weight.grad.reshape(self.weight.shape[0], -1)
        if self.bias is not None:
            g = torch.cat([g, self.bias.grad.reshape(-1, 1)], 1)
        return g

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: one tensor per parameter, in :attr:`params` order."""
        if self.bias is None:
            return [matrix.reshape(self.weight.shape)]
        return [matrix[:, :-1].reshape(self.weight.shape), matrix[:, -1].reshape(self.bias.shape)]

    # ---- statistics ---------------------------------------------------------------------------

    @staticmethod
    def records_finite(records: list[Record]) -> bool:
        """Whether every captured input and output gradient is finite."""
        return all(bool(torch.isfinite(t).all()) for r in records for t in (r.input, r.grad_output))

    def update_factors(self, records: list[Record], decay: float, mean_loss: bool,
                       grad_multiplier: float = 1.0) -> None:
        """EMA-updates A and G from this step's (finite) records; the first update replaces."""
        rho = decay if self.has_factors else 0.0
        self._update([r.input for r in records], [r.grad_output for r in records], rho, mean_loss,
                     grad_multiplier)

    def decomposition_template(self, method: str) -> dict[str, Tensor]:
        """Empty tensors shaped like the decomposition :meth:`update_inverse` produces (what a
        rank receives when another rank computed it)."""
        a, g = self.state["A"], self.state["G"]
        opts = dict(dtype=self.inverse_dtype, device=a.device)
        if method == "inverse":
            return {"g_inverse": torch.empty(g.shape, **opts), "a_inverse": torch.empty(a.shape, **opts)}
        out = {"g_eigenvalues": torch.empty(g.shape[0], **opts), "g_eigenvectors": torch.empty(g.shape, **opts)}
        if a.dim() == 2:
            out.update(a_eigenvalues=torch.empty(a.shape[0], **opts), a_eigenvectors=torch.empty(a.shape, **opts))
        return out

    def factors(self) -> dict[str, Tensor]:
        """The factor tensors by name, in a fixed order (what is averaged across ranks): a 2-D
        tensor is a symmetric matrix, a 1-D one a vector."""
        return {k: self.state[k] for k in ("A", "G") if k in self.state}

    def inverse_cost(self) -> float:
        """The work of one decomposition (cubic in each decomposed factor's size)."""
        return float(sum(f.shape[0] ** (3 if f.dim() == 2 else 1) for f in self.factors().values()))

    def drop_decomposition(self) -> None:
        """Forgets the decomposition (a rank that is not one of this layer's grad workers)."""
        for key in _STATE_KEYS[2:]:
            self.state.pop(key, None)

    def _update(self, inputs: list[Tensor], grads: list[Tensor], rho: float, mean_loss: bool,
                grad_multiplier: float) -> None:
        raise NotImplementedError

    def _factor(self, key: str, dim: int, device: torch.device) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros(dim, dim, dtype=self.factor_dtype, device=device)
        return self.state[key]

    # ---- inverses and preconditioning -----------------------------------------------------------

    def update_inverse(self, method: str, damping: float, pi_correction: bool) -> int:
        """Recomputes the decomposition (``method`` "eigen") or damped inverses ("inverse") from
        the current factors; returns the fallback-ladder rung used."""
        a = self.state["A"].to(self.inverse_dtype)
        g = self.state["G"].to(self.inverse_dtype)
        self.drop_decomposition()
        if method == "inverse":
            inv = ops.kfac_damped_inverses(g, a, damping, pi_correction)
            self.state["g_inverse"], self.state["a_inverse"] = inv.g_inverse, inv.a_inverse
            return int(inv.rung)
        ea, eg = ops.damped_eigh(a), ops.damped_eigh(g)
        self.state["a_eigenvalues"], self.state["a_eigenvectors"] = ea.eigenvalues, ea.eigenvectors
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        return max(int(ea.rung), int(eg.rung))

    def precondition(self, grad: Tensor, damping: float, pi_correction: bool) -> Tensor:
        """Applies ``(A ⊗ G + damping·I)⁻¹`` (or its π-corrected or inverse form) to ``grad``."""
        s = self.state
        x = grad.to(self.inverse_dtype)
        if "g_inverse" in s:
            out = ops.kfac_precondition_inverse(x, s["g_inverse"], s["a_inverse"])
        else:
            out = ops.kfac_precondition_eigen(x, s["g_eigenvalues"], s["g_eigenvectors"],
                                              s["a_eigenvalues"], s["a_eigenvectors"], damping,
                                              pi_correction)
        return out.to(grad.dtype)

    def curvature_product(self, delta: Tensor) -> Tensor:
        """``vec(δ)ᵀ (A ⊗ G) vec(δ) = tr(δᵀ G δ A)`` for ``δ`` shaped like :meth:`grad_matrix`."""
        d = delta.to(self.factor_dtype)
        return (self.state["G"] @ d @ self.state["A"] * d).sum()

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Factors and decompositions (tensors are stored as they are, never cast)."""
        return {"kind": self.kind, **{k: v for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output onto this layer's device."""
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint block {self.name!r} is {state.get('kind')!r}, "
                             f"this layer is {self.kind!r}")
        device = self.weight.device
        self.state = {k: v.to(device) for k, v in state.items() if k != "kind"}


class LinearBlock(KronBlock):
    """nn.Linear with inputs of any leading shape; ``approx`` is "expand" or "reduce"."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Linear, approx: str = "expand", **kwargs) -> None:
        super().__init__(name, module, **kwargs)
        self.approx = approx

    def _update(self, inputs, grads, rho, mean_loss, grad_multiplier):
        samples = sum(x.shape[0] if x.dim() > 1 else 1 for x in inputs)
        d_in, d_out = self.weight.shape[1], self.weight.shape[0]
        if self.approx == "reduce":  # per sample: mean activation, summed gradient
            inputs = [x.reshape(x.shape[0], -1, d_in).mean(1) if x.dim() > 2 else x for x in inputs]
            grads = [g.reshape(g.shape[0], -1, d_out).sum(1) if g.dim() > 2 else g for g in grads]
        x = inputs[0] if len(inputs) == 1 else torch.cat([t.reshape(-1, d_in) for t in inputs])
        g = grads[0] if len(grads) == 1 else torch.cat([t.reshape(-1, d_out) for t in grads])
        positions = x.numel() // d_in // samples  # 1 after "reduce"
        scale = (samples if mean_loss else 1.0) * math.sqrt(positions) * grad_multiplier
        device = self.weight.device
        ops.linear_act_factor_ema_(self._factor("A", d_in + (self.bias is not None), device), x,
                                   self.bias is not None, rho)
        ops.linear_grad_factor_ema_(self._factor("G", d_out, device), g, scale, rho)


class Conv2dBlock(KronBlock):
    """nn.Conv2d with groups=1 and numeric zero padding, in the KFC ("expand") form."""

    kind = "conv2d"

    def _update(self, inputs, grads, rho, mean_loss, grad_multiplier):
        m = self.module
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        g = grads[0] if len(grads) == 1 else torch.cat(grads)
        samples, positions = g.shape[0], g.shape[2] * g.shape[3]
        scale = (samples if mean_loss else 1.0) * math.sqrt(positions) * grad_multiplier
        d_in = self.weight[0].numel() + (self.bias is not None)
        device = self.weight.device
        ops.conv2d_act_factor_ema_(self._factor("A", d_in, device), x, m.kernel_size, m.stride,
                                   m.padding, m.dilation, self.bias is not None, rho)
        ops.conv2d_grad_factor_ema_(self._factor("G", self.weight.shape[0], device), g, scale, rho)


class EmbeddingBlock(KronBlock):
    """nn.Embedding: the activation factor of one-hot inputs is diagonal (token frequencies),
    so A is kept as a vector and never decomposed. In the Linear layout the weight gradient is
    ``weight.grad.T`` ([dim, num_embeddings])."""

    kind = "embedding"

    @property
    def has_inverse(self) -> bool:
        return "g_eigenvectors" in self.state

    def grad_matrix(self) -> Tensor:
        return self.weight.grad.T

    def split(self, matrix: Tensor) -> list[Tensor]:
        return [matrix.T]

    def _update(self, inputs, grads, rho, mean_loss, grad_multiplier):
        idx = torch.cat([t.reshape(-1) for t in inputs])
        dim = self.weight.shape[1]
        g = torch.cat([t.reshape(-1, dim) for t in grads])
        samples = sum(t.shape[0] if t.dim() > 0 else 1 for t in inputs)
        positions = idx.numel() // samples
        scale = (samples if mean_loss else 1.0) * math.sqrt(positions) * grad_multiplier
        counts = torch.bincount(idx, minlength=self.weight.shape[0]).to(self.factor_dtype)
        freq = counts / idx.numel()
        if "A" not in self.state:
            self.state["A"] = torch.zeros_like(freq)
        self.state["A"].mul_(rho).add_(freq, alpha=1.0 - rho)
        ops.linear_grad_factor_ema_(self._factor("G", dim, self.weight.device), g, scale, rho)

    def decomposition_template(self, method):
        return super().decomposition_template("eigen")  # G only: A is diagonal, never decomposed

    def update_inverse(self, method, damping, pi_correction):
        self.drop_decomposition()
        eg = ops.damped_eigh(self.state["G"].to(self.inverse_dtype))
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        return int(eg.rung)

    def precondition(self, grad, damping, pi_correction):
        s = self.state
        a = s["A"].to(self.inverse_dtype).clamp_min(0)
        lam_g, vecs = s["g_eigenvalues"], s["g_eigenvectors"]
        rotated = vecs.mT @ grad.to(self.inverse_dtype)
        if pi_correction:
            pi = math.sqrt(max(float(a.mean()), 1e-30) / max(float(lam_g.mean()), 1e-30))
            root = math.sqrt(damping)
            denom = (lam_g + pi * root)[:, None] * (a + root / pi)[None, :]
        else:
            denom = lam_g[:, None] * a[None, :] + damping
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        return (vecs @ (rotated / denom)).to(grad.dtype)

    def curvature_product(self, delta):
        d = delta.to(self.factor_dtype)
        return ((self.state["G"] @ d) * d * self.state["A"][None, :]).sum()
