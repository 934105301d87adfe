"""natgrad.ops.gram (implicit per-sample gradient rows of a layer) against explicit per-sample
gradients, and woodbury_solve's n×n and p×p systems against the dense solve."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natgrad import ops
from natgrad.ops import Rung

OPS = torch.ops.natgrad
D = torch.float64


def check_rows(u, gram, mv, tmv):
    """gram == U Uᵀ, mv(v) == U v, tmv(w) == Uᵀ w for the explicit U [R, p] (float64, 1e-10)."""
    torch.testing.assert_close(gram(), u @ u.T, rtol=1e-10, atol=1e-10)
    v = torch.randn(u.shape[1], dtype=D)
    torch.testing.assert_close(mv(v), u @ v, rtol=1e-10, atol=1e-10)
    w = torch.randn(u.shape[0], dtype=D)
    torch.testing.assert_close(tmv(w), u.T @ w, rtol=1e-10, atol=1e-10)


def linear_u(x, g, bias):
    """Per-row gradients Σ_t g_rt a_tᵀ (+ Σ_t g_rt), row r of sample r % N: the reference."""
    n, rows = x.shape[0], g.shape[0]
    xs = x.reshape(n, -1, x.shape[-1]).repeat(rows // n, 1, 1)
    gs = g.reshape(rows, -1, g.shape[-1])
    u = torch.einsum("rto,rti->roi", gs, xs).reshape(rows, -1)
    return torch.cat([u, gs.sum(1)], 1) if bias else u


@pytest.mark.parametrize("shape,d_in,d_out", [((6,), 5, 3), ((6, 4), 3, 2), ((6, 2, 3), 9, 7), ((6, 5), 40, 30)])
@pytest.mark.parametrize("passes", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_equal_explicit_per_sample_gradients(shape, d_in, d_out, passes, bias):
    # ((6, 4), 3, 2): positions, pairwise form; ((6, 5), 40, 30): per-sample form (cheaper there)
    x = torch.randn(*shape, d_in, dtype=D)
    g = torch.randn(passes * shape[0], *shape[1:], d_out, dtype=D)
    u = linear_u(x, g, bias)

    def mv(v):
        w = v[:d_out * d_in].reshape(d_out, d_in)
        return ops.linear_rows_mv(x, g, w, v[d_out * d_in:] if bias else None)

    def tmv(w):
        weight, b = ops.linear_rows_tmv(x, g, w)
        return torch.cat([weight.reshape(-1), b]) if bias else weight.reshape(-1)

    check_rows(u, lambda: ops.linear_gram(x, g, bias), mv, tmv)


def conv_reference_u(x, g, conv):
    """Per-row conv gradients by torch.func-free autograd: one backward per row."""
    rows, n = g.shape[0], x.shape[0]
    out = []
    for r in range(rows):
        conv.zero_grad()
        y = conv(x[r % n][None])
        (y * g[r][None]).sum().backward()
        out.append(torch.cat([conv.weight.grad.reshape(-1), conv.bias.grad]))
    return torch.stack(out)


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(stride=(1, 2), padding=(2, 0), dilation=2)])
@pytest.mark.parametrize("passes", [1, 2])
def test_conv2d_rows_equal_explicit_per_sample_gradients(kwargs, passes):
    conv = torch.nn.Conv2d(3, 4, (3, 2), **kwargs).double()
    x = torch.randn(5, 3, 9, 8, dtype=D)
    out_shape = conv(x).shape
    g = torch.randn(passes * 5, *out_shape[1:], dtype=D)
    u = conv_reference_u(x, g, conv)
    geo = (conv.stride, conv.padding, conv.dilation)
    p_w = conv.weight.numel()

    def mv(v):
        return ops.conv2d_rows_mv(x, g, v[:p_w].reshape(conv.weight.shape), v[p_w:], *geo)

    def tmv(w):
        weight, b = ops.conv2d_rows_tmv(x, g, w, conv.kernel_size, *geo)
        return torch.cat([weight.reshape(-1), b])

    check_rows(u, lambda: ops.conv2d_gram(x, g, conv.kernel_size, *geo, True), mv, tmv)
    torch.testing.assert_close(ops.conv2d_gram(x, g, conv.kernel_size, *geo, False),
                               u[:, :p_w] @ u[:, :p_w].T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(7,), (7, 4), (7, 2, 3)])
@pytest.mark.parametrize("passes", [1, 2])
def test_embedding_rows_equal_explicit_per_sample_gradients(shape, passes):
    vocab, dim = 5, 3  # few tokens: repeats within and across samples
    idx = torch.randint(0, vocab, shape)
    g = torch.randn(passes * shape[0], *shape[1:], dim, dtype=D)
    onehot = F.one_hot(idx, vocab).to(D)
    u = linear_u(onehot, g, False).reshape(-1, dim, vocab).transpose(1, 2).reshape(g.shape[0], -1)
    check_rows(u, lambda: ops.embedding_gram(idx, g),
               lambda v: ops.embedding_rows_mv(idx, g, v.reshape(vocab, dim)),
               lambda w: ops.embedding_rows_tmv(idx, g, w, vocab).reshape(-1))


def test_gram_solve_equals_dense_solve_and_reports_the_rung():
    a = torch.randn(6, 9, dtype=D)
    gram, rhs = a @ a.T, torch.randn(6, dtype=D)
    expected = torch.linalg.solve(gram + 0.3 * torch.eye(6, dtype=D), rhs)
    res = ops.gram_solve(gram, rhs, 0.3)
    assert int(res.rung) == Rung.NATIVE
    torch.testing.assert_close(res.solution, expected, rtol=1e-12, atol=1e-12)
    got32 = ops.gram_solve(gram.float(), torch.stack([rhs, rhs], 1).float(), 0.3).solution
    assert got32.dtype == torch.float32 and got32.shape == (6, 2)
    torch.testing.assert_close(got32[:, 1].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,p", [(3, 10), (20, 6), (9, 9)])
def test_woodbury_small_and_large_batch_systems_equal_dense_solve(n, p):
    # n < p: the n×n system; n > p: the p×p system (both in the op, chosen by cost)
    u, rhs = torch.randn(n, p, dtype=D), torch.randn(p, 2, dtype=D)
    dense = torch.linalg.solve(u.T @ u / n + 0.05 * torch.eye(p, dtype=D), rhs)
    torch.testing.assert_close(ops.woodbury_solve(u, rhs, 0.05).solution, dense, rtol=1e-10, atol=1e-10)
    if n == p:  # full rank: the n×n form's answer (v − Uᵀy)/λ cancels to ~1/scale² in float32
        return
    # power-of-two scaling keeps the products in range (with n > p the solution is ~1/scale²,
    # which must stay a normal float32)
    u32 = (u * (1e30 if n < p else 1e15)).float()
    _, s, vh = torch.linalg.svd(u32.double(), full_matrices=False)  # exact at any scale of U
    c = vh @ rhs
    reference = vh.T @ (c / (s**2 / n + 0.05)[:, None])
    if n < p:  # the component outside the row space of U
        reference = reference + (rhs - vh.T @ c) / 0.05
    got = ops.woodbury_solve(u32, rhs.float(), 0.05).solution.double()
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_errors_name_the_argument():
    x, g = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="grad_output must have a positive multiple of input.size"):
        ops.linear_gram(x, torch.randn(6, 2))
    with pytest.raises(RuntimeError, match="input holds no samples"):
        ops.linear_gram(torch.randn(0, 3), torch.randn(0, 2))
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        ops.linear_gram(torch.randn(4, 5, 3), torch.randn(4, 6, 2))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.linear_rows_mv(x, g, torch.randn(3, 2), None)
    with pytest.raises(RuntimeError, match="weights must have shape"):
        ops.linear_rows_tmv(x, g, torch.randn(5))
    with pytest.raises(RuntimeError, match="grad_output must have the convolution's output size"):
        ops.conv2d_gram(torch.randn(2, 1, 5, 5), torch.randn(2, 1, 4, 4), (3, 3), (1, 1), (0, 0), (1, 1), True)
    with pytest.raises(RuntimeError, match="indices must be an int64 or int32"):
        ops.embedding_gram(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 4\)"):
        ops.embedding_rows_tmv(torch.tensor([0, 5]), torch.randn(2, 2), torch.randn(2), 4)
    with pytest.raises(RuntimeError, match="shift must be a finite number > 0"):
        ops.gram_solve(torch.eye(3), torch.randn(3), 0.0)
    with pytest.raises(RuntimeError, match="gram contains NaN or Inf"):
        ops.gram_solve(torch.full((3, 3), float("nan")), torch.randn(3), 1.0)


def test_opcheck():
    x, g = torch.randn(4, 3, 5, dtype=D), torch.randn(8, 3, 2, dtype=D)
    w = torch.randn(8, dtype=D)
    cases = [(OPS.linear_gram.default, (x, g, True)), (OPS.linear_gram.default, (x[:, 0], g[:4, 0], False)),
             (OPS.linear_rows_mv.default, (x, g, torch.randn(2, 5, dtype=D), torch.randn(2, dtype=D))),
             (OPS.linear_rows_mv.default, (x, g, torch.randn(2, 5, dtype=D), None)),
             (OPS.linear_rows_tmv.default, (x, g, w))]
    xc, gc = torch.randn(2, 2, 5, 5, dtype=D), torch.randn(4, 3, 5, 5, dtype=D)
    geo = ([1, 1], [1, 1], [2, 2])
    cases += [(OPS.conv2d_gram.default, (xc, gc, [2, 2], *geo, True)),
              (OPS.conv2d_rows_mv.default, (xc, gc, torch.randn(3, 2, 2, 2, dtype=D), None, *geo)),
              (OPS.conv2d_rows_tmv.default, (xc, gc, torch.randn(4, dtype=D), [2, 2], *geo))]
    idx, ge = torch.randint(0, 6, (3, 4)), torch.randn(6, 4, 2, dtype=D)
    cases += [(OPS.embedding_gram.default, (idx, ge)),
              (OPS.embedding_rows_mv.default, (idx, ge, torch.randn(6, 2, dtype=D))),
              (OPS.embedding_rows_tmv.default, (idx, ge, torch.randn(6, dtype=D), 6)),
              (OPS.gram_solve.default, (torch.eye(3, dtype=D) * 2, torch.randn(3, dtype=D), 0.5))]
    # every check on one case per family (aot_dispatch_dynamic costs seconds per case); schema,
    # autograd registration and fake tensors on all
    full = {OPS.linear_gram.default, OPS.conv2d_rows_tmv.default, OPS.embedding_rows_mv.default, OPS.gram_solve.default}
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in cases:
        if op in full:
            full.discard(op)
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=quick)
