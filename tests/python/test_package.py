"""Package-level behaviour: build facts, and the ops traced by torch.compile through their
fake kernels."""
from __future__ import annotations

import pathlib
import re

import torch

import natgrad
from natgrad import ops

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def test_build_info_reports_version_and_torch():
    info = natgrad.build_info()
    assert info["version"] == natgrad.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_build_info_says_there_are_no_hand_written_cuda_kernels():
    """cuda_kernels is True only if csrc/ has .cu sources, and there are none."""
    assert not list(CSRC.rglob("*.cu"))
    assert natgrad.build_info()["cuda_kernels"] is False


# The likelihood rules and EWC's bookkeeping: compositions of differentiable ATen ops.
IMPLICIT = {"likelihood_check_batch", "likelihood_check_targets", "likelihood_nll", "likelihood_sample",
            "likelihood_pseudo_targets", "ewc_running_mean", "ewc_online_merge"}


def test_build_info_devices_are_the_dispatch_keys_registered():
    """Every op is one ATen composition for every device (CompositeExplicitAutograd) plus the
    fake kernel (Meta), or a CompositeImplicitAutograd composition (IMPLICIT); only ewc_penalty
    adds a CPU-only fused kernel. Read back from the
    dispatcher, and checked against it by calling each key's kernel."""
    devices = natgrad.build_info()["devices"]
    assert set(devices) == {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("natgrad::")}
    for name, keys in devices.items():
        if name in IMPLICIT:  # thin compositions: autograd and meta come from the ATen ops they call
            assert keys == ["CompositeImplicitAutograd"], name
            continue
        expected = ["CompositeExplicitAutograd", "CPU", "Meta"] if name == "ewc_penalty" else ["CompositeExplicitAutograd", "Meta"]
        assert keys == expected, name
        # The computed dispatch table: CUDA is served by the composition, CPU by it too except
        # for ewc_penalty's own CPU kernel, Meta by the Python fake kernel.
        table = torch._C._dispatch_dump_table(f"natgrad::{name}")
        assert re.search(r"^CUDA: registered at .*\.cpp:\d+ \[default backend kernel\]$", table, flags=re.M), name
        cpu_kind = "kernel" if name == "ewc_penalty" else "default backend kernel"
        assert re.search(rf"^CPU: registered at .*\.cpp:\d+ \[{cpu_kind}\]$", table, flags=re.M), name
        assert re.search(r"^Meta: registered at .*\.py:\d+ \[kernel\]$", table, flags=re.M), name


def test_ops_reference_table_lists_every_op_with_its_devices():
    """docs/ops.md's table names every op registered under torch.ops.natgrad (so it cannot drift)."""
    page = (ROOT / "docs" / "ops.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in page.splitlines() if line.startswith("|"))
    for name in natgrad.build_info()["devices"]:
        assert f"`{name}`" in table, f"{name} is registered but missing from docs/ops.md's table"
    assert "CompositeExplicitAutograd" in table and "cuda_kernels" in page


def test_every_schema_is_registered():
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("natgrad::")}
    assert set(ops.__all__) - {"DampedInverses", "DampingAdaptation", "Directions", "EighResult", "Fault",
                                "GramSolution", "OptionBound", "QuadraticStep", "Rung", "TrustRegion", "WoodburySolution",
                                "ewc_penalty_and_grad", "kfac_option_bounds"} <= names


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
