"""The shared K-FAC rule ops (natgrad.ops.rules, csrc/kfac/kfac_rules.h): each equals natgrad.KFAC's
Python implementation of the same rule on a grid of inputs, edge cases included, and passes
torch.library.opcheck."""
from __future__ import annotations

import itertools
import math
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from natgrad import ops
from natgrad.curvature.block import max_abs
from natgrad.curvature.kron import Conv2dBlock, EmbeddingBlock, LinearBlock, Statistics
from natgrad.curvature.plan import sample_scale
from natgrad.curvature.registry import unsupported_reason
from natgrad.ops.rules import Fault
from natgrad.optim import KFAC
from natgrad.optim import _kfac_damping, _kfac_step
from natgrad.optim._kfac_step import Updates

OPS = torch.ops.natgrad
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---- statistics bound ---------------------------------------------------------------------------

def _peaks(dtype: torch.dtype) -> list[float]:
    limit = torch.finfo(dtype).max / 4
    return [0.0, 1.0, 1e3, math.sqrt(limit) / 10, math.sqrt(limit) * 10, math.inf, math.nan]


@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_statistics_ok_equals_the_kronecker_blocks_bound(factor_dtype):
    block = LinearBlock("fc", nn.Linear(3, 2, dtype=torch.float64), factor_dtype=factor_dtype)
    for px, pg, rows, scale in itertools.product(_peaks(factor_dtype), _peaks(factor_dtype), (0, 1, 37),
                                                 (0.25, 1.0, 30.0)):
        x = torch.tensor([[px, -1.0, 0.5]], dtype=torch.float64)
        g = torch.tensor([[-pg, 0.0]], dtype=torch.float64)
        stats = Statistics(x, g, scale, rows, 2 * rows)
        got = ops.kfac_statistics_ok(x, g, rows, 2 * rows, scale, factor_dtype)
        assert got.dtype == torch.bool and got.dim() == 0
        assert bool(got) == bool(block.statistics_ok(stats)), (px, pg, rows, scale)


def test_statistics_ok_leaves_embedding_indices_unbounded_like_the_embedding_block():
    block = EmbeddingBlock("emb", nn.Embedding(10, 4))
    idx = torch.tensor([1, 9, 3])
    for pg in _peaks(torch.float32):
        g = torch.full((3, 4), pg)
        stats = Statistics(idx, g, 2.0, 3, 3)
        assert bool(ops.kfac_statistics_ok(idx, g, 3, 3, 2.0, torch.float32)) == bool(block.statistics_ok(stats))


def test_empty_statistics_are_bounded():
    x, g = torch.empty(0, 3), torch.empty(0, 2)
    assert bool(ops.kfac_statistics_ok(x, g, 0, 0, 1.0, torch.float32))


@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_peak_bounded_equals_the_diagonal_blocks_bound(factor_dtype):
    limit = torch.finfo(factor_dtype).max / 4
    assert ops.kfac_statistics_limit(factor_dtype) == limit
    for peak, scale, units in itertools.product(_peaks(factor_dtype), (0.5, 1.0, 9.0), (0, 1, 50)):
        p = torch.tensor(peak, dtype=torch.float64)
        python = bool(p * p * max(scale, 1.0) * max(units, 1) < limit)  # DiagonalBlock.statistics_ok
        assert bool(ops.kfac_peak_bounded(p, max(scale, 1.0) * max(units, 1), factor_dtype)) == python


def test_statistics_bound_rejects_a_non_floating_factor_dtype():
    with pytest.raises(RuntimeError, match="factor_dtype must be a floating-point dtype"):
        ops.kfac_statistics_limit(torch.int64)


# ---- rows and the sample scale ------------------------------------------------------------------

LINEAR_INPUTS = [[(5, 3)], [(3,)], [(4, 7, 3), (2, 3)], [(0, 3)]]
CONV_GEOMETRIES = [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=2, padding=(1, 0)),
                   dict(kernel_size=2, dilation=(2, 1), padding=3), dict(kernel_size=5, stride=3)]
CONV_INPUTS = [[(2, 1, 8, 9)], [(1, 8, 9)], [(3, 1, 5, 5), (1, 1, 12, 7)], [(2, 1, 4, 4)]]


def test_linear_rows_equal_the_linear_blocks_count():
    block = LinearBlock("fc", nn.Linear(3, 2))
    for shapes in LINEAR_INPUTS:
        inputs = [torch.empty(s) for s in shapes]
        assert sum(ops.kfac_linear_rows(x.shape, 3) for x in inputs) == block.count_rows(inputs)
    assert ops.kfac_linear_rows([4, 0], 0) == 0


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_rows_equal_the_conv2d_blocks_count(geometry):
    conv = nn.Conv2d(1, 2, **geometry)
    block = Conv2dBlock("conv", conv)
    for shapes in CONV_INPUTS:
        inputs = [torch.empty(s) for s in shapes]
        got = sum(ops.kfac_conv_rows(x.shape, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
                  for x in inputs)
        assert got == block.count_rows(inputs), shapes


def test_embedding_rows_equal_the_embedding_blocks_count():
    block = EmbeddingBlock("emb", nn.Embedding(10, 4))
    for shapes in ([(5,)], [(2, 7), (3,)], [()]):
        inputs = [torch.zeros(s, dtype=torch.long) for s in shapes]
        assert sum(ops.kfac_embedding_rows(x.shape) for x in inputs) == block.count_rows(inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "token_mean"])
def test_sample_scale_equals_the_plans(reduction):
    blocks = [(LinearBlock("fc", nn.Linear(3, 2)), LINEAR_INPUTS, torch.float32),
              (EmbeddingBlock("emb", nn.Embedding(10, 4)), [[(5,)], [(2, 7), (3,)]], torch.long)]
    for block, grid, dtype in blocks:
        for shapes in grid:
            inputs = [torch.zeros(s, dtype=dtype) for s in shapes]
            rows = block.count_rows(inputs)
            got = ops.kfac_sample_scale(block.count_samples(inputs), rows, reduction)
            assert got == sample_scale(block, inputs, reduction)
    for samples, rows in ((0, 0), (1, 1), (3, 10**6), (2**20, 2**20 + 1)):
        block = SimpleNamespace(count_samples=lambda _, n=samples: n, count_rows=lambda _, r=rows: r)
        assert ops.kfac_sample_scale(samples, rows, reduction) == sample_scale(block, [], reduction)


def test_sample_scale_names_a_bad_loss_reduction():
    with pytest.raises(RuntimeError, match="loss_reduction must be 'mean', 'sum' or 'token_mean', got 'max'"):
        ops.kfac_sample_scale(1, 1, "max")


# ---- π correction and damping -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("pi", [None, True, False])
def test_pi_correction_equals_kfacs(method, pi):
    opt = KFAC(nn.Linear(2, 2), inverse_method=method, pi_correction=pi)
    assert ops.kfac_pi_correction(method, pi) is opt.pi_correction


def test_damping_equals_kfacs_damping_with_its_multiplier():
    model = nn.Linear(2, 2)
    for damping, multiplier in itertools.product((1e-3, 0.7, 3.0), (1.0, 0.95**5, 1e-8, 1e8)):
        opt = KFAC(model, damping=damping)
        opt._damping_multiplier = multiplier
        opt._index_groups()
        assert ops.kfac_damping(damping, multiplier) == opt._damping(model.weight)
    with pytest.raises(RuntimeError, match="damping must be a finite number > 0"):
        ops.kfac_damping(0.0, 1.0)


def _python_adaptation(multiplier, loss_change, delta, grad, damping, decay, interval):
    """natgrad.KFAC's Levenberg–Marquardt step (_kfac_damping.adapt_damping) on one parameter."""
    p = torch.zeros(delta.shape, dtype=torch.float64)
    before = {p: p - delta}
    opt = SimpleNamespace(_damping=lambda _: damping, _blocks=[], _suspend_capture=False,
                          _comm=SimpleNamespace(mean_scalar=float), damping_adaptation_decay=decay,
                          damping_adaptation_interval=interval, _damping_multiplier=multiplier)
    _kfac_damping.adapt_damping(opt, lambda: torch.tensor(loss_change, dtype=torch.float64), 0.0,
                                before, {p: grad})
    predicted = float((grad * delta).sum())
    model_change = predicted + 0.5 * (0.0 + damping * float(delta.pow(2).sum()))
    return opt._damping_multiplier, opt.last_reduction_ratio, model_change


def test_adapt_damping_equals_kfacs_levenberg_marquardt_rule():
    torch.manual_seed(0)
    delta = torch.randn(5, dtype=torch.float64)
    for multiplier, change, scale, decay, interval in itertools.product(
            (1.0, 1e-8, 1e8, 3.0), (-2.0, -0.5, -1e-3, 0.0, 0.4, math.nan), (-1.0, 0.0, 1.0),
            (0.5, 0.95), (1, 5)):
        grad = -scale * delta  # scale 1: the step goes downhill, -1: uphill, 0: flat
        m, ratio, model_change = _python_adaptation(multiplier, change, delta, grad, 1e-3 * abs(scale),
                                                    decay, interval)
        got = ops.kfac_adapt_damping(multiplier, change, model_change, decay, interval)
        assert got.multiplier == m
        assert got.ratio == ratio or (math.isnan(got.ratio) and math.isnan(ratio))


# ---- trust region -------------------------------------------------------------------------------

def test_fsum_equals_math_fsum():
    rng = random.Random(0)
    grids = [[], [1.0], [1e100, 1.0, -1e100], [0.1] * 10, [1.0, 2.0**-53, 2.0**-106],
             [1.0, -(2.0**-53), -(2.0**-106)], [2.0**-1074] * 3]
    grids += [[rng.uniform(-1, 1) * 10.0 ** rng.randint(-20, 20) for _ in range(rng.randint(1, 30))]
              for _ in range(300)]
    for values in grids:
        assert ops.kfac_fsum(values) == math.fsum(values), values
    assert ops.kfac_fsum([1.0, math.inf]) == math.inf


def _trust_case(rng: random.Random, n: int):
    """n parameters of random groups and states (some with momentum, buffers and shares)."""
    params = [torch.zeros(1) for _ in range(n)]
    groups = [dict(lr=rng.choice([0.1, 0.01, 1.0]), momentum=rng.choice([0.0, 0.9, 0.5])) for _ in params]
    state, inner, cross = {}, {}, {}
    for p, g in zip(params, groups):
        inner[p], cross[p] = rng.uniform(-0.5, 3.0) * 10.0 ** rng.randint(-3, 3), rng.uniform(-2, 2)
        s = {}
        if g["momentum"] and rng.random() < 0.7:
            s["momentum_buffer"] = torch.zeros(1)
            if rng.random() < 0.7:
                s["kl_share"] = torch.tensor(rng.uniform(0, 2), dtype=torch.float64)
        state[p] = s
    return params, groups, state, inner, cross


def _op_trust_region(kl_clip, params, groups, state, inner, cross):
    """The op on the same numbers: <b, g> and the share count only with a momentum buffer."""
    has_buffer = [bool(g["momentum"]) and state[p].get("momentum_buffer") is not None for p, g in zip(params, groups)]
    return ops.kfac_trust_region(
        kl_clip, [inner[p] for p in params], [cross[p] if b else 0.0 for p, b in zip(params, has_buffer)],
        [g["lr"] for g in groups], [g["momentum"] for g in groups],
        [float(state[p]["kl_share"]) if b and "kl_share" in state[p] else 0.0 for p, b in zip(params, has_buffer)])


@pytest.mark.parametrize("momentum", [True, False])
def test_trust_region_equals_kfacs_from_the_read_stats(momentum):
    rng = random.Random(1 if momentum else 2)
    for trial in range(200):
        params, groups, state, inner, cross = _trust_case(rng, rng.randint(1, 6))
        if not momentum:
            for g in groups:
                g["momentum"] = 0.0
            state = {p: {} for p in params}
        kl_clip = rng.choice([1e-3, 1e-1, 10.0])
        updates = Updates({p: torch.zeros(1) for p in params})
        updates.inner, updates.cross = dict(inner), dict(cross)
        opt = SimpleNamespace(kl_clip=kl_clip, _group_of={id(p): g for p, g in zip(params, groups)},
                              state={p: dict(s) for p, s in state.items()})
        got = _op_trust_region(kl_clip, params, groups, state, inner, cross)
        assert got.nu == _kfac_damping.trust_region(opt, 0, updates, {}), trial
        for p, g, share in zip(params, groups, got.kl_share):
            if g["momentum"]:
                assert share == float(opt.state[p]["kl_share"]), trial


def test_trust_region_is_one_for_a_non_positive_or_non_finite_total():
    for inner in ([-1.0], [0.0], [math.nan], [math.inf]):
        assert ops.kfac_trust_region(1e-3, inner, [0.0], [0.1], [0.0], [0.0]).nu == 1.0


def test_trust_region_names_mismatched_lengths():
    with pytest.raises(RuntimeError, match="lr must hold one entry per parameter"):
        ops.kfac_trust_region(1e-3, [1.0], [0.0], [], [0.0], [0.0])


# ---- faults -------------------------------------------------------------------------------------

class _FaultLog(SimpleNamespace):
    def _fault(self, where, what, kind="layer"):
        self.faults.append((where, what, kind))


def test_factor_faults_equal_kfacs_classification():
    flags = [v for pair in itertools.product((1.0, 0.0), repeat=2) for v in pair]  # every pair
    blocks = [SimpleNamespace(name=f"l{i}", state={"A": 1}) for i in range(len(flags) // 2)]
    opt = _FaultLog(faults=[], _decomposed={b.name for b in blocks})
    skipped = _kfac_step._factor_faults(opt, blocks, flags)
    got = ops.kfac_factor_faults(flags)
    assert got == [Fault.NONE, Fault.FACTORS, Fault.STATISTICS, Fault.STATISTICS]
    what = {Fault.STATISTICS: "activations or output gradients", Fault.FACTORS: "updated factors (reset)"}
    assert opt.faults == [(b.name, what[f], "layer") for b, f in zip(blocks, got) if f != Fault.NONE]
    assert skipped == {b.name for b, f in zip(blocks, got) if f != Fault.NONE}


def test_direction_faults_follow_the_rows_order_of_kfacs_read():
    rows = [1.0, 1.0, 0.3, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 5.0, 0.0, 0.0, 7.0]
    offsets = [0, 4, 7, 10]
    # natgrad.KFAC's directions(): rows[at] == 0 -> gradients, rows[at + 1] == 0 -> directions
    expected = [Fault.GRADIENTS if not rows[at] else Fault.DIRECTIONS if not rows[at + 1] else Fault.NONE
                for at in offsets]
    assert ops.kfac_direction_faults(rows, offsets) == expected == [Fault.NONE, Fault.GRADIENTS,
                                                                    Fault.DIRECTIONS, Fault.GRADIENTS]
    with pytest.raises(RuntimeError, match="offsets entry 12 is outside rows"):
        ops.kfac_direction_faults(rows, [12])


@pytest.mark.parametrize("fault,what,kind", [
    (Fault.GRADIENTS, "gradients", "parameter"), (Fault.DIRECTIONS, "preconditioned gradients", "layer"),
    (Fault.STATISTICS, "activations or output gradients", "layer"),
    (Fault.FACTORS, "updated factors (reset)", "layer")])
@pytest.mark.parametrize("where", ["fc", "blocks.0.attn", "it's"])
def test_fault_message_equals_kfacs_warning(fault, what, kind, where):
    opt = KFAC(nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt._fault(where, what, kind)
    assert [str(w.message) for w in caught] == [ops.kfac_fault_message("natgrad.KFAC", fault, kind, where)]


# ---- unsupported layers -------------------------------------------------------------------------

@pytest.mark.parametrize("groups,padding,mode", [
    (1, 0, "zeros"), (1, (1, 2), "zeros"), (2, 0, "zeros"), (1, "same", "zeros"), (1, "valid", "zeros"),
    (1, 1, "reflect"), (1, 1, "replicate"), (1, 1, "circular"), (2, "same", "reflect")])
def test_conv_unsupported_reason_equals_the_registrys(groups, padding, mode):
    conv = nn.Conv2d(2, 4, 3, groups=groups, padding=padding, padding_mode=mode)
    got = ops.kfac_conv_unsupported_reason(conv.groups, conv.padding, conv.padding_mode)
    assert got == unsupported_reason(conv)


@pytest.mark.parametrize("sparse,max_norm", list(itertools.product((False, True), (None, 1.0))))
def test_embedding_unsupported_reason_equals_the_registrys(sparse, max_norm):
    emb = nn.Embedding(5, 3, sparse=sparse, max_norm=max_norm)
    got = ops.kfac_embedding_unsupported_reason(emb.sparse, emb.max_norm is not None)
    assert got == unsupported_reason(emb)


# ---- opcheck ------------------------------------------------------------------------------------

SAMPLES = {
    "kfac_statistics_ok": [(torch.randn(4, 3), torch.randn(4, 2), 4, 4, 2.0, torch.float32),
                           (torch.tensor([1, 2]), torch.randn(2, 3, dtype=torch.float64), 2, 2, 1.0, torch.float64)],
    "kfac_peak_bounded": [(torch.tensor(3.0, dtype=torch.float64), 10.0, torch.float16)],
    "kfac_statistics_limit": [(torch.bfloat16,)],
    "kfac_linear_rows": [([4, 5, 3], 3)],
    "kfac_conv_rows": [([2, 1, 8, 8], [3, 3], [2, 2], [1, 1], [1, 1])],
    "kfac_embedding_rows": [([2, 7],)],
    "kfac_sample_scale": [(4, 40, "token_mean")],
    "kfac_pi_correction": [("inverse", None), ("eigen", True)],
    "kfac_damping": [(1e-3, 0.5)],
    "kfac_adapt_damping": [(1.0, -0.5, -1.0, 0.95, 5)],
    "kfac_fsum": [([1e100, 1.0, -1e100],)],
    "kfac_trust_region": [(1e-3, [1.0, 2.0], [0.5, 0.0], [0.1, 0.1], [0.9, 0.0], [0.2, 0.0])],
    "kfac_direction_faults": [([1.0, 0.0, 2.0, 0.0, 1.0], [0, 3])],
    "kfac_factor_faults": [([1.0, 1.0, 0.0, 1.0],)],
    "kfac_fault_message": [("natgrad.KFAC", 1, "layer", "fc")],
    "kfac_conv_unsupported_reason": [(2, "(0, 0)", "zeros")],
    "kfac_embedding_unsupported_reason": [(True, False)],
}


# opcheck's AOT test compares outputs it can hold as tensors or numbers, not strings.
STRING_RESULTS = {"kfac_fault_message", "kfac_conv_unsupported_reason", "kfac_embedding_unsupported_reason"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck_rule_ops(name):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name not in STRING_RESULTS:
        utils += ("test_aot_dispatch_dynamic",)
    for args in SAMPLES[name]:
        torch.library.opcheck(getattr(OPS, name).default, args, test_utils=utils)
