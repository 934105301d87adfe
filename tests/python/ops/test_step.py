"""The per-step list ops (natgrad.ops.step) against dense float64 references, and the subnormal
policy: natgrad's outputs hold no subnormal number and the user's floating-point mode is kept."""
from __future__ import annotations

import pytest
import torch

from natgrad import ops

from support import random_psd

OPS = torch.ops.natgrad
TINY32 = torch.finfo(torch.float32).tiny


def dense_solve(g, a, packed, damping):
    """(A ⊗ G + γI)⁻¹ vec(W̃), row-major vec: (G ⊗ A) vec_r(W) = vec_r(G W A)."""
    m, n = packed.shape
    dense = torch.kron(g, a) + damping * torch.eye(m * n, dtype=torch.float64)
    return torch.linalg.solve(dense, packed.reshape(-1)).reshape(m, n)


def layers(dtype=torch.float64):
    """Three layers: with bias, without bias, and a Conv2d-shaped weight gradient viewed 2-D."""
    out = []
    for m, n, bias in ((3, 4, True), (5, 2, False), (4, 6, True)):
        g, a = random_psd(m), random_psd(n + bias)
        w = torch.randn(m, n, dtype=torch.float64)
        b = torch.randn(m, dtype=torch.float64) if bias else None
        out.append((g, a, w.to(dtype), None if b is None else b.to(dtype)))
    return out


def packed(w, b):
    return w.double() if b is None else torch.cat([w.double(), b.double()[:, None]], 1)


@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_eigen_directions_equal_dense_solves_and_inner_products(grad_scale):
    ls = layers()
    eig = [(ops.damped_eigh(g), ops.damped_eigh(a)) for g, a, _, _ in ls]
    damping = [1e-2, 0.3, 1e-3]
    out = ops.kfac_directions_eigen([w for *_, w, _ in ls], [b for *_, b in ls],
                                    [eg.eigenvalues for eg, _ in eig], [eg.eigenvectors for eg, _ in eig],
                                    [ea.eigenvalues for _, ea in eig], [ea.eigenvectors for _, ea in eig],
                                    damping, False, grad_scale)
    assert len(out.weight) == 3 and len(out.bias) == 2 and out.stats.shape == (3, 4)
    bias_dirs = iter(out.bias)
    for i, ((g, a, w, b), gamma) in enumerate(zip(ls, damping)):
        ref = grad_scale * dense_solve(g, a, packed(w, b), gamma)
        torch.testing.assert_close(out.weight[i], ref[:, :w.shape[1]])
        assert out.weight[i].is_contiguous()
        vg = (ref * packed(w, b) * grad_scale).sum(1)
        expected = [1.0, 1.0, float((ref[:, :w.shape[1]] * w * grad_scale).sum()), 0.0]
        if b is not None:
            db = next(bias_dirs)
            torch.testing.assert_close(db, ref[:, -1])
            expected[3] = float((ref[:, -1] * b * grad_scale).sum())
        torch.testing.assert_close(out.stats[i], torch.tensor(expected, dtype=torch.float64))
        assert abs(float(vg.sum()) - expected[2] - expected[3]) < 1e-9


def test_eigen_directions_equal_the_single_layer_op_with_pi_correction_and_float32():
    ls = layers(torch.float32)
    eig = [(ops.damped_eigh(g.float()), ops.damped_eigh(a.float())) for g, a, _, _ in ls]
    out = ops.kfac_directions_eigen([w for *_, w, _ in ls], [b for *_, b in ls],
                                    [eg.eigenvalues for eg, _ in eig], [eg.eigenvectors for eg, _ in eig],
                                    [ea.eigenvalues for _, ea in eig], [ea.eigenvectors for _, ea in eig],
                                    [0.1] * 3, True)
    bias_dirs = iter(out.bias)
    for i, ((g, a, w, b), (eg, ea)) in enumerate(zip(ls, eig)):
        single = ops.kfac_precondition_eigen(packed(w, b).float(), *eg[:2], *ea[:2], 0.1, True)
        torch.testing.assert_close(out.weight[i], single[:, :w.shape[1]], rtol=1e-4, atol=1e-5)
        if b is not None:
            torch.testing.assert_close(next(bias_dirs), single[:, -1], rtol=1e-4, atol=1e-5)
        assert out.weight[i].dtype == torch.float32


def test_inverse_directions_equal_dense_formula_and_convert_dtypes():
    ls = layers(torch.float32)  # float32 gradients, float64 inverses: converted and back
    inv = [ops.kfac_damped_inverses(g, a, 0.05) for g, a, _, _ in ls]
    out = ops.kfac_directions_inverse([w for *_, w, _ in ls], [b for *_, b in ls],
                                      [x.g_inverse for x in inv], [x.a_inverse for x in inv], 2.0)
    bias_dirs = iter(out.bias)
    root = 0.05 ** 0.5
    for i, (g, a, w, b) in enumerate(ls):
        ref = 2.0 * torch.linalg.solve(g + root * torch.eye(g.shape[0], dtype=torch.float64), packed(w, b)) \
            @ torch.linalg.inv(a + root * torch.eye(a.shape[0], dtype=torch.float64))
        torch.testing.assert_close(out.weight[i].double(), ref[:, :w.shape[1]], rtol=1e-4, atol=1e-5)
        assert out.weight[i].dtype == torch.float32
        if b is not None:
            torch.testing.assert_close(next(bias_dirs).double(), ref[:, -1], rtol=1e-4, atol=1e-5)


def test_non_finite_layer_is_flagged_not_raised():
    ls = layers()
    inv = [ops.kfac_damped_inverses(g, a, 0.05) for g, a, _, _ in ls]
    weights = [w.clone() for *_, w, _ in ls]
    biases = [None if b is None else b.clone() for *_, b in ls]
    biases[2][1] = float("nan")
    out = ops.kfac_directions_inverse(weights, biases, [x.g_inverse for x in inv], [x.a_inverse for x in inv])
    assert out.stats[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert out.stats[:, 1].tolist() == [1.0, 1.0, 0.0]
    assert torch.isfinite(out.stats[:2, 2:]).all()
    # Inf eigenvalues vanish from the direction (x / Inf = 0) but the layer is still flagged.
    eg, ea = ops.damped_eigh(ls[0][0]), ops.damped_eigh(ls[0][1])
    bad = eg.eigenvalues.clone()
    bad[0] = float("inf")
    out = ops.kfac_directions_eigen([ls[0][2]], [ls[0][3]], [bad], [eg.eigenvectors], [ea.eigenvalues],
                                    [ea.eigenvectors], [0.1], False)
    assert out.stats[0, :2].tolist() == [1.0, 0.0]


def test_bad_arguments_name_the_argument():
    g, a, w, b = layers()[0]
    eg, ea = ops.damped_eigh(g), ops.damped_eigh(a)
    with pytest.raises(RuntimeError, match="damping must hold one entry per layer"):
        ops.kfac_directions_eigen([w], [b], [eg[0]], [eg[1]], [ea[0]], [ea[1]], [0.1, 0.2])
    with pytest.raises(RuntimeError, match=r"layer 0: the gradient \[3, 4\] without bias needs"):
        ops.kfac_directions_eigen([w], [None], [eg[0]], [eg[1]], [ea[0]], [ea[1]], [0.1])
    with pytest.raises(RuntimeError, match=r"bias_grads\[0\] must have shape"):
        ops.kfac_directions_eigen([w], [b[:2]], [eg[0]], [eg[1]], [ea[0]], [ea[1]], [0.1])
    with pytest.raises(RuntimeError, match="grad_scale"):
        ops.kfac_directions_inverse([w], [b], [g], [a], 0.0)
    with pytest.raises(RuntimeError, match="needs momentum_buffers"):
        ops.kfac_momentum_step_([w], [], [w], 0.1, 0.9)
    with pytest.raises(RuntimeError, match=r"directions\[0\] must have shape"):
        ops.kfac_momentum_step_([w], [torch.zeros_like(w)], [w[:1]], 0.1, 0.9)


def test_momentum_step_matches_sgd_formula():
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    dirs = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    expected = []
    for p, u, b in zip(params, dirs, bufs):
        nb = 0.9 * b + (0.5 * u + 0.01 * p)
        expected.append((p - 0.1 * nb, nb))
    ops.kfac_momentum_step_(params, bufs, dirs, 0.1, 0.9, 0.01, 0.5)
    for p, b, (ep, eb) in zip(params, bufs, expected):
        torch.testing.assert_close(p, ep)
        torch.testing.assert_close(b, eb)
    p0 = params[0].clone()
    ops.kfac_momentum_step_(params[:1], [], dirs[:1], 0.1, 0.0, 0.0, 1.0)  # no momentum: b = d
    torch.testing.assert_close(params[0], p0 - 0.1 * dirs[0])


def subnormals(t):
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_outputs_hold_no_subnormals_and_the_user_mode_is_kept():
    # A momentum buffer of 1e-37 decaying by 0.1 per step turns subnormal at once.
    p = torch.zeros(64)
    buf = torch.full((64,), 1e-37)
    ops.kfac_momentum_step_([p], [buf], [torch.zeros(64)], 0.1, 0.1)
    assert subnormals(buf) == 0 and torch.equal(buf, torch.zeros(64))
    # Factors from gradients whose squares are subnormal: the G factor holds none.
    grad = torch.full((8, 3), 3e-20)
    grad[:, 0] = 1.0
    factor = torch.zeros(3, 3)
    ops.linear_grad_factor_ema_(factor, grad, 1.0, 0.0)
    assert subnormals(factor) == 0 and factor[0, 0] == 1.0
    assert 0 < (torch.tensor(3e-20) * torch.tensor(3e-20)).abs() < TINY32  # the user's mode: unchanged
    # ... also on ATen's other threads (a large elementwise op runs in parallel).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.linear_grad_factor_ema_(factor, grad, 1.0, 0.5)
        big = torch.full((1 << 20,), 3e-20)
        assert subnormals(big * big) == big.numel()
    finally:
        torch.set_num_threads(threads)


def test_opcheck_step_ops():
    ls = layers()
    eig = [(ops.damped_eigh(g), ops.damped_eigh(a)) for g, a, _, _ in ls]
    w, b = [w for *_, w, _ in ls], [b for *_, b in ls]
    torch.library.opcheck(OPS.kfac_directions_eigen.default,
                          (w, b, [e[0][0] for e in eig], [e[0][1] for e in eig], [e[1][0] for e in eig],
                           [e[1][1] for e in eig], [0.1, 0.2, 0.3], False, 1.0))
    inv = [ops.kfac_damped_inverses(g, a, 0.05) for g, a, _, _ in ls]
    torch.library.opcheck(OPS.kfac_directions_inverse.default,
                          (w, b, [x.g_inverse for x in inv], [x.a_inverse for x in inv], 0.5))
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    torch.library.opcheck(OPS.kfac_momentum_step_.default,
                          (params, [torch.zeros_like(p) for p in params], [torch.randn_like(p) for p in params],
                           0.1, 0.9, 0.01, 1.0))


def test_threads_started_inside_an_op_do_not_inherit_flush_to_zero():
    # A fresh process whose first multi-threaded work (an MKL GEMM that starts the OpenMP pool)
    # runs inside a natgrad op: the pool threads must not keep the op's flush-to-zero mode.
    import subprocess
    import sys
    code = (
        "import torch\nfrom natgrad import ops\ntorch.set_num_threads(2)\n"
        "x, factor = torch.randn(4096, 128), torch.zeros(128, 128)\n"
        "ops.linear_grad_factor_ema_(factor, x, 1.0, 0.0)\n"
        "big = torch.full((1 << 20,), 3e-20)\nprod = big * big\n"
        "print(int(((prod != 0) & (prod.abs() < torch.finfo(prod.dtype).tiny)).sum()))\n")
    import os

    import natgrad
    root = os.path.dirname(os.path.dirname(natgrad.__file__))  # the child imports this natgrad
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == 1 << 20


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_momentum_buffers_append_their_inner_products(method):
    """With momentum buffers the stats gain ⟨b_w, g_w⟩, ⟨b_b, g_b⟩ (gradients times grad_scale),
    0 for a missing buffer; columns 0-3 and the directions are those of the call without."""
    ls = layers()
    w, b = [w for *_, w, _ in ls], [b for *_, b in ls]
    bw = [torch.randn_like(w[0]), None, torch.randn_like(w[2])]
    bb = [torch.randn_like(b[0]), None, None]
    if method == "eigen":
        eig = [(ops.damped_eigh(g), ops.damped_eigh(a)) for g, a, _, _ in ls]
        args = (w, b, [e[0][0] for e in eig], [e[0][1] for e in eig], [e[1][0] for e in eig],
                [e[1][1] for e in eig], [0.1, 0.2, 0.3], False, 0.5)
        call = ops.kfac_directions_eigen
    else:
        inv = [ops.kfac_damped_inverses(g, a, 0.05) for g, a, _, _ in ls]
        args = (w, b, [x.g_inverse for x in inv], [x.a_inverse for x in inv], 0.5)
        call = ops.kfac_directions_inverse
    plain = call(*args)
    out = call(*args, weight_buffers=bw, bias_buffers=bb)
    assert plain.stats.shape == (3, 4) and out.stats.shape == (3, 6)
    assert torch.equal(out.stats[:, :4], plain.stats)
    for x, y in zip(out.weight + out.bias, plain.weight + plain.bias):
        assert torch.equal(x, y)
    expected = [[float((bw[0] * w[0]).sum() * 0.5), float((bb[0] * b[0]).sum() * 0.5)], [0.0, 0.0],
                [float((bw[2] * w[2]).sum() * 0.5), 0.0]]
    torch.testing.assert_close(out.stats[:, 4:], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # <u, g> of the fused pass equals the float64 formula
    u_dot_g = float((plain.weight[0].double() * w[0].double()).sum() * 0.5)
    assert abs(float(out.stats[0, 2]) - u_dot_g) <= 1e-12 * abs(u_dot_g)
    torch.library.opcheck(getattr(OPS, f"kfac_directions_{method}").default, args + (bw, bb))


def test_momentum_buffers_float32_match_float64_sums_and_flag_non_finite():
    torch.manual_seed(3)
    g, a = random_psd(40), random_psd(71)
    w = torch.randn(40, 70)  # one chunk of the fused pass; big_w below spans several
    big_w = torch.randn(200, 300)
    g2, a2 = random_psd(200).float(), random_psd(301).float()
    inv = [ops.kfac_damped_inverses(g.float(), a.float(), 0.05), ops.kfac_damped_inverses(g2, a2, 0.05)]
    b = [torch.randn(40), torch.randn(200)]
    bufs = [torch.randn(40, 70), torch.randn(200, 300)]
    out = ops.kfac_directions_inverse([w, big_w], b, [x.g_inverse for x in inv], [x.a_inverse for x in inv],
                                      weight_buffers=bufs, bias_buffers=[None, None])
    for i, (gw, buf) in enumerate(zip([w, big_w], bufs)):
        ref = float((out.weight[i].double() * gw.double()).sum())
        assert abs(float(out.stats[i, 2]) - ref) <= 1e-12 * max(1.0, abs(ref))
        ref = float((buf.double() * gw.double()).sum())
        assert abs(float(out.stats[i, 4]) - ref) <= 1e-12 * max(1.0, abs(ref))
    bad = big_w.clone()
    bad[150, 7] = float("inf")
    out = ops.kfac_directions_inverse([w, bad], b, [x.g_inverse for x in inv], [x.a_inverse for x in inv],
                                      weight_buffers=bufs)
    assert out.stats[:, 0].tolist() == [1.0, 0.0] and out.stats[:, 1].tolist() == [1.0, 0.0]


def test_bad_momentum_buffers_name_the_argument():
    g, a, w, b = layers()[0]
    inv = ops.kfac_damped_inverses(g, a, 0.05)
    call = lambda **kw: ops.kfac_directions_inverse([w], [b], [inv.g_inverse], [inv.a_inverse], **kw)  # noqa: E731
    with pytest.raises(RuntimeError, match="weight_buffers must hold one entry per layer"):
        call(weight_buffers=[None, None])
    with pytest.raises(RuntimeError, match=r"weight_buffers\[0\] must have shape"):
        call(weight_buffers=[w[:1].clone()])
    with pytest.raises(RuntimeError, match=r"bias_buffers\[0\] must have the same dtype"):
        call(weight_buffers=[None], bias_buffers=[b.float()])
    with pytest.raises(RuntimeError, match="bias_buffers needs weight_buffers"):
        call(bias_buffers=[None])
    with pytest.raises(RuntimeError, match=r"bias_buffers\[0\] is given but layer 0 has no bias"):
        ops.kfac_directions_inverse([w], [None], [inv.g_inverse], [random_psd(4)], weight_buffers=[None],
                                    bias_buffers=[b])
