"""nn.Embedding: one-hot inputs make the activation factor diagonal (token frequencies), so
``A`` is kept as a vector and never decomposed; implicit rows compare indices instead of
multiplying one-hot vectors.

The factors' rows are (sample, distinct index) pairs (:func:`merge_repeats`): the output
gradients of a sample's occurrences of one index all reach the same weight row, so their sum is
that sample's gradient of the row. Counting each occurrence as its own Fisher sample would
assume their gradients independent; for an index repeated at every position (BERT's all-zero
token_type_ids) they are not, and that row's curvature came out up to T times too small.
"""
from __future__ import annotations

import torch
from typing_extensions import override

from natgrad import ops
from natgrad.curvature import refresh
from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.kron import CORRECTED, KroneckerBlock, PerSample, Statistics, per_sample_layout
from natgrad.curvature.layers.base import LayerKind, output_blocks

__all__ = ["EmbeddingBlock", "EmbeddingKind"]


def merge_repeats(inputs, grads, num_embeddings: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of an Embedding's factors: one per distinct index of each sample (dim 0), its
    output gradients summed over the sample's occurrences of it, which all reach the same weight
    row (that sum is the row's per-sample gradient), for each backward pass.

    Returns ``(indices [R], gradients [P·R, dim])`` (pass-major). ``grads[j]`` belongs to
    ``inputs[j % len(inputs)]`` and holds one or more passes (``[P·n, ..., dim]``).
    """
    keys, order = [], []
    for x in inputs:
        n = x.shape[0] if x.dim() > 0 else 1
        rows = x.reshape(n, -1)
        base = torch.arange(n, device=x.device).unsqueeze(1) * num_embeddings
        unique, inverse = torch.unique((base + rows).reshape(-1), return_inverse=True)
        keys.append(unique)
        order.append(inverse)
    merged = []
    for j, g in enumerate(grads):
        unique, inverse = keys[j % len(inputs)], order[j % len(inputs)]
        flat = g.reshape(-1, inverse.numel(), dim)
        out = flat.new_zeros(flat.shape[0], unique.numel(), dim).index_add_(1, inverse, flat)
        merged.append(out.reshape(-1, dim))
    return torch.cat([k % num_embeddings for k in keys]), torch.cat(merged)


class EmbeddingBlock(KroneckerBlock):
    """nn.Embedding: the activation factor of one-hot inputs is diagonal (token frequencies),
    so A is kept as a vector and never decomposed. Packed layout: ``weight.T``
    (``[dim, num_embeddings]``).
    """

    kind = "embedding"
    full_factors = False
    supports_eigenvalue_correction = True

    @classmethod
    @override
    def family(cls) -> type[CurvatureBlock]:
        return CurvatureBlock  # transposed layout, diagonal A: one block at a time

    @override
    def a_dim(self) -> int:
        return self.weight.shape[0]

    @override
    def g_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def has_inverse(self) -> bool:
        """Whether the G side has been decomposed (A is diagonal and needs no decomposition)."""
        return "g_eigenvectors" in self.state

    @override
    def pack(self, tensors):
        w = tensors[0] if tensors[0] is not None else torch.zeros_like(self.weight)
        return w.T

    @override
    def unpack(self, packed):
        return [packed.T]

    @override
    def expected_shapes(self):
        g = self.g_dim()
        shapes = {"A": (self.a_dim(),), "G": (g, g), "g_eigenvalues": (g,), "g_eigenvectors": (g, g)}
        return shapes | ({CORRECTED: (g, self.a_dim())} if self.eigenvalue_correction else {})

    @override
    def count_samples(self, inputs):
        return sum(t.shape[0] if t.dim() > 0 else 1 for t in inputs)

    def count_rows(self, inputs):
        """Rows of the forward calls: one per looked-up index."""
        return sum(ops.kfac_embedding_rows(t.shape) for t in inputs)

    @override
    def prepare(self, inputs, grads, grad_scale):
        dim = self.weight.shape[1]
        idx, g = merge_repeats(inputs, grads, self.weight.shape[0], dim)
        per_sample = None
        if self.eigenvalue_correction:  # EKFAC: per-sample gradients; none reaches padding_idx's row
            x, rows = per_sample_layout(inputs, grads, None, dim)
            pad = getattr(self.module, "padding_idx", None)
            if pad is not None:
                rows = (rows.reshape(-1, *x.shape, dim) * (x != pad).unsqueeze(-1).to(rows.dtype)).reshape(rows.shape)
            per_sample = PerSample(x, rows, grad_scale)
        scale = ops.kfac_expand_grad_scale(grad_scale, self.count_samples(inputs), idx.numel(), g.shape[0])
        return Statistics(idx, g, scale, idx.numel(), g.shape[0], per_sample)

    def _update_a(self, stats, rho):
        counts = torch.bincount(stats.inputs, minlength=self.weight.shape[0]).to(self.factor_dtype)
        self.state["A"].mul_(rho).add_(counts / stats.inputs.numel(), alpha=1.0 - rho)

    def _a_side(self):
        return None, self.state["A"]

    def _corrected_ema(self, data, decay):
        ops.embedding_ekfac_diagonal_ema_(self.state[CORRECTED], data.inputs, data.grads,
                                          self.state["g_eigenvectors"], data.grad_scale, decay)

    @override
    def decomposition_template(self, method):
        opts = dict(dtype=self.inverse_dtype, device=self.weight.device)
        g = self.g_dim()
        return {"g_eigenvalues": torch.empty(g, **opts), "g_eigenvectors": torch.empty(g, g, **opts)}

    @override
    def update_inverse(self, method, damping, pi_correction=False, warm=False):
        old = self._corrected_basis()
        if warm and "g_eigenvectors" in self.state:
            self.state["g_eigenvalues"], self.state["g_eigenvectors"] = refresh.warm_eigh(
                self.state["G"].to(self.inverse_dtype), self.state["g_eigenvalues"], self.state["g_eigenvectors"])
            self._refresh_corrected(old)
            return 0
        self.drop_decomposition()
        eg = ops.damped_eigh(self.state["G"].to(self.inverse_dtype))
        self.state["g_eigenvalues"], self.state["g_eigenvectors"] = eg.eigenvalues, eg.eigenvectors
        self._refresh_corrected(old)
        return int(eg.rung)

    @override
    def precondition(self, packed, damping, pi_correction=False):
        s = self.state
        if self.eigenvalue_correction:  # EKFAC: V_A = I, exact damping, no π
            out = ops.kfac_precondition_ekfac(packed.to(self.inverse_dtype), s["g_eigenvectors"], None,
                                              s[CORRECTED], damping)
            return out.to(packed.dtype)
        out = ops.kfac_precondition_diagonal_a(
            packed.to(self.inverse_dtype), s["A"].to(self.inverse_dtype), s["g_eigenvalues"],
            s["g_eigenvectors"], damping, pi_correction)
        return out.to(packed.dtype)

    @override
    def product(self, packed):
        return (self.state["G"] @ packed.to(self.factor_dtype)) * self.state["A"][None, :]

    def _a_diagonal(self):
        return self.state["A"]


class EmbeddingKind(LayerKind):
    """nn.Embedding; a sparse or max-norm one takes the plain gradient, and one with
    ``scale_grad_by_freq`` gets explicit rows.
    """

    name = "embedding"
    fallback = "plain"
    sparse_gradient = True

    @override
    def unsupported_reason(self, module):
        return ops.kfac_embedding_unsupported_reason(module.sparse, module.max_norm is not None)

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return EmbeddingBlock(name, module, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def implicit_rows(self, module):
        return not module.scale_grad_by_freq

    @override
    def rows_input(self, module, inputs, samples):
        if not inputs or any(x.shape[0] != samples or x.dim() < 1 for x in inputs):
            return None
        if len(inputs) == 1:
            return inputs[0]
        return torch.cat([x.reshape(samples, -1) for x in inputs], 1)

    @override
    def merge_calls(self, module, grads):
        if len(grads) == 1:
            return grads[0]
        return torch.cat([g.reshape(g.shape[0], -1, module.embedding_dim) for g in grads], 1)

    @override
    def rows_grads(self, module, x, passes):
        g = super().rows_grads(module, x, passes)
        if module.padding_idx is not None:  # no gradient reaches that row
            g = g * (x != module.padding_idx).unsqueeze(-1).repeat(len(passes), *[1] * x.dim()).to(g.dtype)
        return g

    @override
    def row_bound(self, module, x, g, bias):
        if g.numel() == 0:
            return 0.0
        low, high = torch.aminmax(g)
        return self.row_positions(module, g) * max(-float(low), float(high))

    @override
    def gram(self, module, x, g, bias):
        return ops.embedding_gram(x, g)

    @override
    def rows_mv(self, module, x, g, weight, bias):
        return ops.embedding_rows_mv(x, g, weight)

    @override
    def rows_tmv(self, module, x, g, w, index, chunk):
        width = g.shape[-1]
        per_unit = max(module.weight.numel() // max(width, 1), 1)
        for a, b in output_blocks(width, per_unit, chunk):
            part = ops.embedding_rows_tmv(x, g[..., a:b], w, module.num_embeddings)
            yield index[0], (slice(None), slice(a, b)), part
