"""natgrad.ops.factors against plain-PyTorch references, opcheck, gradcheck and the exact
Fisher of one Linear layer on one sample."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natgrad import ops
from natgrad.ops.factors import factor_layout

OPS = torch.ops.natgrad


def ref_act_factor(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    rows = rows.reshape(-1, rows.shape[-1]).double()
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows.T @ rows / rows.shape[0]


def ref_conv_patches(x, kernel, stride, padding, dilation) -> torch.Tensor:
    cols = F.unfold(x.double(), kernel, dilation, padding, stride)  # [N, D, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.mark.parametrize("shape", [(1, 5), (7, 5), (3, 4, 6), (2, 3, 2, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_act_factor_matches_reference(shape, bias, dtype):
    x = torch.randn(shape, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear_act_factor(x, bias).double(), ref_act_factor(x, bias), **tol)


def test_linear_factors_accept_non_contiguous_inputs():
    base = torch.randn(6, 9, dtype=torch.float64)
    x = base.T[:, ::2]  # [9, 3], non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.linear_act_factor(x), ref_act_factor(x.contiguous(), True))
    torch.testing.assert_close(ops.linear_grad_factor(x, 2.0), 4.0 * ref_act_factor(x.contiguous(), False))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_factor_ema_updates_in_place(bias):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    old = ops.linear_act_factor(torch.randn(8, 5, dtype=torch.float64), bias)
    factor = old.clone()
    ptr = factor.data_ptr()
    out = ops.linear_act_factor_ema_(factor, x, bias, decay=0.9)
    assert out is factor and factor.data_ptr() == ptr
    torch.testing.assert_close(factor, 0.9 * old + 0.1 * ref_act_factor(x, bias))


def test_ema_converts_bfloat16_input_into_float32_factor():
    x = torch.randn(16, 8).bfloat16()
    factor = torch.zeros(9, 9)
    ops.linear_act_factor_ema_(factor, x, True, 0.0)
    torch.testing.assert_close(factor.double(), ref_act_factor(x.float(), True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 32.0])
def test_linear_grad_factor_and_ema_match_reference(scale):
    g = torch.randn(5, 4, 7, dtype=torch.float64)
    expected = scale**2 * ref_act_factor(g, False)
    torch.testing.assert_close(ops.linear_grad_factor(g, scale), expected)
    factor = torch.eye(7, dtype=torch.float64)
    ops.linear_grad_factor_ema_(factor, g, scale, 0.25)
    torch.testing.assert_close(factor, 0.25 * torch.eye(7, dtype=torch.float64) + 0.75 * expected)


CONV_CASES = [
    # (N, C, H, W, kernel, stride, padding, dilation)
    (1, 3, 5, 5, (3, 3), (1, 1), (0, 0), (1, 1)),
    (4, 2, 7, 6, (3, 2), (2, 1), (1, 2), (1, 1)),
    (3, 2, 9, 9, (3, 3), (1, 2), (2, 1), (2, 2)),
    (64, 1, 6, 6, (2, 2), (1, 1), (0, 0), (1, 1)),  # D=4, L=25: chunks of one sample
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_act_factor_matches_unfold_reference(case, bias):
    n, c, h, w, k, s, p, d = case
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    expected = ref_act_factor(ref_conv_patches(x, k, s, p, d), bias)
    torch.testing.assert_close(ops.conv2d_act_factor(x, k, s, p, d, bias), expected)
    factor = torch.eye(expected.shape[0], dtype=torch.float64)
    ops.conv2d_act_factor_ema_(factor, x, k, s, p, d, bias, decay=0.5)
    torch.testing.assert_close(factor, 0.5 * torch.eye(expected.shape[0], dtype=torch.float64) + 0.5 * expected)


def test_conv2d_act_factor_float32_channels_last():
    x = torch.randn(5, 3, 8, 8).to(memory_format=torch.channels_last)
    expected = ref_act_factor(ref_conv_patches(x, 3, 1, 1, 1), True)
    torch.testing.assert_close(ops.conv2d_act_factor(x, 3, padding=1).double(), expected, rtol=1e-5, atol=1e-5)


def test_conv2d_grad_factor_matches_reference():
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    rows = g.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = 9.0 * rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(ops.conv2d_grad_factor(g, 3.0), expected)
    factor = torch.zeros(4, 4, dtype=torch.float64)
    ops.conv2d_grad_factor_ema_(factor, g, 3.0, 0.0)
    torch.testing.assert_close(factor, expected)


def test_one_sample_kronecker_factors_equal_the_exact_fisher():
    """For one Linear layer and one sample, A ⊗ G is exactly the outer product of the
    flattened per-sample gradient (K-FAC is exact there)."""
    layer = torch.nn.Linear(4, 3).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out, torch.tensor([2])).backward()
    flat = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).reshape(-1)
    a_factor = ops.linear_act_factor(x, bias=True)
    g_factor = ops.linear_grad_factor(out.grad, grad_scale=1.0)
    # Row-major vec of g ãᵀ is g ⊗ ã, so the Fisher is G ⊗ A in this ordering.
    torch.testing.assert_close(torch.kron(g_factor, a_factor), torch.outer(flat, flat), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("linear_act_factor", lambda: (torch.ones(3, 2, dtype=torch.long), True), "input must have a floating-point dtype"),
        ("linear_act_factor", lambda: (torch.ones(0, 2), True), "input holds no samples"),
        ("linear_grad_factor", lambda: (torch.ones(3, 2), 0.0), "grad_scale must be a finite number > 0"),
        ("linear_grad_factor", lambda: (torch.ones(3, 2), float("nan")), "grad_scale must be a finite number > 0"),
        ("conv2d_act_factor", lambda: (torch.ones(2, 3, 4), [3, 3], [1, 1], [0, 0], [1, 1], True), "input must be 4-D"),
        ("conv2d_act_factor", lambda: (torch.ones(1, 1, 2, 2), [3, 3], [1, 1], [0, 0], [1, 1], True), "too small for kernel_size"),
        ("conv2d_act_factor", lambda: (torch.ones(1, 1, 4, 4), [3, 3], [0, 1], [0, 0], [1, 1], True), "stride must be >= 1"),
        ("conv2d_act_factor", lambda: (torch.ones(1, 1, 4, 4), [3, 3], [1, 1], [-1, 0], [1, 1], True), "padding must be >= 0"),
        ("conv2d_grad_factor", lambda: (torch.ones(2, 3), 1.0), "grad_output must be 4-D"),
        ("linear_act_factor_ema_", lambda: (torch.zeros(3, 3), torch.ones(4, 2), False, 0.5), "factor must have shape [2, 2]"),
        ("linear_act_factor_ema_", lambda: (torch.zeros(3, 3), torch.ones(4, 2), True, 1.5), "decay must be in [0, 1]"),
        ("linear_act_factor_ema_", lambda: (torch.zeros(3, 3), torch.ones(4, 2), True, -0.1), "decay must be in [0, 1]"),
        ("linear_grad_factor_ema_", lambda: (torch.zeros(2, 2, dtype=torch.long), torch.ones(4, 2), 1.0, 0.5), "factor must have a floating-point dtype"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(name, args, message):
    with pytest.raises(RuntimeError) as info:
        getattr(OPS, name)(*args())
    assert message in str(info.value)


def _opcheck_samples():
    x = torch.randn(6, 5, dtype=torch.float64)
    x3 = torch.randn(2, 3, 5, dtype=torch.float64)
    img = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    g_img = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    return [
        ("linear_act_factor", (x, True)),
        ("linear_act_factor", (x3, False)),
        ("linear_grad_factor", (x3, 3.0)),
        ("conv2d_act_factor", (img, [3, 3], [1, 1], [0, 0], [1, 1], True)),
        ("conv2d_act_factor", (img, [2, 2], [2, 2], [1, 1], [1, 1], False)),
        ("conv2d_grad_factor", (g_img, 2.0)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_factor_ops(sample, requires_grad):
    name, args = _opcheck_samples()[sample]
    args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_opcheck_ema_ops():
    f = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    x = torch.randn(6, 5, dtype=torch.float64)
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.library.opcheck(OPS.linear_act_factor_ema_.default, (f(6), x, True, 0.9))
    torch.library.opcheck(OPS.linear_grad_factor_ema_.default, (f(5), x, 2.0, 0.9))
    torch.library.opcheck(OPS.conv2d_act_factor_ema_.default, (f(19), img, [3, 3], [1, 1], [1, 1], [1, 1], True, 0.5))
    torch.library.opcheck(OPS.conv2d_grad_factor_ema_.default, (f(2), img, 1.0, 0.5))


def test_gradcheck_factor_ops():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.linear_act_factor(t, True), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.linear_grad_factor(t, 2.0), (x,))
    img = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.conv2d_act_factor(t, (2, 3), (1, 2), (1, 0), (2, 1), True), (img,))
    assert torch.autograd.gradcheck(lambda t: ops.conv2d_grad_factor(t, 1.5), (img,))


def _nan_factor(d: int) -> torch.Tensor:
    return torch.full((d, d), float("nan"), dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_decay_zero_replaces_a_nan_factor_entirely(bias):
    """decay=0 means factor <- new: no 0 * NaN may survive, bias row and column included."""
    x = torch.randn(6, 3, dtype=torch.float64)
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    g_img = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cases = [
        (ops.linear_act_factor_ema_, (x, bias), ops.linear_act_factor(x, bias)),
        (ops.linear_grad_factor_ema_, (x, 2.0), ops.linear_grad_factor(x, 2.0)),
        (ops.conv2d_act_factor_ema_, (img, 3, 1, 1, 1, bias), ops.conv2d_act_factor(img, 3, 1, 1, 1, bias)),
        (ops.conv2d_grad_factor_ema_, (g_img, 1.5), ops.conv2d_grad_factor(g_img, 1.5)),
    ]
    for ema, args, expected in cases:
        factor = _nan_factor(expected.shape[0])
        ema(factor, *args, decay=0.0)
        torch.testing.assert_close(factor, expected, msg=lambda m: f"{ema.__name__}: {m}")


def test_linear_input_with_zero_features_gives_the_bias_entry():
    x = torch.randn(5, 0, dtype=torch.float64)
    torch.testing.assert_close(ops.linear_act_factor(x, True), torch.ones(1, 1, dtype=torch.float64))
    assert ops.linear_act_factor(x, False).shape == (0, 0)
    assert ops.linear_act_factor(torch.randn(2, 3, 0), False).shape == (0, 0)
    factor = torch.full((1, 1), float("nan"), dtype=torch.float64)
    ops.linear_act_factor_ema_(factor, x, True, 0.0)
    torch.testing.assert_close(factor, torch.ones(1, 1, dtype=torch.float64))
    assert ops.linear_grad_factor(torch.randn(4, 0), 1.0).shape == (0, 0)
    meta = ops.linear_act_factor(torch.randn(5, 0, device="meta"), True)
    assert meta.shape == (1, 1)


# ---- kfac_factors_ema_: every layer's EMAs of a K-FAC factor step in one call -------------------


def _factor_step_layers(dtype=torch.float64):
    """A Linear layer with bias (3-D input), one without, and a strided Conv2d layer."""
    torch.manual_seed(5)
    x1, g1 = torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 2, dtype=dtype)
    x2, g2 = torch.randn(7, 4, dtype=dtype), torch.randn(7, 3, dtype=dtype)
    img, g_img = torch.randn(3, 2, 6, 6, dtype=dtype), torch.randn(3, 4, 3, 3, dtype=dtype)
    psd = lambda d: (lambda m: m @ m.T / d)(torch.randn(d, d, dtype=dtype))  # noqa: E731
    return [
        dict(a=psd(6), g=psd(2), x=x1, dy=g1, layout=factor_layout(True), scale=2.0),
        dict(a=psd(4), g=psd(3), x=x2, dy=g2, layout=factor_layout(False), scale=1.0),
        dict(a=psd(19), g=psd(4), x=img, dy=g_img, layout=factor_layout(True, 3, 2, 1, 1), scale=3.0),
    ]


def _run_factor_step(ls, decays):
    return ops.kfac_factors_ema_([l["a"] for l in ls], [l["g"] for l in ls], [l["x"] for l in ls],
                                 [l["dy"] for l in ls], [v for l in ls for v in l["layout"]],
                                 [l["scale"] for l in ls], decays)


def test_factor_step_equals_the_per_layer_ema_ops():
    ls = _factor_step_layers()
    expected = []
    for l, decay in zip(ls, (0.9, 0.5, 0.0)):
        a, g = l["a"].clone(), l["g"].clone()
        if l["layout"][1]:
            ops.conv2d_act_factor_ema_(a, l["x"], 3, 2, 1, 1, True, decay)
            ops.conv2d_grad_factor_ema_(g, l["dy"], l["scale"], decay)
        else:
            ops.linear_act_factor_ema_(a, l["x"], bool(l["layout"][0]), decay)
            ops.linear_grad_factor_ema_(g, l["dy"], l["scale"], decay)
        expected.append((a, g))
    flags = _run_factor_step(ls, [0.9, 0.5, 0.0])
    assert flags.dtype == torch.float64 and flags.tolist() == [[1.0, 1.0]] * 3
    for l, (a, g) in zip(ls, expected):
        torch.testing.assert_close(l["a"], a, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(l["g"], g, rtol=1e-13, atol=1e-13)
    # and the conv layer against the unfold reference (decay 0: the factor is replaced)
    ref = ref_act_factor(ref_conv_patches(ls[2]["x"], 3, 2, 1, 1), True)
    torch.testing.assert_close(ls[2]["a"], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fault", ["nan_input", "inf_grad", "overflow"])
def test_factor_step_leaves_a_bad_layer_untouched_and_flags_it(fault):
    ls = _factor_step_layers(torch.float32)
    if fault == "nan_input":
        ls[1]["x"][2, 1] = float("nan")
    elif fault == "inf_grad":
        ls[1]["dy"][0, 0] = float("inf")
    else:  # finite, but 1e19² · 7 rows overflows a float32 Gram sum
        ls[1]["x"][0, 0] = 1e19
    before = [(l["a"].clone(), l["g"].clone()) for l in ls]
    flags = _run_factor_step(ls, [0.9] * 3)
    assert flags.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    assert torch.equal(ls[1]["a"], before[1][0]) and torch.equal(ls[1]["g"], before[1][1])
    assert not torch.equal(ls[0]["a"], before[0][0]) and not torch.equal(ls[2]["g"], before[2][1])
    assert all(torch.isfinite(l["a"]).all() and torch.isfinite(l["g"]).all() for l in ls)


def test_factor_step_checks_every_argument_before_changing_a_factor():
    ls = _factor_step_layers()
    before = [l["a"].clone() for l in ls]
    cases = [
        (dict(a=torch.eye(5, dtype=torch.float64)), 1, r"a_factors\[1\] must have shape \[4, 4\]"),
        (dict(g=torch.eye(4)), 2, r"g_factors\[2\] must have the same dtype as a_factors\[2\]"),
        (dict(layout=[2] + [0] * 8), 1, r"layouts\[9\] \(layer 1's bias flag\) must be 0 or 1"),
        (dict(layout=[1, 0, 0, 1, 1, 0, 0, 1, 1]), 0, "layouts of Linear layer 0 must be zero"),
        (dict(scale=0.0), 2, "grad_scale"),
        (dict(dy=torch.randn(3, 4, dtype=torch.float64)), 2, r"grad_outputs\[2\] must be 4-D"),
    ]
    for change, i, message in cases:
        bad = [dict(l) for l in ls]
        bad[i].update(change)
        with pytest.raises(RuntimeError, match=message):
            _run_factor_step(bad, [0.9] * 3)
        assert all(torch.equal(l["a"], b) for l, b in zip(ls, before))
    with pytest.raises(RuntimeError, match="decays must hold one entry per layer"):
        _run_factor_step(ls, [0.9])
    with pytest.raises(RuntimeError, match="decay must be in"):
        _run_factor_step(ls, [0.9, 1.5, 0.9])
    with pytest.raises(RuntimeError, match="layouts must hold 9 integers per layer"):
        ops.kfac_factors_ema_([ls[0]["a"]], [ls[0]["g"]], [ls[0]["x"]], [ls[0]["dy"]], [1], [1.0], [0.9])


def test_opcheck_factor_step():
    ls = _factor_step_layers()
    torch.library.opcheck(OPS.kfac_factors_ema_.default,
                          ([l["a"] for l in ls], [l["g"] for l in ls], [l["x"] for l in ls], [l["dy"] for l in ls],
                           [v for l in ls for v in l["layout"]], [l["scale"] for l in ls], [0.9, 0.8, 0.7]))
    torch.library.opcheck(OPS.kfac_factors_ema_.default, ([], [], [], [], [], [], []))
