"""The fused EWC penalty against the plain formula, opcheck and gradcheck."""
from __future__ import annotations

import pytest
import torch

from natgrad import ops

OPS = torch.ops.natgrad


def triples(dtype=torch.float64, shapes=((5,), (3, 4), (2, 3, 2))):
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    fisher = [torch.rand(s, dtype=dtype) for s in shapes]
    anchor = [torch.randn(s, dtype=dtype) for s in shapes]
    return params, fisher, anchor


def test_penalty_and_grads_equal_formula():
    params, fisher, anchor = triples()
    params[1] = torch.randn(4, 3, dtype=torch.float64).T  # non-contiguous
    penalty, grads = ops.ewc_penalty_and_grad(params, fisher, anchor)
    expected = sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchor))
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=0)
    for g, p, f, a in zip(grads, params, fisher, anchor):
        torch.testing.assert_close(g, 2 * f * (p - a))


def test_float32_penalty_accumulates_in_float64():
    params, fisher, anchor = triples(torch.float32, shapes=((1_000_003,), (257, 129)))
    penalty, _ = ops.ewc_penalty_and_grad(params, fisher, anchor)
    exact = sum((f.double() * (p.double() - a.double()) ** 2).sum() for p, f, a in zip(params, fisher, anchor))
    assert abs(penalty.double() - exact) / exact < 1e-6


def test_penalty_is_differentiable_in_a_loss():
    params, fisher, anchor = triples()
    params = [p.requires_grad_() for p in params]
    (3.0 * ops.ewc_penalty(params, fisher, anchor)).backward()
    for p, f, a in zip(params, fisher, anchor):
        torch.testing.assert_close(p.grad, 6 * f * (p.detach() - a))


def test_gradcheck_all_inputs():
    params, fisher, anchor = triples(shapes=((3,), (2, 2)))
    leaves = [t.requires_grad_() for t in params + fisher + anchor]

    def fn(*ts):
        return ops.ewc_penalty_and_grad(list(ts[:2]), list(ts[2:4]), list(ts[4:]))[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves))

    def fn_grads(*ts):  # the gradient outputs are differentiable too
        return tuple(ops.ewc_penalty_and_grad(list(ts[:2]), list(ts[2:4]), list(ts[4:]))[1])

    assert torch.autograd.gradcheck(fn_grads, tuple(leaves))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_ewc_penalty(requires_grad):
    params, fisher, anchor = triples()
    params = [p.requires_grad_(requires_grad) for p in params]
    torch.library.opcheck(OPS.ewc_penalty.default, (params, fisher, anchor))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda p, f, a: (p, f[:-1], a), "fisher must hold one tensor per parameter (3), got 2"),
        (lambda p, f, a: (p, f, a[:1]), "anchor must hold one tensor per parameter"),
        (lambda p, f, a: (p, [f[0], f[1].T, f[2]], a), "fisher[1] must have the shape of params[1]"),
        (lambda p, f, a: (p, f, [a[0].float(), a[1], a[2]]), "anchor[0] must have dtype Double"),
        (lambda p, f, a: ([], [], []), "params must hold at least one tensor"),
        (lambda p, f, a: ([x.long() for x in p], f, a), "params[0] must have a floating-point dtype"),
    ],
)
def test_bad_lists_raise_errors_naming_them(mutate, message):
    with pytest.raises((RuntimeError, ValueError)) as info:
        ops.ewc_penalty_and_grad(*mutate(*triples()))
    assert message in str(info.value)
