"""Package-level behaviour: build facts, and the ops traced by torch.compile through their
fake kernels."""
from __future__ import annotations

import re

import torch

import natgrad
from natgrad import ops


def test_build_info_reports_version_and_cuda():
    info = natgrad.build_info()
    assert info["version"] == natgrad.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert info["cuda_compiled"] in (True, False)
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_every_schema_is_registered():
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("natgrad::")}
    assert set(ops.__all__) - {"DampedInverses", "EighResult", "Rung", "WoodburySolution", "ewc_penalty_and_grad"} <= names


def kfac_step(x, weight_grad, out_grad):
    a = ops.linear_act_factor(x, True)
    g = ops.linear_grad_factor(out_grad, float(x.shape[0]))
    ea, eg = ops.damped_eigh(a), ops.damped_eigh(g)
    return ops.kfac_precondition_eigen(weight_grad, eg.eigenvalues, eg.eigenvectors, ea.eigenvalues, ea.eigenvectors, 1e-2)


def test_torch_compile_traces_ops_without_graph_breaks():
    x = torch.randn(16, 5, dtype=torch.float64)
    dw = torch.randn(3, 6, dtype=torch.float64)
    go = torch.randn(16, 3, dtype=torch.float64)
    compiled = torch.compile(kfac_step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, dw, go), kfac_step(x, dw, go))
    u = torch.randn(8, 20, dtype=torch.float64, requires_grad=True)
    v = torch.randn(20, dtype=torch.float64)
    solve = torch.compile(lambda u, v: ops.woodbury_solve(u, v, 0.1).solution.sum(), backend="aot_eager", fullgraph=True)
    solve(u, v).backward()
    expected = u.grad.clone()
    u.grad = None
    ops.woodbury_solve(u, v, 0.1).solution.sum().backward()
    torch.testing.assert_close(expected, u.grad)
