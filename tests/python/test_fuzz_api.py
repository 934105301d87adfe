"""Fuzz / property suite of natgrad's public Python APIs (the "Reliability" issue).

Every generated case is classified as either

* a **correct result**, checked against a simple float64 reference (a per-sample loop for the
  Fisher, the dense damped solve for a K-FAC or natural-gradient step, the EWC formula), or
* a **clear error**: ValueError / TypeError / RuntimeError / FloatingPointError whose message
  names what was wrong (the argument, or the property: dtype, shape, NaN...),

and after every fault the state is checked to be intact (parameters, factors, decompositions,
momentum buffers, EWC tasks: finite and bitwise equal to before). ``TALLY`` counts the cases per
API; ``test_zz_cases_per_api`` prints it (run with ``-s``). natgrad.ops is covered by
tests/python/ops/ (references, bad arguments, non-contiguous inputs, dtypes) and is not
repeated here.

Hypothesis runs derandomized with a fixed number of examples, so CI is deterministic.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import Counter, defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import natgrad
from natgrad import EWC, KFAC, EigenAdam, NaturalGradient
from natgrad.fisher import compute_fisher, score_rows

TALLY: dict[str, Counter] = defaultdict(Counter)
ERRORS = (ValueError, TypeError, RuntimeError, FloatingPointError)
D = torch.float64


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def outcome(api: str, fn, names: tuple[str, ...] = ()):
    """Runs ``fn``: a result is tallied "correct" (the caller then checks it against its reference);
    an error must be one of ERRORS naming one of ``names`` (any error fails when ``names`` is
    empty). Returns (result, error)."""
    try:
        result = fn()
    except ERRORS as err:
        msg = str(err)
        assert names and any(n.lower() in msg.lower() for n in names), \
            f"{api}: {type(err).__name__} does not name any of {names}: {msg!r}"
        TALLY[api]["clear error"] += 1
        return None, err
    TALLY[api]["correct result"] += 1
    return result, None


def mlp(width: int = 4, dtype=D, out: int = 2, inp: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, width), nn.Tanh(), nn.Linear(width, out)).to(dtype)


# ---- constructors: every argument x generated bad and borderline values -------------------------

VALUES = [None, "x", "", math.nan, math.inf, -math.inf, -1, -1.0, 0, 0.0, 1e-300, 0.5, 1, 1.0, 2, 2.5,
          1e30, True, False, [1], torch.tensor(0.5), torch.float16, torch.bfloat16, torch.int32,
          torch.complex64, (lambda k: 0.1), "eigen", "inverse", "mean", "sum", "expand", "reduce",
          "empirical", "mc", "exact", "dense", "lowrank", "full", "diagonal", "kfac", "block_diagonal",
          "categorical", "gaussian", "separate", "online"]


def number(low=None, high=None, low_open=False, high_open=False, integer=False, none=False, call=False):
    def ok(v):
        if v is None:
            return none
        if callable(v) and not isinstance(v, (torch.dtype, torch.Tensor)):
            return call
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
            return False
        if low is not None and (v < low or (low_open and v == low)):
            return False
        return high is None or (v < high if high_open else v <= high)
    return ok


def choice(*options):
    return lambda v: isinstance(v, str) and v in options


def flag(v):
    return isinstance(v, bool)


def float_dtype(v):
    return v is None or v in (torch.float32, torch.float64)


COMMON = {"lr": number(low=0.0), "momentum": number(0.0, 1.0, high_open=True), "weight_decay": number(low=0.0),
          "damping": number(0.0, low_open=True, call=True), "seed": number(integer=True),
          "kl_clip": number(0.0, low_open=True, none=True, call=True)}
SPECS = {
    "KFAC": {**COMMON, "factor_decay": number(0.0, 1.0, high_open=True),
             "factor_update_period": number(1, integer=True, call=True),
             "inverse_update_period": number(1, integer=True, call=True),
             "inverse_method": choice("eigen", "inverse"), "pi_correction": lambda v: v is None or flag(v),
             "warm_refreshes": number(0, integer=True), "adaptive_damping": flag,
             "damping_adaptation_interval": number(1, integer=True),
             "damping_adaptation_decay": number(0.0, 1.0, True, True),
             "fisher_type": choice("empirical", "mc"), "loss_reduction": choice("mean", "sum"),
             "linear_approx": choice("expand", "reduce"), "factor_dtype": float_dtype,
             "inverse_dtype": float_dtype, "grad_worker_fraction": number(0.0, 1.0, low_open=True),
             "triangle_packing": flag, "bucket_cap_mb": number(0.0, low_open=True),
             "max_factor_dim": number(1, integer=True, none=True),
             "skip_modules": lambda v: v in ("", (), ["0"], "0") or isinstance(v, str) and v in ("", "0", "2"),
             "grafting": lambda v: v is None or isinstance(v, str) and v in ("adam", "sgd")},
    "EigenAdam": {"lr": number(low=0.0), "eps": number(low=0.0), "weight_decay": number(low=0.0),
                  "betas": lambda v: isinstance(v, tuple) and v == (0.9, 0.99),
                  "basis": choice("kfac", "shampoo", "identity"), "basis_update_period": number(1, integer=True),
                  "warm_refreshes": number(0, integer=True, none=True),
                  "grafting": lambda v: v is None or isinstance(v, str) and v in ("adam", "sgd"),
                  "shampoo_beta": number(0.0, 1.0, high_open=True, none=True),
                  "factor_decay": number(0.0, 1.0, high_open=True), "factor_update_period": number(1, integer=True),
                  "linear_approx": choice("expand", "reduce"), "factor_dtype": float_dtype,
                  "max_factor_dim": number(1, integer=True, none=True),
                  "skip_modules": lambda v: v in ("", (), ["0"], "0") or isinstance(v, str) and v in ("", "0", "2")},
    "NaturalGradient": {**COMMON, "fisher_type": choice("empirical", "mc", "exact"),
                        "structure": choice("dense", "lowrank", "diagonal", "full"),
                        "likelihood": choice("categorical", "gaussian"),
                        "loss_fn": lambda v: v is None or callable(v) and not isinstance(v, (torch.dtype, torch.Tensor)),
                        "chunk_size": number(1, integer=True)},
    "EWC": {"lambda_": number(low=0.0), "mode": choice("separate", "online"), "gamma": number(0.0, 1.0),
            "fisher_type": choice("empirical", "mc", "exact"), "structure": choice("diagonal", "kfac"),
            "likelihood": choice("categorical", "gaussian"), "train_mode": flag,
            "mc_samples": number(1, integer=True)},
}
CLASSES = {"KFAC": KFAC, "EigenAdam": EigenAdam, "NaturalGradient": NaturalGradient, "EWC": EWC}
EXTRA_VALUES = {"skip_modules": ["0", ["0"], ["nope"], 5], "grafting": ["adam", "sgd", "Adam"],
                "basis": ["shampoo", "identity"], "betas": [(0.9, 0.99), (0.9, 1.0), (0.5,)]}
CASES = [(api, arg, v) for api, spec in SPECS.items() for arg in spec for v in VALUES + EXTRA_VALUES.get(arg, [])]


@fuzz(400)
@given(st.sampled_from(CASES))
def test_constructor_arguments(case):
    api, arg, value = case
    model = mlp()
    valid = SPECS[api][arg](value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        made, err = outcome(f"{api}(...) construction", lambda: CLASSES[api](model, **{arg: value}),
                            names=(arg.rstrip("_"),))
    assert (err is None) == valid, f"{api}({arg}={value!r}): valid={valid} but got {err!r}"


@fuzz(30)
@given(st.sampled_from(["KFAC", "NaturalGradient"]), st.sampled_from(["lr", "momentum", "weight_decay", "damping"]),
       st.sampled_from([-1.0, math.nan, True, "x", 1.5, 0.0, 0.5]), st.booleans())
def test_param_group_hyperparameters(api, key, value, later):
    """Per-group values (param-group dicts and add_param_group) are checked like the defaults."""
    model = mlp()
    spec = SPECS[api][key]
    if api == "NaturalGradient" and key == "damping":  # one damping for all groups (documented)
        return
    first, second = list(model[0].parameters()), list(model[2].parameters())

    def build():
        if later:
            opt = CLASSES[api](model, [{"params": first}])
            opt.add_param_group({"params": second, key: value})
            return opt
        return CLASSES[api](model, [{"params": first + second, key: value}])
    opt, err = outcome(f"{api}(...) construction", build, names=(key,))
    assert (err is None) == spec(value)


# ---- compute_fisher / score_rows against a per-sample float64 loop --------------------------------

def reference_passes(out, y, fisher_type, likelihood):
    """(target, weight) pairs of one sample whose weighted gradient outer products sum to its
    Fisher: the observed target, or every class / output element (exact)."""
    if fisher_type == "empirical":
        return [(y if likelihood == "categorical" else y.to(D), 1.0)]
    if likelihood == "categorical":
        p = torch.softmax(out, -1)[0].detach()
        return [(torch.tensor([c]), float(p[c])) for c in range(out.shape[1])]
    return [(out.detach() - torch.eye(out.shape[1], dtype=D)[k], 1.0) for k in range(out.shape[1])]


def reference_fisher(model, x, y, fisher_type, likelihood):
    """Dense Fisher by a per-sample loop in float64 (empirical and exact)."""
    model = copy.deepcopy(model).to(D)
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0
    for i in range(x.shape[0]):
        out = model(x[i:i + 1].to(D))
        passes = reference_passes(out, y[i:i + 1], fisher_type, likelihood)
        for target, weight in passes:
            if likelihood == "categorical":
                loss = F.cross_entropy(out, target, reduction="sum")
            else:
                loss = 0.5 * (out - target).pow(2).sum()
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)])
            total = total + weight * torch.outer(g, g)
    return total / x.shape[0]


def kfac_reference(model, x, y, fisher_type, likelihood):
    """Block-diagonal K-FAC of an MLP (Linear layers), by a per-sample loop in float64: per layer
    A = mean ã ãᵀ, G = mean Σ_passes w gᵀg, as a matrix over (weight row-major, bias)."""
    model = copy.deepcopy(model).to(D)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    acts, outs = {}, {}
    def record(module, args, output):
        acts[module], outs[module] = args[0], output
    hooks = [m.register_forward_hook(record) for m in layers]
    A = {m: 0 for m in layers}
    G = {m: 0 for m in layers}
    n = x.shape[0]
    for i in range(n):
        out = model(x[i:i + 1].to(D))
        passes = reference_passes(out, y[i:i + 1], fisher_type, likelihood)
        for m in layers:
            a = torch.cat([acts[m][0], torch.ones(1, dtype=D)])
            A[m] = A[m] + torch.outer(a, a) / n
        for target, weight in passes:
            loss = F.cross_entropy(out, target, reduction="sum") if likelihood == "categorical" \
                else 0.5 * (out - target).pow(2).sum()
            grads = torch.autograd.grad(loss, [outs[m] for m in layers], retain_graph=True)
            for m, g in zip(layers, grads):
                G[m] = G[m] + weight * torch.outer(g[0], g[0]) / n
    for h in hooks:
        h.remove()
    blocks = []
    for m in layers:
        d_out, d_in = m.weight.shape
        full = torch.kron(G[m], A[m])  # row-major vec of [W, b] (d_out x (d_in + 1))
        order = [o * (d_in + 1) + j for o in range(d_out) for j in range(d_in)] + [o * (d_in + 1) + d_in for o in range(d_out)]
        blocks.append(full[order][:, order])
    return torch.block_diag(*blocks)


def data(n, likelihood, dtype=D, strided=False, out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6 if strided else 3, dtype=dtype, generator=g)
    x = x[:, ::2] if strided else x
    y = torch.randint(0, out, (n,), generator=g) if likelihood == "categorical" else \
        torch.randn(n, out, dtype=dtype, generator=g)
    return x, y


@fuzz(80)
@given(st.sampled_from(["empirical", "mc", "exact"]),
       st.sampled_from(["dense", "lowrank", "diagonal", "block_diagonal", "kfac"]),
       st.sampled_from(["categorical", "gaussian"]), st.integers(1, 4), st.booleans(),
       st.sampled_from([1, 2, 256]), st.sampled_from([D, torch.float32]))
def test_compute_fisher_matches_reference(fisher_type, structure, likelihood, n, strided, chunk, dtype):
    model = mlp(dtype=dtype)
    x, y = data(n, likelihood, dtype, strided)
    kwargs = dict(fisher_type=fisher_type, likelihood=likelihood, chunk_size=chunk)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    fisher, _ = outcome("fisher.compute_fisher", lambda: compute_fisher(
        model, x, y, structure=structure, generator=gen(), **kwargs).to_dense())
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == D else dict(rtol=2e-4, atol=1e-6)
    assert torch.isfinite(fisher).all() and torch.allclose(fisher, fisher.T, **tol)
    if fisher_type == "mc":  # same generator: every structure equals its part of the dense Fisher
        dense = compute_fisher(model, x, y, structure="dense", generator=gen(), **kwargs).to_dense()
        rows, _ = outcome("fisher.score_rows", lambda: score_rows(model, x, y, generator=gen(), **kwargs))
        torch.testing.assert_close(rows.T @ rows / n, dense, **tol)
        if structure == "diagonal":
            torch.testing.assert_close(fisher, torch.diag(torch.diagonal(dense)), **tol)
        elif structure in ("dense", "lowrank"):
            torch.testing.assert_close(fisher, dense, **tol)
        assert torch.linalg.eigvalsh(fisher.to(D)).min() > -1e-6 * max(1.0, float(fisher.abs().max()))
        return
    ref = (kfac_reference if structure == "kfac" else reference_fisher)(model, x, y, fisher_type, likelihood)
    if structure == "diagonal":
        ref = torch.diag(torch.diagonal(ref))
    elif structure == "block_diagonal":
        sizes = [m.weight.numel() + m.bias.numel() for m in model if isinstance(m, nn.Linear)]
        ref = torch.block_diag(*[b for b in _blocks(ref, sizes)])
    torch.testing.assert_close(fisher.to(D), ref, **tol)
    if fisher_type == "empirical":
        rows, _ = outcome("fisher.score_rows", lambda: score_rows(model, x, y, **kwargs))
        torch.testing.assert_close((rows.T @ rows / n).to(D), reference_fisher(model, x, y, "empirical", likelihood), **tol)


def _blocks(m, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(m[start:start + s, start:start + s])
        start += s
    return out


def _bad_fisher_input(kind, likelihood):
    x, y = data(4, likelihood)
    if kind == "empty":
        return x[:0], y[:0], ("no samples",)
    if kind in ("nan", "inf"):
        x = x.clone(); x[1, 2] = math.nan if kind == "nan" else math.inf
        return x, y, ("inputs", "nan")
    if kind == "nan targets":
        return x, (y.double() if likelihood == "categorical" else y).clone().fill_(math.nan), ("targets",)
    if kind in ("half", "bfloat16", "int", "complex"):
        dt = {"half": torch.float16, "bfloat16": torch.bfloat16, "int": torch.int64, "complex": torch.complex128}[kind]
        return x.to(dt), y, ("dtype", "inputs")
    if kind == "meta":
        return x.to("meta"), y.to("meta"), ("meta",)
    if kind == "list":
        return x.tolist(), y, ("inputs",)
    if kind == "short targets":
        return x, y[:3], ("targets",)
    if kind == "float targets":  # categorical: class indices as floats; gaussian: [n] for outputs [n, 1]
        return x, (y.double() if likelihood == "categorical" else y[:, 0]), ("targets",)
    if kind == "out of range":
        return x, (y + 7 if likelihood == "categorical" else y[:, :1]), ("targets",)
    if kind == "negative class":
        return x, (y - 3 if likelihood == "categorical" else y.long()), ("targets",)
    if kind == "2-d categorical":
        return x, (y[:, None] if likelihood == "categorical" else y[:, :, None]), ("targets",)
    raise AssertionError(kind)


BAD_INPUTS = ["empty", "nan", "inf", "nan targets", "half", "bfloat16", "int", "complex", "meta", "list",
              "short targets", "float targets", "out of range", "negative class", "2-d categorical"]


@fuzz(100)
@given(st.sampled_from(BAD_INPUTS), st.sampled_from(["empirical", "mc", "exact"]),
       st.sampled_from(["dense", "lowrank", "diagonal", "block_diagonal", "kfac"]),
       st.sampled_from(["categorical", "gaussian"]), st.booleans())
def test_compute_fisher_bad_inputs_raise_clear_errors(kind, fisher_type, structure, likelihood, rows):
    x, y, names = _bad_fisher_input(kind, likelihood)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    if rows:
        call = lambda: score_rows(model, x, y, fisher_type=fisher_type, likelihood=likelihood)  # noqa: E731
    else:
        call = lambda: compute_fisher(model, x, y, fisher_type=fisher_type, structure=structure,  # noqa: E731
                                      likelihood=likelihood).to_dense()
    target_fault = kind in ("nan targets", "short targets", "float targets", "out of range", "negative class", "2-d categorical")
    result, err = outcome("fisher.score_rows" if rows else "fisher.compute_fisher", call, names=names)
    if err is None:  # targets are ignored by "mc"/"exact" (except their count): a finite Fisher
        assert target_fault and fisher_type != "empirical" and torch.isfinite(result).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@fuzz(25)
@given(st.sampled_from(["fisher_type", "structure", "likelihood", "mc_samples", "chunk_size", "params", "generator"]),
       st.sampled_from([None, "x", 0, -1, 1.5, math.nan, True, [], 5]), st.booleans())
def test_compute_fisher_arguments(arg, value, rows):
    model = mlp()
    x, y = data(3, "categorical")
    valid = {"fisher_type": choice("empirical", "mc", "exact"), "likelihood": choice("categorical", "gaussian"),
             "structure": choice("dense", "lowrank", "diagonal", "block_diagonal", "kfac"),
             "mc_samples": number(1, integer=True), "chunk_size": number(1, integer=True),
             "params": lambda v: v is None, "generator": lambda v: v is None}[arg](value)
    if rows and arg == "structure":
        return
    fn = score_rows if rows else compute_fisher
    kwargs = {"fisher_type": "mc", arg: value}
    if arg == "fisher_type" and value is None:
        kwargs = {arg: value}
    _, err = outcome("fisher.score_rows" if rows else "fisher.compute_fisher",
                     lambda: fn(model, x, y, **kwargs), names=(arg,))
    assert (err is None) == valid, (arg, value, err)


# ---- KFAC: steps on generated batches; faults leave the state intact ------------------------------

def kfac_snapshot(opt, model):
    return {"params": [p.detach().clone() for p in model.parameters()],
            "blocks": [{k: v.clone() for k, v in b.state.items()} for b in opt.estimator.blocks],
            "momentum": [opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p] else None
                         for p in model.parameters()]}


def assert_finite(snap):
    for t in snap["params"] + [v for b in snap["blocks"] for v in b.values()] + [m for m in snap["momentum"] if m is not None]:
        assert torch.isfinite(t).all()


def assert_equal_state(a, b, blocks=None):
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    for i, (x, y) in enumerate(zip(a["blocks"], b["blocks"])):
        if blocks is None or i in blocks:
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for x, y in zip(a["momentum"], b["momentum"]):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


BATCHES = ["normal", "one", "empty", "nan", "inf", "huge", "1e30", "strided", "nan loss", "freeze", "unfreeze"]


@fuzz(60)
@given(st.lists(st.sampled_from(BATCHES), min_size=2, max_size=5),
       st.sampled_from(["eigen", "inverse"]), st.booleans(), st.sampled_from(["mean", "sum"]),
       st.sampled_from([0.0, 0.9]), st.sampled_from([0.0, 1e-2]), st.sampled_from([None, 1e-3]),
       st.sampled_from([D, torch.float32]), st.sampled_from([None, torch.float32, torch.float64]))
def test_kfac_steps(batches, method, pi, reduction, momentum, wd, kl, dtype, factor_dtype):
    model = mlp(dtype=dtype)
    if factor_dtype is not None and dtype == D:
        factor_dtype = D
    opt = KFAC(model, lr=0.1, momentum=momentum, weight_decay=wd, kl_clip=kl, inverse_method=method,
               pi_correction=pi, loss_reduction=reduction, inverse_update_period=1, factor_dtype=factor_dtype)
    x0, y0 = data(6, "categorical", dtype)
    frozen = None
    for kind in ["normal"] + batches:
        x, y = x0, y0
        if kind == "one":
            x, y = x0[:1], y0[:1]
        elif kind == "empty":
            x, y = x0[:0], y0[:0]
        elif kind in ("nan", "inf"):
            x = x0.clone(); x[2, 1] = math.nan if kind == "nan" else math.inf
        elif kind == "huge":
            x = x0 * torch.finfo(dtype).max / 4  # the first layer's A would overflow: skipped
        elif kind == "1e30":
            x = x0 * 1e30
        elif kind == "strided":
            x = torch.stack([x0, x0], -1)[..., 0]
        elif kind == "freeze":
            frozen = model[0].weight
            frozen.requires_grad_(False)
        elif kind == "unfreeze" and frozen is not None:
            frozen.requires_grad_(True)
            frozen = None
        before = kfac_snapshot(opt, model)
        skips = dict(opt.nonfinite_skips)
        fixed = frozen.detach().clone() if frozen is not None else None

        def step():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction=reduction)
            if kind == "nan loss":
                loss = loss * math.nan
            loss.backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        outcome("KFAC.step", step)
        after = kfac_snapshot(opt, model)
        assert_finite(after)
        new_skips = {k for k, v in opt.nonfinite_skips.items() if v != skips.get(k, 0)}
        if kind in ("nan", "nan loss"):  # every layer sees the fault: nothing changes
            assert new_skips and "0" in new_skips
            assert_equal_state(before, after)
        elif kind == "inf":  # tanh(inf) is finite: only the first layer sees the fault
            assert "0" in new_skips
            assert_equal_state({**before, "params": before["params"][:2], "momentum": before["momentum"][:2]},
                               {**after, "params": after["params"][:2], "momentum": after["momentum"][:2]}, blocks={0})
        elif kind == "huge":  # only the first layer overflows; it keeps its factors
            assert "0" in new_skips
            assert_equal_state({**before, "params": [], "momentum": []}, {**after, "params": [], "momentum": []}, blocks={0})
        elif kind == "empty":
            assert_equal_state({**before, "params": [], "momentum": []}, {**after, "params": [], "momentum": []})
        elif kind not in ("1e30",):
            assert not new_skips
            assert any(not torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
        if fixed is not None:
            assert torch.equal(fixed, frozen)


@fuzz(12)
@given(st.sampled_from(["eigen", "inverse"]), st.booleans(), st.integers(1, 5), st.booleans(),
       st.sampled_from([1e-3, 0.5]))
def test_kfac_first_step_equals_dense_damped_solve(method, bias, n, strided, damping):
    """One step, no momentum / trust region: Δθ = −η (A⊗G + γI)⁻¹ ∇L per layer (float64), with A
    and G equal to the per-sample reference (empirical Fisher, mean loss)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias)).double()
    opt = KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=damping, inverse_method=method)
    x, y = data(n, "categorical", D, strided)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref = kfac_reference(model if bias else _with_zero_bias(model), x, y, "empirical", "categorical")
    outcome("KFAC.step", opt.step)
    offset, i = 0, 0
    for layer, block in zip([m for m in model if isinstance(m, nn.Linear)], opt.estimator.blocks):
        d_in, d_out = layer.weight.shape[1], layer.weight.shape[0]
        size = d_out * (d_in + 1)
        A, G = block.state["A"], block.state["G"]
        R = ref[offset:offset + size, offset:offset + size]
        offset += size
        if not bias:  # drop the bias rows of the reference
            R = R[:d_out * d_in, :d_out * d_in]
            A = torch.nn.functional.pad(A, (0, 1, 0, 1))
        g = torch.cat([t.reshape(-1) for t in grads[i:i + (2 if bias else 1)]])
        torch.testing.assert_close(R, _kron_in_param_order(G, A, d_out, d_in, bias)[:R.shape[0], :R.shape[0]],
                                   rtol=1e-9, atol=1e-12)
        if method == "eigen":
            expected = torch.linalg.solve(R + damping * torch.eye(R.shape[0], dtype=D), g)
        else:  # inverse form, π-corrected by default: (A + π√γ I)⁻¹ ⊗ (G + √γ/π I)⁻¹ (Martens & Grosse)
            a_mean, g_mean = float(torch.diagonal(block.state["A"]).mean()), float(torch.diagonal(G).mean())
            pi = math.sqrt(a_mean / g_mean) if a_mean > 0 and g_mean > 0 else 1.0
            Ad = block.state["A"] + pi * math.sqrt(damping) * torch.eye(block.state["A"].shape[0], dtype=D)
            Gd = G + math.sqrt(damping) / pi * torch.eye(d_out, dtype=D)
            expected = torch.linalg.solve(_kron_in_param_order(Gd, Ad, d_out, d_in, bias), g)
        step = torch.cat([(b - p.detach()).reshape(-1) for b, p in
                          zip(before[i:i + (2 if bias else 1)], list(model.parameters())[i:i + (2 if bias else 1)])])
        torch.testing.assert_close(step, 0.5 * expected, rtol=1e-7, atol=1e-10)
        i += 2 if bias else 1


def _with_zero_bias(model):
    m = copy.deepcopy(model)
    out = []
    for layer in m:
        if isinstance(layer, nn.Linear):
            new = nn.Linear(layer.in_features, layer.out_features).double()
            with torch.no_grad():
                new.weight.copy_(layer.weight)
                new.bias.zero_()
            out.append(new)
        else:
            out.append(layer)
    return nn.Sequential(*out)


def _kron_in_param_order(G, A, d_out, d_in, bias):
    cols = A.shape[0]
    full = torch.kron(G, A)
    order = [o * cols + j for o in range(d_out) for j in range(d_in)]
    if bias:
        order += [o * cols + d_in for o in range(d_out)]
    return full[order][:, order]


@fuzz(25)
@given(st.sampled_from(["categorical", "gaussian", "poisson"]),
       st.sampled_from(["normal", "nan", "empty", "0-d", "list", "one"]))
def test_kfac_sample_fisher(likelihood, kind):
    model = mlp()
    opt = KFAC(model, fisher_type="mc", inverse_update_period=1, lr=0.1)
    x, y = data(5, "categorical")
    for _ in range(2):
        opt.zero_grad(); out = model(x); opt.sample_fisher(out); F.cross_entropy(out, y).backward(); opt.step()
    before = kfac_snapshot(opt, model)
    skips = dict(opt.nonfinite_skips)
    xx, yy = {"empty": (x[:0], y[:0]), "one": (x[:1], y[:1])}.get(kind, (x, y))
    if kind == "nan":
        xx = x.clone(); xx[0, 0] = math.nan
    opt.zero_grad()
    out = model(xx)
    arg = {"0-d": out.sum(), "list": [1.0]}.get(kind, out)
    _, err = outcome("KFAC.sample_fisher", lambda: opt.sample_fisher(arg, likelihood), names=("likelihood", "output"))
    if err is not None:
        assert likelihood == "poisson" or kind in ("0-d", "list")
        return
    F.cross_entropy(out, yy).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome("KFAC.step", opt.step)
    after = kfac_snapshot(opt, model)
    assert_finite(after)
    if kind == "nan":
        assert opt.nonfinite_skips != skips
        assert_equal_state(before, after)


@fuzz(25)
@given(st.sampled_from(["roundtrip", "wider", "narrower", "nan factor", "int factor", "momentum shape",
                        "no kfac", "not a dict", "foreign layer", "kfac not a dict"]),
       st.sampled_from(["eigen", "inverse"]))
def test_kfac_checkpoints(kind, method):
    x, y = data(6, "categorical")

    def trained(width):
        model = mlp(width)
        opt = KFAC(model, inverse_update_period=1, inverse_method=method)
        for _ in range(2):
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        return model, opt
    model, opt = trained(4)
    saved = copy.deepcopy(opt.state_dict())
    other_model, other = trained({"wider": 5, "narrower": 3}.get(kind, 4))
    if kind == "nan factor":
        saved["kfac"]["blocks"]["0"]["A"] = saved["kfac"]["blocks"]["0"]["A"] * math.nan
    elif kind == "int factor":
        saved["kfac"]["blocks"]["0"]["G"] = saved["kfac"]["blocks"]["0"]["G"].long()
    elif kind == "momentum shape":
        saved["state"][0]["momentum_buffer"] = torch.zeros(7, dtype=D)
    elif kind == "no kfac":
        saved.pop("kfac")
    elif kind == "not a dict":
        saved = [saved]
    elif kind == "foreign layer":
        saved["kfac"]["blocks"]["9"] = saved["kfac"]["blocks"]["0"]
    elif kind == "kfac not a dict":
        saved["kfac"] = 5
    before = kfac_snapshot(other, other_model)
    names = {"wider": ("'0'", "shape"), "narrower": ("'0'", "shape"), "nan factor": ("'0'", "finite"),
             "int factor": ("'0'", "dtype"), "momentum shape": ("momentum_buffer", "0.weight"),
             "no kfac": ("kfac",), "not a dict": ("state_dict",), "foreign layer": ("'9'",), "kfac not a dict": ("kfac",)}
    _, err = outcome("KFAC.load_state_dict", lambda: other.load_state_dict(saved), names=names.get(kind, ()))
    if err is not None:
        assert_equal_state(before, kfac_snapshot(other, other_model))
        assert other.state_dict()["kfac"]["steps"] == 2
        return
    reloaded = kfac_snapshot(other, other_model)
    ref = kfac_snapshot(opt, model)
    assert_equal_state({**ref, "params": []}, {**reloaded, "params": []})
    TALLY["KFAC.state_dict"]["correct result"] += 1


@fuzz(10)
@given(st.sampled_from(["plain", "frozen", "skip", "layernorm", "unused"]))
def test_kfac_describe_lists_every_parameter(kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.Linear(2, 2)).double()
    if kind == "frozen":
        model[0].weight.requires_grad_(False)
    opt = KFAC(model, skip_modules=["2"] if kind == "skip" else ())
    if kind != "unused":
        opt.zero_grad(); F.cross_entropy(model(torch.randn(4, 3, dtype=D)), torch.tensor([0, 1, 1, 0])).backward(); opt.step()
    text, _ = outcome("KFAC.describe", opt.describe)
    for name, _ in model.named_parameters():
        assert name in text
    if kind == "frozen":
        assert "frozen" in text.splitlines()[1]
    if kind == "skip":
        assert "skip_modules" in text


@fuzz(12)
@given(st.sampled_from(["damping", "kl_clip", "inverse_update_period", "factor_update_period"]),
       st.sampled_from([math.nan, -1.0, 0, 1.5, "x", None]))
def test_kfac_schedule_returning_bad_value_leaves_state_intact(name, bad):
    good = {"damping": 1e-3, "kl_clip": 1e-3, "inverse_update_period": 1, "factor_update_period": 1}[name]
    model = mlp()
    opt = KFAC(model, **{name: lambda k: bad if k >= 2 else good})
    x, y = data(6, "categorical")
    for _ in range(2):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    before = kfac_snapshot(opt, model)

    def step():
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    _, err = outcome("KFAC.step", step, names=(name,))
    spec = {"damping": number(0.0, low_open=True), "kl_clip": number(0.0, low_open=True, none=True),
            "inverse_update_period": number(1, integer=True), "factor_update_period": number(1, integer=True)}
    valid = spec[name](bad)
    assert (err is None) == valid
    if err is not None:
        assert_equal_state(before, kfac_snapshot(opt, model))


# ---- NaturalGradient --------------------------------------------------------------------------------

@fuzz(50)
@given(st.sampled_from(["empirical", "mc", "exact"]), st.sampled_from(["dense", "lowrank", "diagonal"]),
       st.sampled_from(["categorical", "gaussian"]), st.integers(1, 4), st.booleans(),
       st.sampled_from([1e-3, 1.0]), st.sampled_from([0.0, 0.1]))
def test_natural_gradient_step_matches_reference(fisher_type, structure, likelihood, n, strided, damping, wd):
    model = mlp()
    x, y = data(n, likelihood, D, strided)
    opt = NaturalGradient(model, lr=0.5, damping=damping, weight_decay=wd, fisher_type=fisher_type,
                          structure=structure, likelihood=likelihood, seed=3)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    loss, _ = outcome("NaturalGradient.backward", lambda: opt.backward(x, y))
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if fisher_type == "mc":
        fisher = compute_fisher(model, x, y, fisher_type="mc", likelihood=likelihood,
                                generator=torch.Generator().manual_seed(3)).to_dense()
    else:
        fisher = reference_fisher(model, x, y, fisher_type, likelihood)
    if structure == "diagonal":
        fisher = torch.diag(torch.diagonal(fisher))
    outcome("NaturalGradient.step", opt.step)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(grad), dtype=D), grad + wd * before)
    torch.testing.assert_close(before - after, 0.5 * expected, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(loss)


NGD_FAULTS = ["empty", "nan", "inf", "half", "int", "meta", "short targets", "float targets", "out of range",
              "2-d categorical", "list"]


@fuzz(30)
@given(st.sampled_from(NGD_FAULTS), st.sampled_from(["empirical", "mc", "exact"]),
       st.sampled_from(["categorical", "gaussian"]), st.booleans())
def test_natural_gradient_bad_batches_leave_state_intact(kind, fisher_type, likelihood, momentum):
    model = mlp()
    opt = NaturalGradient(model, lr=0.1, momentum=0.9 if momentum else 0.0, fisher_type=fisher_type,
                          likelihood=likelihood)
    x0, y0 = data(4, likelihood)
    for _ in range(2):
        opt.zero_grad(); opt.backward(x0, y0); opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    bufs = [b.clone() if b is not None else None for b in bufs]
    opt.zero_grad(set_to_none=False)
    grads = [p.grad.clone() for p in model.parameters()]
    x, y, names = _bad_fisher_input(kind, likelihood)
    _, err = outcome("NaturalGradient.backward", lambda: opt.backward(x, y), names=names)
    assert err is not None, kind
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    # the step then refuses (no per-sample rows), leaving everything as it was
    _, err = outcome("NaturalGradient.step", opt.step, names=("backward",))
    for b, p in zip(bufs, model.parameters()):
        assert b is None or torch.equal(b, opt.state[p]["momentum_buffer"])
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))


def test_natural_gradient_frozen_parameter_mid_training():
    model = mlp()
    opt = NaturalGradient(model, lr=0.1, momentum=0.9)
    x, y = data(4, "categorical")
    opt.zero_grad(); opt.backward(x, y); opt.step()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    others = [p.detach().clone() for p in list(model.parameters())[1:]]

    def step():
        opt.zero_grad(); opt.backward(x, y); opt.step()
    _, err = outcome("NaturalGradient.step", step, names=("requires grad", "0.weight", "params"))
    if err is None:
        assert torch.equal(frozen, model[0].weight), "a frozen parameter moved"
        assert any(not torch.equal(a, b) for a, b in zip(others, list(model.parameters())[1:]))
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- EWC ---------------------------------------------------------------------------------------------

@fuzz(50)
@given(st.sampled_from(["empirical", "mc", "exact"]), st.sampled_from(["diagonal", "kfac"]),
       st.sampled_from(["categorical", "gaussian"]), st.sampled_from(["separate", "online"]),
       st.integers(1, 4), st.booleans(), st.sampled_from([0.0, 0.5, 2.0]))
def test_ewc_penalty_matches_reference(fisher_type, structure, likelihood, mode, n, strided, lam):
    model = mlp()
    ewc = EWC(model, lam, fisher_type=fisher_type, structure=structure, likelihood=likelihood, mode=mode, gamma=0.5)
    x, y = data(n, likelihood, D, strided)
    outcome("EWC.consolidate", lambda: ewc.consolidate(x, y, generator=torch.Generator().manual_seed(5)))
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    delta = torch.cat([(p.detach() - a).reshape(-1) for p, a in zip(model.parameters(), anchor)])
    penalty, _ = outcome("EWC.penalty", ewc.penalty)
    if fisher_type == "mc":
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for p, a in zip(ref_model.parameters(), anchor):
                p.copy_(a)
        fisher = compute_fisher(ref_model, x, y, fisher_type="mc", likelihood=likelihood,
                                structure="kfac" if structure == "kfac" else "diagonal",
                                generator=torch.Generator().manual_seed(5)).to_dense()
    else:
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for p, a in zip(ref_model.parameters(), anchor):
                p.copy_(a)
        fisher = (kfac_reference if structure == "kfac" else reference_fisher)(ref_model, x, y, fisher_type, likelihood)
        if structure == "diagonal":
            fisher = torch.diag(torch.diagonal(fisher))
    expected = 0.5 * lam * delta @ fisher @ delta
    torch.testing.assert_close(penalty, expected, rtol=1e-6, atol=1e-10)
    state, _ = outcome("EWC.state_dict", ewc.state_dict)
    other = EWC(model)
    other.load_state_dict(copy.deepcopy(state))
    torch.testing.assert_close(other.penalty(), penalty)


@fuzz(30)
@given(st.sampled_from(BAD_INPUTS + ["no data", "nan weights"]), st.sampled_from(["empirical", "mc", "exact"]),
       st.sampled_from(["diagonal", "kfac"]), st.sampled_from(["categorical", "gaussian"]))
def test_ewc_bad_consolidation_leaves_tasks_intact(kind, fisher_type, structure, likelihood):
    model = mlp()
    ewc = EWC(model, 1.0, fisher_type=fisher_type, structure=structure, likelihood=likelihood)
    x0, y0 = data(4, likelihood)
    ewc.consolidate(x0, y0)
    before = copy.deepcopy(ewc.state_dict())
    penalty_before = ewc.penalty()
    if kind == "no data":
        args, names = ([],), ("no samples",)
    elif kind == "nan weights":
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan
        args, names = (x0, y0), ("not finite", "nan")
    else:
        x, y, names = _bad_fisher_input(kind, likelihood)
        args = (x, y)
    # "mc" / "exact" never read the targets (not even their count)
    target_fault = kind in ("nan targets", "float targets", "out of range", "negative class", "2-d categorical",
                            "short targets")
    if kind == "list":
        names = ("data",)
    _, err = outcome("EWC.consolidate", lambda: ewc.consolidate(*args), names=names)
    if err is None:
        assert target_fault and fisher_type != "empirical"
        assert len(ewc.tasks) == 2
        return
    assert len(ewc.tasks) == 1
    now = ewc.state_dict()
    for a, b in zip(before["tasks"][0]["diag"].values(), now["tasks"][0]["diag"].values()):
        assert torch.equal(a, b)
    if kind != "nan weights":
        torch.testing.assert_close(ewc.penalty(), penalty_before)


@fuzz(10)
@given(st.sampled_from(["wider", "removed", "garbage", "new head"]), st.sampled_from(["diagonal", "kfac"]))
def test_ewc_shape_changed_models(kind, structure):
    model = mlp(4)
    ewc = EWC(model, structure=structure)
    x, y = data(4, "categorical")
    ewc.consolidate(x, y)
    state = ewc.state_dict()
    if kind == "wider":
        other = EWC(mlp(5), structure=structure)
        ok, err = outcome("EWC.load_state_dict", lambda: (other.load_state_dict(copy.deepcopy(state)), other.penalty()),
                          names=("shape", "0."))
        assert err is not None
    elif kind == "removed":
        del model[2]
        _, err = outcome("EWC.penalty", ewc.penalty, names=("no longer exist", "2.weight"))
        assert err is not None
    elif kind == "garbage":
        _, err = outcome("EWC.load_state_dict", lambda: ewc.load_state_dict({"x": 1}), names=("state_dict",))
        assert err is not None and len(ewc.tasks) == 1
    else:
        model.add_module("3", nn.Linear(2, 2).double())
        value, _ = outcome("EWC.penalty", ewc.penalty)
        assert value == 0


# ---- the counter ---------------------------------------------------------------------------------------

def test_zz_cases_per_api():
    """Prints the cases per API (run with -s). Runs last in this file."""
    if not TALLY:
        pytest.skip("run with the rest of the file")
    width = max(map(len, TALLY))
    lines = [f"{'API':<{width}}  cases  correct  clear-error"]
    for api in sorted(TALLY):
        c = TALLY[api]
        lines.append(f"{api:<{width}}  {sum(c.values()):5d}  {c['correct result']:7d}  {c['clear error']:11d}")
    total = sum(sum(c.values()) for c in TALLY.values())
    lines.append(f"{'total':<{width}}  {total:5d}")
    print("\nfuzz cases per API\n" + "\n".join(lines))
