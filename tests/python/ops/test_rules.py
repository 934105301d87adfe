"""The shared K-FAC rule ops (natgrad.ops.rules, csrc/kfac/kfac_rules.h): each equals a closed-form
reference written here in plain Python / float64 torch on a grid of inputs, edge cases included,
passes torch.library.opcheck, and is the rule natgrad.KFAC's curvature and step control apply."""
from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import ops
from natgrad.curvature import unsupported_reason
from natgrad.curvature.estimator import Updates
from natgrad.curvature.layers import Conv1dBlock, Conv2dBlock, EmbeddingBlock, LinearBlock
from natgrad.curvature.plan import sample_scale
from natgrad.ops.rules import Fault
from natgrad.optim import KFAC
from natgrad.optim.step_control import DampingAdaptation, TrustRegion

OPS = torch.ops.natgrad
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---- references -----------------------------------------------------------------------------------

def _limit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max / 4


def _peak(t: torch.Tensor) -> torch.Tensor:
    """max|t| in float64 (NaN propagates, 0 when empty)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    t = t.to(torch.float64)
    return torch.where(torch.isnan(t).any(), torch.tensor(math.nan, dtype=torch.float64), t.abs().max())


def _ref_statistics_ok(x, g, input_rows, grad_rows, scale, dtype) -> bool:
    limit = _limit(dtype)
    p = _peak(g)
    ok = bool(p * p * (max(grad_rows, 1) * max(scale * scale, 1.0)) < limit)
    if x.is_floating_point():
        q = _peak(x)
        ok = ok and bool(q * q * max(input_rows, 1) < limit)
    return ok


def _ref_conv_rows(shape, conv) -> int:
    """Samples times output pixels of an nn.Conv2d input ``[N, C, H, W]`` (one row unbatched)."""
    if len(shape) != 4:
        return 1
    rows = shape[0]
    for size, k, s, p, d in zip(shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        rows *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return rows


def _ref_sample_scale(samples: int, rows: int, reduction: str, batch: int = 0) -> float:
    if samples == 1 and batch > 1:  # one call shared by the batch: its gradient sums batch samples'
        return _ref_sample_scale(batch, rows * batch, reduction) / math.sqrt(batch)
    return {"sum": 1.0, "mean": float(samples), "token_mean": math.sqrt(samples * rows)}[reduction]


def _ref_adapt(multiplier, loss_change, model_change, decay, interval):
    ratio = loss_change / model_change if model_change < 0 else -math.inf
    omega = decay ** interval
    if ratio > 0.75:
        multiplier *= omega
    elif ratio < 0.25:
        multiplier /= omega
    return min(max(multiplier, 1e-8), 1e8), ratio


def _ref_trust_region(kl_clip, inner, cross, lr, momentum, share):
    terms = [u + 2 * m * c + m * m * s for u, c, m, s in zip(inner, cross, momentum, share)]
    total = math.fsum(t * r * r for t, r in zip(terms, lr))
    nu = min(1.0, math.sqrt(kl_clip / total)) if total > 0 and math.isfinite(total) else 1.0
    return nu, [t * nu * nu for t in terms]


_WHAT = {Fault.GRADIENTS: "gradients", Fault.DIRECTIONS: "preconditioned gradients",
         Fault.STATISTICS: "activations or output gradients", Fault.FACTORS: "updated factors (reset)"}


def _ref_message(optimizer, fault, kind, where):
    return (f"{optimizer}: NaN or Inf (or values that would overflow) in the {_WHAT[fault]} of {kind} "
            f"{where!r}; its update is skipped this step (parameters and factors untouched)")


def _ref_conv_reason(groups, padding, mode):
    if groups != 1:
        return f"grouped convolution (groups={groups})"
    if isinstance(padding, str) or mode != "zeros":
        return f"padding={padding!r}, padding_mode={mode!r}"
    return None


def _ref_embedding_reason(sparse, max_norm):
    if sparse:
        return "sparse gradients"
    if max_norm:
        return "max_norm renormalises weights in forward"
    return None


# ---- statistics bound ---------------------------------------------------------------------------

def _peaks(dtype: torch.dtype) -> list[float]:
    limit = _limit(dtype)
    return [0.0, 1.0, 1e3, math.sqrt(limit) / 10, math.sqrt(limit) * 10, math.inf, math.nan]


@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_statistics_ok_equals_the_bound(factor_dtype):
    for px, pg, rows, scale in itertools.product(_peaks(factor_dtype), _peaks(factor_dtype), (0, 1, 37),
                                                 (0.25, 1.0, 30.0)):
        x = torch.tensor([[px, -1.0, 0.5]], dtype=torch.float64)
        g = torch.tensor([[-pg, 0.0]], dtype=torch.float64)
        got = ops.kfac_statistics_ok(x, g, rows, 2 * rows, scale, factor_dtype)
        assert got.dtype == torch.bool and got.dim() == 0
        assert bool(got) == _ref_statistics_ok(x, g, rows, 2 * rows, scale, factor_dtype), (px, pg, rows, scale)


def test_statistics_ok_leaves_embedding_indices_unbounded():
    idx = torch.tensor([1, 9, 3])
    for pg in _peaks(torch.float32):
        g = torch.full((3, 4), pg)
        assert bool(ops.kfac_statistics_ok(idx, g, 3, 3, 2.0, torch.float32)) == _ref_statistics_ok(
            idx, g, 3, 3, 2.0, torch.float32)


def test_empty_statistics_are_bounded():
    x, g = torch.empty(0, 3), torch.empty(0, 2)
    assert bool(ops.kfac_statistics_ok(x, g, 0, 0, 1.0, torch.float32))


@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_peak_bounded_equals_the_bound(factor_dtype):
    limit = _limit(factor_dtype)
    assert ops.kfac_statistics_limit(factor_dtype) == limit
    for peak, count in itertools.product(_peaks(factor_dtype), (0.5, 1.0, 9.0, 450.0)):
        p = torch.tensor(peak, dtype=torch.float64)
        assert bool(ops.kfac_peak_bounded(p, count, factor_dtype)) == bool(p * p * count < limit)


def test_statistics_bound_rejects_a_non_floating_factor_dtype():
    with pytest.raises(RuntimeError, match="factor_dtype must be a floating-point dtype"):
        ops.kfac_statistics_limit(torch.int64)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_kronecker_block_skips_statistics_past_the_bound(factor_dtype):
    layer = nn.Linear(3, 2, dtype=torch.float64)
    block = LinearBlock("fc", layer, factor_dtype=factor_dtype)
    x = torch.randn(4, 3, dtype=torch.float64)
    for peak in _peaks(factor_dtype):
        g = torch.randn(4, 2, dtype=torch.float64)
        g[0, 0] = peak
        stats = block.prepare([x], [g], 2.0)
        expected = _ref_statistics_ok(stats.inputs, stats.grads, stats.input_rows, stats.grad_rows,
                                      stats.grad_scale, factor_dtype)
        assert bool(block.statistics_ok(stats)) == expected, peak


# ---- rows and the sample scale ------------------------------------------------------------------

LINEAR_INPUTS = [[(5, 3)], [(3,)], [(4, 7, 3), (2, 3)], [(0, 3)]]
CONV_GEOMETRIES = [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=2, padding=(1, 0)),
                   dict(kernel_size=2, dilation=(2, 1), padding=3), dict(kernel_size=5, stride=3)]
CONV_INPUTS = [[(2, 1, 8, 9)], [(1, 8, 9)], [(3, 1, 5, 5), (1, 1, 12, 7)], [(2, 1, 4, 4)]]


def test_linear_rows_are_the_inputs_vectors():
    block = LinearBlock("fc", nn.Linear(3, 2))
    for shapes in LINEAR_INPUTS:
        inputs = [torch.empty(s) for s in shapes]
        expected = sum(math.prod(s) // 3 for s in shapes)
        assert sum(ops.kfac_linear_rows(x.shape, 3) for x in inputs) == expected
        assert block.count_rows(inputs) == expected
    assert ops.kfac_linear_rows([4, 0], 0) == 0


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_rows_are_the_convolutions_output_positions(geometry):
    conv = nn.Conv2d(1, 2, **geometry)
    block = Conv2dBlock("conv", conv)
    for shapes in CONV_INPUTS:
        inputs = [torch.zeros(s) for s in shapes]
        # a batched input: N times the output's pixels; an unbatched one counts as one row
        expected = sum(_ref_conv_rows(x.shape, conv) for x in inputs)
        for x in inputs:
            if x.dim() == 4 and _ref_conv_rows(x.shape, conv) > 0:  # torch's own output size, where it has one
                assert _ref_conv_rows(x.shape, conv) == conv(x).shape[0] * conv(x)[0, 0].numel()
        got = sum(ops.kfac_conv_rows(x.shape, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
                  for x in inputs)
        assert got == expected == block.count_rows(inputs), shapes


@pytest.mark.parametrize("geometry", [dict(kernel_size=3), dict(kernel_size=2, stride=2, padding=1, dilation=2)])
def test_conv1d_rows_are_the_convolutions_output_positions(geometry):
    conv = nn.Conv1d(1, 2, **geometry)
    block = Conv1dBlock("conv", conv)
    for shapes in ([(2, 1, 9)], [(1, 11)], [(3, 1, 6), (1, 1, 12)]):
        inputs = [torch.zeros(s) for s in shapes]
        expected = sum(conv(x).shape[-1] * (x.shape[0] if x.dim() == 3 else 1) for x in inputs)
        assert block.count_rows(inputs) == expected, shapes


def test_embedding_rows_are_the_indices():
    block = EmbeddingBlock("emb", nn.Embedding(10, 4))
    for shapes in ([(5,)], [(2, 7), (3,)], [()]):
        inputs = [torch.zeros(s, dtype=torch.long) for s in shapes]
        expected = sum(math.prod(s) for s in shapes)
        assert sum(ops.kfac_embedding_rows(x.shape) for x in inputs) == expected == block.count_rows(inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "token_mean"])
def test_sample_scale_equals_the_reference(reduction):
    for samples, rows in ((0, 0), (1, 1), (3, 10**6), (2**20, 2**20 + 1), (7, 35)):
        assert ops.kfac_sample_scale(samples, rows, reduction) == _ref_sample_scale(samples, rows, reduction)
        for batch in (0, 1, 16, samples + 5):  # a call of one sample in a larger batch is shared by it
            assert ops.kfac_sample_scale(samples, rows, reduction, batch) == pytest.approx(
                _ref_sample_scale(samples, rows, reduction, batch), rel=1e-15)
    blocks = [(LinearBlock("fc", nn.Linear(3, 2)), LINEAR_INPUTS, torch.float32),
              (EmbeddingBlock("emb", nn.Embedding(10, 4)), [[(5,)], [(2, 7), (3,)]], torch.long)]
    for block, grid, dtype in blocks:
        for shapes in grid:
            inputs = [torch.zeros(s, dtype=dtype) for s in shapes]
            expected = _ref_sample_scale(block.count_samples(inputs), block.count_rows(inputs), reduction)
            assert sample_scale(block, inputs, reduction) == expected


def test_expand_grad_scale_counts_every_position_and_pass():
    for scale, samples, rows, grad_rows in ((2.0, 4, 24, 24), (2.0, 4, 24, 48), (3.0, 5, 5, 5), (1.5, 0, 0, 0)):
        positions = max(rows // max(samples, 1), 1)
        passes = max(grad_rows // max(rows, 1), 1)
        assert ops.kfac_expand_grad_scale(scale, samples, rows, grad_rows) == scale * math.sqrt(positions * passes)


def test_blocks_prepare_their_statistics_with_the_expand_scale():
    # 3 samples; a Linear over 5 tokens, a Conv2d with 4 output pixels and an Embedding over 7
    # indices per sample; the gradients come from 2 backward passes.
    linear = LinearBlock("fc", nn.Linear(4, 2))
    stats = linear.prepare([torch.randn(3, 5, 4)], [torch.randn(3, 5, 2), torch.randn(3, 5, 2)], 1.5)
    assert stats.grad_scale == 1.5 * math.sqrt(5 * 2) and (stats.input_rows, stats.grad_rows) == (15, 30)
    conv = Conv2dBlock("conv", nn.Conv2d(2, 3, 3))
    stats = conv.prepare([torch.randn(3, 2, 4, 4)], [torch.randn(6, 3, 2, 2)], 1.5)
    assert stats.grad_scale == 1.5 * math.sqrt(4 * 2) and (stats.input_rows, stats.grad_rows) == (12, 24)
    emb = EmbeddingBlock("emb", nn.Embedding(10, 4))
    distinct = torch.stack([torch.randperm(10)[:7] for _ in range(3)])  # no index repeats in a sample
    stats = emb.prepare([distinct], [torch.randn(3, 7, 4)], 1.5)
    assert stats.grad_scale == 1.5 * math.sqrt(7) and (stats.input_rows, stats.grad_rows) == (21, 21)
    # a sample's repeated index is one row: 3 samples of 7 positions holding 2 distinct indices each
    stats = emb.prepare([torch.tensor([[1] * 6 + [2]] * 3)], [torch.randn(3, 7, 4)], 1.5)
    assert stats.grad_scale == 1.5 * math.sqrt(2) and (stats.input_rows, stats.grad_rows) == (6, 6)


def test_sample_scale_names_a_bad_loss_reduction():
    with pytest.raises(RuntimeError, match="loss_reduction must be 'mean', 'sum' or 'token_mean', got 'max'"):
        ops.kfac_sample_scale(1, 1, "max")
    with pytest.raises(RuntimeError, match="batch must be >= 0"):
        ops.kfac_sample_scale(1, 1, "mean", -1)


# ---- π correction and damping -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("pi", [None, True, False])
def test_pi_correction_defaults_to_the_inverse_method(method, pi):
    expected = method == "inverse" if pi is None else pi
    assert ops.kfac_pi_correction(method, pi) is expected
    assert KFAC(nn.Linear(2, 2), inverse_method=method, pi_correction=pi).pi_correction is expected


def test_damping_is_the_groups_times_the_multiplier():
    for damping, multiplier in itertools.product((1e-3, 0.7, 3.0), (1.0, 0.95**5, 1e-8, 1e8)):
        assert ops.kfac_damping(damping, multiplier) == damping * multiplier
    with pytest.raises(RuntimeError, match="damping must be a finite number > 0"):
        ops.kfac_damping(0.0, 1.0)


def test_adapt_damping_equals_the_levenberg_marquardt_rule():
    for multiplier, change, model_change, decay, interval in itertools.product(
            (1.0, 1e-8, 1e8, 3.0), (-2.0, -0.5, -1e-3, 0.0, 0.4, math.nan), (-1.0, -1e-3, 0.0, 0.5),
            (0.5, 0.95), (1, 5)):
        m, ratio = _ref_adapt(multiplier, change, model_change, decay, interval)
        got = ops.kfac_adapt_damping(multiplier, change, model_change, decay, interval)
        assert got.multiplier == m
        assert got.ratio == ratio or (math.isnan(got.ratio) and math.isnan(ratio))
        adaptation = DampingAdaptation()
        adaptation.multiplier = multiplier
        adaptation.update(change, model_change, decay, interval)
        assert adaptation.multiplier == m


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
    params = [torch.randn(3, dtype=torch.float64) for _ in range(n)]
    groups = [dict(lr=rng.choice([0.1, 0.01, 1.0]), momentum=rng.choice([0.0, 0.9, 0.5])) for _ in params]
    state = {}
    for p, g in zip(params, groups):
        s = {}
        if g["momentum"] and rng.random() < 0.7:
            s["momentum_buffer"] = torch.randn(3, dtype=torch.float64)
            if rng.random() < 0.7:
                s["kl_share"] = torch.tensor(rng.uniform(0, 2), dtype=torch.float64)
        state[p] = s
    return params, groups, state


@pytest.mark.parametrize("momentum", [True, False])
def test_trust_region_equals_the_reference(momentum):
    rng = random.Random(1 if momentum else 2)
    for trial in range(200):
        n = rng.randint(1, 6)
        inner = [rng.uniform(-0.5, 3.0) * 10.0 ** rng.randint(-3, 3) for _ in range(n)]
        cross = [rng.uniform(-2, 2) if momentum else 0.0 for _ in range(n)]
        lr = [rng.choice([0.1, 0.01, 1.0]) for _ in range(n)]
        mu = [rng.choice([0.0, 0.9, 0.5]) if momentum else 0.0 for _ in range(n)]
        share = [rng.uniform(0, 2) if momentum else 0.0 for _ in range(n)]
        kl_clip = rng.choice([1e-3, 1e-1, 10.0])
        nu, shares = _ref_trust_region(kl_clip, inner, cross, lr, mu, share)
        got = ops.kfac_trust_region(kl_clip, inner, cross, lr, mu, share)
        assert got.nu == pytest.approx(nu, rel=1e-12, abs=0), trial
        assert got.kl_share == pytest.approx(shares, rel=1e-12, abs=1e-300), trial


@pytest.mark.parametrize("read", [True, False])
def test_kfacs_trust_region_applies_the_rule_to_its_state(read):
    """natgrad.KFAC's trust region, from the stats the directions read or from the tensors: ν and
    the carried shares of the reference, ⟨b, g⟩ and the share counted only with a buffer."""
    rng = random.Random(3)
    for trial in range(100):
        params, groups, state = _trust_case(rng, rng.randint(1, 5))
        grads = {p: torch.randn(3, dtype=torch.float64) for p in params}
        updates = Updates({p: torch.randn(3, dtype=torch.float64) for p in params})
        inner = [float(updates[p] @ grads[p]) for p in params]
        has_buffer = [bool(g["momentum"]) and "momentum_buffer" in state[p] for p, g in zip(params, groups)]
        cross = [float(state[p]["momentum_buffer"] @ grads[p]) if b else 0.0 for p, b in zip(params, has_buffer)]
        share = [float(state[p]["kl_share"]) if b and "kl_share" in state[p] else 0.0
                 for p, b in zip(params, has_buffer)]
        if read:
            updates.inner, updates.cross = dict(zip(params, inner)), dict(zip(params, cross))
        kl_clip = rng.choice([1e-3, 1e-1, 10.0])
        nu, shares = _ref_trust_region(kl_clip, inner, cross, [g["lr"] for g in groups],
                                       [g["momentum"] for g in groups], share)
        got = TrustRegion().scale(kl_clip, updates, grads, {id(p): g for p, g in zip(params, groups)}, state)
        assert got == pytest.approx(nu, rel=1e-12), trial
        for p, g, s in zip(params, groups, shares):
            if g["momentum"]:
                assert float(state[p]["kl_share"]) == pytest.approx(s, rel=1e-12, abs=1e-300), trial
            else:
                assert "kl_share" not in state[p]


def test_trust_region_is_one_for_a_non_positive_or_non_finite_total():
    for inner in ([-1.0], [0.0], [math.nan], [math.inf]):
        assert ops.kfac_trust_region(1e-3, inner, [0.0], [0.1], [0.0], [0.0]).nu == 1.0


def test_trust_region_names_mismatched_lengths():
    with pytest.raises(RuntimeError, match="lr must hold one entry per parameter"):
        ops.kfac_trust_region(1e-3, [1.0], [0.0], [], [0.0], [0.0])


# ---- faults -------------------------------------------------------------------------------------

def test_factor_faults_classify_each_pair_of_flags():
    flags = [v for pair in itertools.product((1.0, 0.0), repeat=2) for v in pair]  # every pair
    expected = [Fault.STATISTICS if not updated else Fault.FACTORS if not finite else Fault.NONE
                for updated, finite in zip(flags[0::2], flags[1::2])]
    assert ops.kfac_factor_faults(flags) == expected == [Fault.NONE, Fault.FACTORS, Fault.STATISTICS,
                                                         Fault.STATISTICS]


def test_direction_faults_classify_the_rows_at_their_offsets():
    rows = [1.0, 1.0, 0.3, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 5.0, 0.0, 0.0, 7.0]
    offsets = [0, 4, 7, 10]
    expected = [Fault.GRADIENTS if not rows[at] else Fault.DIRECTIONS if not rows[at + 1] else Fault.NONE
                for at in offsets]
    assert ops.kfac_direction_faults(rows, offsets) == expected == [Fault.NONE, Fault.GRADIENTS,
                                                                    Fault.DIRECTIONS, Fault.GRADIENTS]
    with pytest.raises(RuntimeError, match="offsets entry 12 is outside rows"):
        ops.kfac_direction_faults(rows, [12])


@pytest.mark.parametrize("fault,kind", [(Fault.GRADIENTS, "parameter"), (Fault.DIRECTIONS, "layer"),
                                        (Fault.STATISTICS, "layer"), (Fault.FACTORS, "layer")])
@pytest.mark.parametrize("where", ["fc", "blocks.0.attn", "it's"])
def test_fault_message_is_kfacs_warning(fault, kind, where):
    expected = _ref_message("natgrad.KFAC", fault, kind, where)
    assert ops.kfac_fault_message("natgrad.KFAC", fault, kind, where) == expected
    opt = KFAC(nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.estimator.ledger.fault(where, fault, kind)
        opt.estimator.ledger.fault(where, fault, kind)  # warned once, counted twice
    assert [str(w.message) for w in caught] == [expected]
    assert opt.nonfinite_skips == {where: 2}


def test_kfac_warns_about_non_finite_statistics_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    x[0, 0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    messages = [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]
    assert _ref_message("natgrad.KFAC", Fault.STATISTICS, "layer", "0") in messages


# ---- unsupported layers -------------------------------------------------------------------------

@pytest.mark.parametrize("groups,padding,mode", [
    (1, 0, "zeros"), (1, (1, 2), "zeros"), (2, 0, "zeros"), (1, "same", "zeros"), (1, "valid", "zeros"),
    (1, 1, "reflect"), (1, 1, "replicate"), (1, 1, "circular"), (2, "same", "reflect")])
def test_conv_unsupported_reason_equals_the_reference(groups, padding, mode):
    for conv in (nn.Conv2d(2, 4, 3, groups=groups, padding=padding, padding_mode=mode),
                 nn.Conv1d(2, 4, 3, groups=groups, padding=padding, padding_mode=mode)):
        expected = _ref_conv_reason(conv.groups, conv.padding, conv.padding_mode)
        assert ops.kfac_conv_unsupported_reason(conv.groups, conv.padding, conv.padding_mode) == expected
        assert unsupported_reason(conv) == expected


@pytest.mark.parametrize("sparse,max_norm", list(itertools.product((False, True), (None, 1.0))))
def test_embedding_unsupported_reason_equals_the_reference(sparse, max_norm):
    emb = nn.Embedding(5, 3, sparse=sparse, max_norm=max_norm)
    expected = _ref_embedding_reason(sparse, max_norm is not None)
    assert ops.kfac_embedding_unsupported_reason(emb.sparse, emb.max_norm is not None) == expected
    assert unsupported_reason(emb) == expected


# ---- opcheck ------------------------------------------------------------------------------------

# ---- hyperparameters -----------------------------------------------------------------------------

# The ranges the docs of natgrad.KFAC and natgrad::optim::KFACOptions state.
DOCUMENTED_RANGES = {"lr": "[0, inf)", "momentum": "[0, 1)", "weight_decay": "[0, inf)", "damping": "(0, inf)",
                     "factor_decay": "[0, 1)", "factor_update_period": "[1, inf) int",
                     "inverse_update_period": "[1, inf) int", "kl_clip": "(0, inf)",
                     "adaptive_period": "[1, inf) int", "nll_scale": "(0, inf)"}


def _as_range(b: ops.rules.OptionBound) -> str:
    high = "inf" if b.high is None else f"{b.high:g}"
    return (f"{'(' if b.low_open else '['}{b.low:g}, {high}{')' if b.high_open or b.high is None else ']'}"
            + (" int" if b.integer else ""))


def test_option_bounds_are_the_documented_ranges():
    bounds = ops.kfac_option_bounds()
    assert {name: _as_range(b) for name, b in bounds.items()} == DOCUMENTED_RANGES
    assert [name for name, b in bounds.items() if b.per_group] == ["lr", "momentum", "weight_decay", "damping"]
    assert ops.kfac_option_choices("inverse_method") == ("eigen", "inverse")
    assert ops.kfac_option_choices("loss_reduction") == ("mean", "sum", "token_mean")
    with pytest.raises(RuntimeError, match="no K-FAC choice option is named 'x'"):
        ops.kfac_option_choices("x")


@pytest.mark.parametrize("name", sorted(DOCUMENTED_RANGES))
def test_kfac_enforces_each_bound_at_its_edges(name):
    b = ops.kfac_option_bounds()[name]
    model = nn.Linear(3, 2)
    edges = [(int(b.low) if b.integer else b.low, not b.low_open)]
    if b.high is not None:
        edges.append((b.high, not b.high_open))
    for value, accepted in edges:
        if accepted:
            KFAC(model, **{name: value}).remove_hooks()
        else:
            with pytest.raises(ValueError, match=f"Invalid {name}"):
                KFAC(model, **{name: value})
        if b.per_group:  # a param group's own value obeys the same bound
            groups = [{"params": [model.weight]}, {"params": [model.bias], name: value}]
            if accepted:
                KFAC(model, groups).remove_hooks()
            else:
                with pytest.raises(ValueError, match=name):
                    KFAC(model, groups)


SAMPLES = {
    "kfac_statistics_ok": [(torch.randn(4, 3), torch.randn(4, 2), 4, 4, 2.0, torch.float32),
                           (torch.tensor([1, 2]), torch.randn(2, 3, dtype=torch.float64), 2, 2, 1.0, torch.float64)],
    "kfac_peak_bounded": [(torch.tensor(3.0, dtype=torch.float64), 10.0, torch.float16)],
    "kfac_statistics_limit": [(torch.bfloat16,)],
    "kfac_linear_rows": [([4, 5, 3], 3)],
    "kfac_conv_rows": [([2, 1, 8, 8], [3, 3], [2, 2], [1, 1], [1, 1])],
    "kfac_embedding_rows": [([2, 7],)],
    "kfac_sample_scale": [(4, 40, "token_mean"), (1, 40, "mean", 8)],
    "kfac_expand_grad_scale": [(2.0, 4, 24, 48)],
    "kfac_pi_correction": [("inverse", None), ("eigen", True)],
    "kfac_damping": [(1e-3, 0.5)],
    "kfac_adapt_damping": [(1.0, -0.5, -1.0, 0.95, 5)],
    "kfac_quadratic_step": [(4.0, 1.0, 2.0, -2.0, 1.0, True, 0.9), (4.0, 1.0, 2.0, -2.0, 1.0, False, 0.5)],
    "kfac_fsum": [([1e100, 1.0, -1e100],)],
    "kfac_trust_region": [(1e-3, [1.0, 2.0], [0.5, 0.0], [0.1, 0.1], [0.9, 0.0], [0.2, 0.0])],
    "kfac_direction_faults": [([1.0, 0.0, 2.0, 0.0, 1.0], [0, 3])],
    "kfac_factor_faults": [([1.0, 1.0, 0.0, 1.0],)],
    "kfac_fault_message": [("natgrad.KFAC", 1, "layer", "fc")],
    "kfac_conv_unsupported_reason": [(2, "(0, 0)", "zeros")],
    "kfac_embedding_unsupported_reason": [(True, False)],
    "kfac_option_names": [()],
    "kfac_option_bound": [("momentum",)],
    "kfac_option_choices": [("loss_reduction",)],
}


# opcheck's AOT test compares outputs it can hold as tensors or numbers, not strings.
STRING_RESULTS = {"kfac_fault_message", "kfac_conv_unsupported_reason", "kfac_embedding_unsupported_reason",
                  "kfac_option_names", "kfac_option_choices"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck_rule_ops(name):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name not in STRING_RESULTS:
        utils += ("test_aot_dispatch_dynamic",)
    for args in SAMPLES[name]:
        torch.library.opcheck(getattr(OPS, name).default, args, test_utils=utils)
