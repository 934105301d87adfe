"""nn.MultiheadAttention: Kronecker blocks for the q/k/v and output projections.

Mechanism. ``F.multi_head_attention_forward`` uses the projection weights functionally, so no
module hook sees a projection's input or output (``out_proj``'s own hooks never fire). While a
natgrad optimizer holds it, an attention module's ``forward`` is an instance attribute that
runs :func:`natgrad.curvature._mha.mha_forward`, an op-for-op re-expression of the original
(bit-identical outputs and gradients, scaled-dot-product attention still fused), whose four
projections report their inputs and get tensor hooks on their outputs. On calls that collect
no statistics (eval, no-grad, steps between factor updates) the original forward runs.
Parameters, their names and the state_dict are untouched; ``remove()`` restores the class's
forward.

Blocks. The q, k and v projections are three Kronecker factor pairs ``A_s ⊗ G_s`` (``s`` in
q, k, v: the input's second moment and the projected output's gradient's, as for an
nn.Linear), held by one :class:`AttentionBlock` over the module's own parameters
(``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` with ``kdim``/``vdim``).
In self-attention the three share their input, so ``A`` is computed once. ``out_proj`` (an
nn.Linear) gets a plain :class:`~natgrad.curvature.layers.linear.LinearBlock`, fed by the same
forward. Inputs are taken in sample-major layout whatever ``batch_first`` says, so "expand"
and "reduce" mean what they mean for an nn.Linear on ``[N, T, d]``.

Kind. An attention module with ``add_bias_kv`` takes the plain gradient, as does one whose
parameters are optimized only in part. Its block is fed by :class:`AttentionCapture`, not by
module hooks, so natgrad.fisher and EWC treat the module's parameters as dense blocks.
"""
from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from natgrad import ops
from natgrad.curvature._mha import mha_forward
from natgrad.curvature.block import CurvatureBlock
from natgrad.curvature.capture import LayerCapture
from natgrad.curvature.layers.base import LayerKind
from natgrad.curvature.layers.linear import LinearBlock

__all__ = ["AttentionBlock", "AttentionCapture", "AttentionCaptures", "AttentionKind"]

STREAMS = ("q", "k", "v")


class _Projection:
    """The weight rows (and bias entries) of one stream, as the ``module`` of a LinearBlock."""

    def __init__(self, mha: nn.MultiheadAttention, stream: str) -> None:
        self.mha, self.stream = mha, stream

    @property
    def weight(self) -> Tensor:
        m, i = self.mha, STREAMS.index(self.stream)
        if not m._qkv_same_embed_dim:
            return getattr(m, f"{self.stream}_proj_weight")
        return m.in_proj_weight[i * m.embed_dim:(i + 1) * m.embed_dim]

    @property
    def bias(self) -> Tensor | None:
        m, i = self.mha, STREAMS.index(self.stream)
        return None if m.in_proj_bias is None else m.in_proj_bias[i * m.embed_dim:(i + 1) * m.embed_dim]


class _State(MutableMapping):
    """The parts' states as one mapping with keys ``"<stream>.<key>"``."""

    def __init__(self, parts: dict[str, LinearBlock]) -> None:
        self.parts = parts

    def _split(self, key: str) -> tuple[LinearBlock, str]:
        stream, _, inner = key.partition(".")
        if stream not in self.parts or not inner:
            raise KeyError(key)
        return self.parts[stream], inner

    def __getitem__(self, key):
        part, inner = self._split(key)
        return part.state[inner]

    def __setitem__(self, key, value):
        part, inner = self._split(key)
        part.state[inner] = value

    def __delitem__(self, key):
        part, inner = self._split(key)
        del part.state[inner]

    def __iter__(self) -> Iterator[str]:
        return iter([f"{s}.{k}" for s, p in self.parts.items() for k in list(p.state)])

    def __len__(self) -> int:
        return sum(len(p.state) for p in self.parts.values())


class AttentionBlock(CurvatureBlock):
    """``blockdiag(A_q ⊗ G_q, A_k ⊗ G_k, A_v ⊗ G_v)`` over an attention module's in-projection
    parameters (see the module docstring). Packed layout: the three parts' ``[W_s, b_s]``
    matrices, flattened and concatenated.

    Args:
        name (str): the attention module's qualified name (checkpoint key).
        mha (nn.MultiheadAttention): the module.
        approx (str): "expand" or "reduce", as for nn.Linear (default: "expand").
        factor_dtype (torch.dtype or None): as for the Kronecker blocks.
        inverse_dtype (torch.dtype or None): as for the Kronecker blocks.
    """

    kind = "attention"

    def __init__(self, name: str, mha: nn.MultiheadAttention, approx: str = "expand",
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None) -> None:
        # a _Projection duck-types the weight and bias a LinearBlock reads from its module
        self.parts = {s: LinearBlock(f"{name}.{s}", cast(nn.Module, _Projection(mha, s)), approx=approx,
                                     factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
                      for s in STREAMS}
        own = [mha.in_proj_weight] if mha._qkv_same_embed_dim else [mha.q_proj_weight, mha.k_proj_weight,
                                                                      mha.v_proj_weight]
        super().__init__(name, own + ([mha.in_proj_bias] if mha.in_proj_bias is not None else []))
        self.module = mha
        self.weight = self.params[0]
        self.approx = approx

    @property
    def state(self) -> MutableMapping[str, Tensor]:
        """The q/k/v parts' factors and decompositions as one mapping (keys prefixed by the part)."""
        return _State(self.parts)

    @state.setter
    def state(self, value: Mapping[str, Tensor]) -> None:
        if not hasattr(self, "parts"):
            return
        for part in self.parts.values():
            part.state = {}
        for key, tensor in dict(value).items():
            _State(self.parts)[key] = tensor

    @property
    @override
    def description(self) -> str:
        notes = "".join(f"; {s}{p.split_note()}" for s, p in self.parts.items() if p.is_split)
        return f"K-FAC attention q/k/v ({self.approx}){notes}"

    @override
    def limit_factors(self, max_factor_dim):
        for p in self.parts.values():
            p.limit_factors(max_factor_dim)

    @property
    @override
    def has_factors(self) -> bool:
        return all(p.has_factors for p in self.parts.values())

    @property
    @override
    def has_inverse(self) -> bool:
        return all(p.has_inverse for p in self.parts.values())

    # ---- layout -------------------------------------------------------------------------------

    def _split_params(self, tensors: Sequence[Tensor | None]) -> dict[str, list[Tensor | None]]:
        m, e = self.module, self.module.embed_dim
        bias = tensors[-1] if m.in_proj_bias is not None else None
        out = {}
        for i, s in enumerate(STREAMS):
            if m._qkv_same_embed_dim:
                w = None if tensors[0] is None else tensors[0][i * e:(i + 1) * e]
            else:
                w = tensors[i]
            b = None if bias is None else bias[i * e:(i + 1) * e]
            out[s] = [w] + ([b] if m.in_proj_bias is not None else [])
        return out

    def _sizes(self) -> list[int]:
        return [p.g_dim() * p.a_dim() for p in self.parts.values()]

    @override
    def pack(self, tensors):
        split = self._split_params(tensors)
        return torch.cat([p.pack(split[s]).reshape(-1) for s, p in self.parts.items()])

    def _unpack_parts(self, packed: Tensor) -> dict[str, list[Tensor]]:
        chunks = torch.split(packed, self._sizes())
        return {s: p.unpack(c.reshape(p.g_dim(), p.a_dim())) for (s, p), c in zip(self.parts.items(), chunks)}

    @override
    def unpack(self, packed):
        parts = self._unpack_parts(packed)
        m = self.module
        if m._qkv_same_embed_dim:
            out = [torch.cat([parts[s][0] for s in STREAMS])]
        else:
            out = [parts[s][0] for s in STREAMS]
        if m.in_proj_bias is not None:
            out.append(torch.cat([parts[s][1] for s in STREAMS]))
        return out

    def _map(self, packed: Tensor, fn) -> Tensor:
        chunks = torch.split(packed, self._sizes())
        return torch.cat([fn(p, c.reshape(p.g_dim(), p.a_dim())).reshape(-1)
                          for p, c in zip(self.parts.values(), chunks)])

    # ---- statistics ---------------------------------------------------------------------------

    @override
    def factors(self):
        return {f"{s}.{k}": v for s, p in self.parts.items() for k, v in p.factors().items()}

    @override
    def inverse_cost(self):
        return sum(p.inverse_cost() for p in self.parts.values())

    @override
    def expected_shapes(self):
        return {f"{s}.{k}": v for s, p in self.parts.items() for k, v in p.expected_shapes().items()}

    @override
    def ensure_factors(self):
        for p in self.parts.values():
            p.ensure_factors()

    def _streams(self, inputs: Sequence) -> dict[str, list[Tensor]]:
        per: dict[str, list[Tensor]] = {s: [] for s in STREAMS}
        for tag, x in inputs:
            for s in tag:
                per[s].append(x)
        return per

    def count_samples(self, inputs):
        """Samples (dim 0 of the sample-major inputs) of the most-fed stream."""
        return max(p.count_samples(xs) for p, xs in zip(self.parts.values(), self._streams(inputs).values()))

    def count_rows(self, inputs):
        """Rows of the queries (the attention's outputs: its loss terms), else of any stream."""
        per = self._streams(inputs)
        xs = per["q"] or per["k"] or per["v"]
        return self.parts["q"].count_rows(xs)

    def prepare(self, inputs, grads, grad_scale):
        """Per stream: LinearBlock statistics (a packed "qkv"/"kv" gradient is split)."""
        xs: dict[str, list[Tensor]] = {s: [] for s in STREAMS}
        gs: dict[str, list[Tensor]] = {s: [] for s in STREAMS}
        shared = True
        for (tag, x), g in zip(inputs, grads):
            shared &= tag == "qkv"
            for s, gc in zip(tag, g.chunk(len(tag), -1)):
                xs[s].append(x)
                gs[s].append(gc)
        stats = {s: self.parts[s].prepare(xs[s], gs[s], grad_scale) for s in STREAMS if xs[s]}
        return stats, shared and len(stats) == 3

    def statistics_ok(self, stats) -> Tensor:
        """A 0-d bool tensor: every part's statistics are finite and bounded (no host read)."""
        flags = [self.parts[s].statistics_ok(st) for s, st in stats[0].items()]
        return torch.stack(flags).all()

    @override
    def update(self, inputs, grads, *, decay, grad_scale):
        self.apply_update(self.prepare(inputs, grads, grad_scale), decay)

    def apply_update(self, stats, decay):
        """Each part's EMA; with one shared input, ``A`` is computed once and copied."""
        per, shared = stats
        for s in STREAMS:
            part = self.parts[s]
            if s not in per:
                part.ensure_factors()
            elif shared and s != "q":
                rho = decay if part.has_factors else 0.0
                part.ensure_factors()
                part.state["A"].copy_(self.parts["q"].state["A"])
                ops.linear_grad_factor_ema_(part.state["G"], per[s].grads, per[s].grad_scale, rho)
            else:
                part.apply_update(per[s], decay)

    # ---- decompositions and products ----------------------------------------------------------

    @override
    def update_inverse(self, method, damping, pi_correction=False, warm=False):
        return max(p.update_inverse(method, damping, pi_correction, warm) for p in self.parts.values())

    @override
    def decomposition_template(self, method):
        return {f"{s}.{k}": v for s, p in self.parts.items() for k, v in p.decomposition_template(method).items()}

    @override
    def drop_decomposition(self):
        for p in self.parts.values():
            p.drop_decomposition()

    def precondition(self, packed: Tensor, damping: float, pi_correction: bool = False) -> Tensor:
        """Each part's ``(A_s ⊗ G_s + damping·I)⁻¹`` on its slice of ``packed``."""
        return self._map(packed, lambda p, x: p.precondition(x, damping, pi_correction))

    @override
    def solve(self, tensors, damping, pi_correction=False):
        return self.unpack(self.precondition(self.pack(tensors), damping, pi_correction))

    @override
    def mv(self, tensors):
        packed = self.pack(tensors)
        return self.unpack(self._map(packed, lambda p, x: p.product(x).to(x.dtype)))

    @override
    def quad_form(self, tensors):
        packed = self.pack(tensors)
        return sum(p.quad_form(p.unpack(c.reshape(p.g_dim(), p.a_dim())))
                   for p, c in zip(self.parts.values(), torch.split(packed, self._sizes())))

    @override
    def diagonal(self):
        return self.unpack(torch.cat([p.pack(p.diagonal()).reshape(-1) for p in self.parts.values()]))

    def _dtype(self):
        return self.parts["q"].factor_dtype


def _sample_major(t: Tensor, rows: int, batch: int) -> Tensor:
    """``[L, N, d]`` or ``[L·N, d]`` (row ``l·N + n``) -> a ``[N, L, d]`` view."""
    return t.reshape(rows, batch, t.shape[-1]).transpose(0, 1)


class _Sink(LayerCapture):
    """Records fed by an :class:`AttentionCapture` (no hooks of its own)."""

    def __init__(self, parent: AttentionCapture, active, phase) -> None:
        self.parent = parent
        super().__init__(parent.mha, active, phase)

    def _install_hooks(self) -> None:
        pass

    def remove(self) -> None:
        self.records.clear()
        self.parent.release(self)


class AttentionCapture:
    """Installs the re-expressed forward on one attention module (see the module docstring);
    :attr:`inproj` feeds the module's :class:`AttentionBlock`, :attr:`out` its out_proj's
    LinearBlock.
    """

    def __init__(self, mha: nn.MultiheadAttention, active, phase) -> None:
        self.mha = mha
        self.active, self.phase = active, phase
        self.sinks: dict[str, _Sink] = {}
        capture = self

        def forward(module, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
            if (module is not capture.mha or not capture.sinks or query.is_nested  # (a deepcopy: its own)
                    or not next(iter(capture.sinks.values())).wants(module)):
                return type(module).forward(module, *args)
            return mha_forward(module, capture.project, *args)

        setattr(mha, "forward", types.MethodType(forward, mha))  # this instance's forward only

    def sink(self, which: str) -> _Sink:
        """The capture for "inproj" or "out" (made once)."""
        if which not in self.sinks:
            self.sinks[which] = _Sink(self, self.active, self.phase)
        return self.sinks[which]

    def project(self, stream: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear`` that records its input and output for the stream's sink."""
        y = F.linear(x, weight, bias)
        if stream in ("qkv", "q"):
            self._batch = x.shape[1]  # [L, N, E] (seq-first inside the forward)
        sink = self.sinks.get("out" if stream == "out" else "inproj")
        if sink is None:
            return y
        if stream == "out":  # [L·N, E] rows, l-major, with the queries' batch size
            batch = self._batch
            rows = x.shape[0] // batch
            return sink.follow(_sample_major(x.detach(), rows, batch), y, lambda g: _sample_major(g, rows, batch))
        rows, batch = x.shape[0], x.shape[1]
        return sink.follow((stream, _sample_major(x.detach(), rows, batch)), y, lambda g: _sample_major(g, rows, batch))

    _batch = 1

    def release(self, sink: _Sink) -> None:
        """A sink was removed; the original forward returns with the last one."""
        self.sinks = {k: s for k, s in self.sinks.items() if s is not sink}
        if not self.sinks:
            self.mha.__dict__.pop("forward", None)


class AttentionKind(LayerKind):
    """nn.MultiheadAttention: one :class:`AttentionBlock` over the in-projection parameters."""

    name = "attention"
    fallback = "plain"
    standalone = False

    @override
    def unsupported_reason(self, module):
        if module.bias_k is not None:
            return "add_bias_kv (bias_k, bias_v) has no curvature block"
        return None

    @override
    def block(self, name, module, *, approx="expand", factor_dtype=None, inverse_dtype=None):
        return AttentionBlock(name, module, approx=approx, factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)

    @override
    def captures(self, model, active, phase):
        return AttentionCaptures(model, active, phase)


class AttentionCaptures:
    """The attention captures of one model: one :class:`AttentionCapture` per attention module,
    feeding its :class:`AttentionBlock` and its ``out_proj``'s LinearBlock.

    Args:
        model (nn.Module): the model.
        active (Callable[[], bool]): whether the current step collects statistics.
        phase (GradientPhase): which backward passes fill the records.
    """

    def __init__(self, model: nn.Module, active, phase) -> None:
        self.active, self.phase = active, phase
        self._out_proj = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        self._attention: dict[int, AttentionCapture] = {}

    def _of(self, mha: nn.MultiheadAttention) -> AttentionCapture:
        if id(mha) not in self._attention:
            self._attention[id(mha)] = AttentionCapture(mha, self.active, self.phase)
        return self._attention[id(mha)]

    def capture(self, block: CurvatureBlock, module: nn.Module) -> LayerCapture | None:
        """The sink of ``block``: "inproj" for an AttentionBlock, "out" for an ``out_proj``."""
        if isinstance(block, AttentionBlock):
            return self._of(block.module).sink("inproj")
        if id(module) in self._out_proj:
            return self._of(self._out_proj[id(module)]).sink("out")
        return None
