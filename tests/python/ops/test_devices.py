"""Every natgrad op on every device: CPU, the meta device (the fake kernels), FakeTensors, and
CUDA when a GPU is present (skipped otherwise). Outputs must have the shapes, dtypes and devices
of the CPU run (values too on real devices), and bad arguments must fail on meta exactly as they
fail on the CPU, with the message naming the argument."""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import natgrad
from natgrad import ops

OPS = torch.ops.natgrad
HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))
DEVICES = ["cpu", "meta", CUDA]


def _psd(n: int, batch=()) -> torch.Tensor:
    x = torch.randn(*batch, n, n + 3, dtype=torch.float64)
    return x @ x.mT / x.shape[-1]


def _samples() -> dict[str, tuple]:
    """One CPU float64 argument tuple per op (schema order), built from the seeded generator."""
    torch.manual_seed(0)
    g, a = _psd(3), _psd(4)
    eg, ea = torch.linalg.eigh(g), torch.linalg.eigh(a)
    g_inv, a_inv = torch.linalg.inv(g + 0.1 * torch.eye(3, dtype=torch.float64)), torch.linalg.inv(a + 0.1 * torch.eye(4, dtype=torch.float64))
    x = torch.randn(6, 3, dtype=torch.float64)
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    g_img = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    geom = ([3, 3], [1, 1], [1, 1], [1, 1])
    shapes = ((5,), (2, 3))
    return {
        "linear_act_factor": (x, True),
        "linear_act_factor_ema_": (torch.eye(4, dtype=torch.float64), x, True, 0.9),
        "linear_grad_factor": (x, 2.0),
        "linear_grad_factor_ema_": (torch.eye(3, dtype=torch.float64), x, 2.0, 0.5),
        "conv2d_act_factor": (img, *geom, True),
        "conv2d_act_factor_ema_": (torch.eye(19, dtype=torch.float64), img, *geom, True, 0.5),
        "conv2d_grad_factor": (g_img, 1.5),
        "conv2d_grad_factor_ema_": (torch.eye(3, dtype=torch.float64), g_img, 1.5, 0.5),
        "damped_eigh": (g, 0.1),
        "kfac_precondition_eigen": (torch.randn(3, 4, dtype=torch.float64), eg[0], eg[1], ea[0], ea[1], 0.1, True),
        "kfac_damped_inverses": (g, a, 0.1, True),
        "kfac_precondition_inverse": (torch.randn(3, 4, dtype=torch.float64), g_inv, a_inv),
        "kfac_precondition_diagonal_a": (torch.randn(3, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64), eg[0], eg[1], 0.1, True),
        "kfac_precondition_ekfac": (torch.randn(3, 4, dtype=torch.float64), eg[1], ea[1], torch.rand(3, 4, dtype=torch.float64), 0.1),
        "linear_ekfac_diagonal_ema_": (torch.rand(3, 4, dtype=torch.float64), x, torch.randn(6, 3, dtype=torch.float64),
                                       eg[1], ea[1], True, 2.0, 0.5),
        "conv2d_ekfac_diagonal_ema_": (torch.rand(3, 9, dtype=torch.float64), img, g_img, eg[1],
                                       torch.linalg.eigh(_psd(9))[1], [2, 2], [1, 1], [0, 0], [1, 1], True, 1.5, 0.5),
        "embedding_ekfac_diagonal_ema_": (torch.rand(3, 4, dtype=torch.float64), torch.tensor([[0, 2], [1, 2]]),
                                          torch.randn(2, 2, 3, dtype=torch.float64), eg[1], 1.0, 0.5),
        "ekfac_rebase": (torch.rand(3, 4, dtype=torch.float64), eg[1], eg[1].flip(-1), ea[1], ea[1].flip(-1)),
        "kfac_directions_eigen": ([torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)],
                                  [torch.randn(3, dtype=torch.float64), None], [eg[0], eg[0]], [eg[1], eg[1]],
                                  [ea[0], ea[0]], [ea[1], ea[1]], [0.1, 0.2], False, 1.0),
        "kfac_directions_inverse": ([torch.randn(3, 3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)],
                                    [g_inv], [a_inv], 0.5, [torch.randn(3, 3, dtype=torch.float64)], [None]),
        "kfac_factors_ema_": ([torch.eye(4, dtype=torch.float64), torch.eye(19, dtype=torch.float64)],
                              [torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)], [x, img],
                              [torch.randn(6, 3, dtype=torch.float64), g_img],
                              [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 3, 1, 1, 1, 1, 1, 1], [2.0, 1.5], [0.9, 0.5]),
        "kfac_momentum_step_": ([torch.randn(s, dtype=torch.float64) for s in shapes],
                                [torch.zeros(s, dtype=torch.float64) for s in shapes],
                                [torch.randn(s, dtype=torch.float64) for s in shapes], 0.1, 0.9, 0.01, 1.0),
        "woodbury_solve": (torch.randn(4, 7, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64), 0.3),
        "linear_diag_fisher": (torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64), True, 5.0),
        "linear_gram": (torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(6, 2, 5, dtype=torch.float64), True),
        "linear_rows_mv": (x, torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), None),
        "linear_rows_tmv": (x, torch.randn(6, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)),
        "conv2d_gram": (img, g_img, [2, 2], [1, 1], [0, 0], [1, 1], True),
        "conv2d_rows_mv": (img, g_img, torch.randn(3, 2, 2, 2, dtype=torch.float64), None, [1, 1], [0, 0], [1, 1]),
        "conv2d_rows_tmv": (img, g_img, torch.randn(2, dtype=torch.float64), [2, 2], [1, 1], [0, 0], [1, 1]),
        "embedding_gram": (torch.tensor([[0, 2], [1, 2]]), torch.randn(2, 2, 3, dtype=torch.float64)),
        "embedding_rows_mv": (torch.tensor([[0, 2], [1, 2]]), torch.randn(2, 2, 3, dtype=torch.float64),
                              torch.randn(4, 3, dtype=torch.float64)),
        "embedding_rows_tmv": (torch.tensor([[0, 2], [1, 2]]), torch.randn(4, 2, 3, dtype=torch.float64),
                               torch.randn(4, dtype=torch.float64), 4),
        "gram_solve": (g, torch.randn(3, dtype=torch.float64), 0.2),
        "kfac_statistics_ok": (x, torch.randn(6, 2, dtype=torch.float64), 6, 6, 2.0, torch.float32),
        "kfac_peak_bounded": (torch.tensor(3.0, dtype=torch.float64), 10.0, torch.float32),
        "kfac_statistics_limit": (torch.float16,),
        "kfac_linear_rows": ([6, 3], 3),
        "kfac_conv_rows": ([2, 2, 5, 5], *geom),
        "kfac_embedding_rows": ([2, 2],),
        "kfac_sample_scale": (6, 12, "token_mean"),
        "kfac_pi_correction": ("inverse", None),
        "kfac_damping": (1e-3, 2.0),
        "kfac_adapt_damping": (1.0, -0.5, -1.0, 0.95, 5),
        "kfac_quadratic_step": (4.0, 1.0, 2.0, -2.0, 1.0, True, 0.9),
        "kfac_fsum": ([0.1, 0.2, 0.3],),
        "kfac_trust_region": (1e-3, [1.0], [0.5], [0.1], [0.9], [0.2]),
        "kfac_direction_faults": ([1.0, 0.0, 2.0], [0]),
        "kfac_factor_faults": ([1.0, 0.0],),
        "kfac_fault_message": ("natgrad.KFAC", 2, "layer", "fc"),
        "kfac_conv_unsupported_reason": (2, "(0, 0)", "zeros"),
        "kfac_embedding_unsupported_reason": (False, True),
        "kfac_expand_grad_scale": (1.5, 2, 12, 24),
        "kfac_option_names": (),
        "kfac_option_bound": ("damping",),
        "kfac_option_choices": ("inverse_method",),
        "likelihood_check_batch": (torch.tensor([[0, 2], [1, 2]]), None, "inputs"),
        "likelihood_check_targets": ("gaussian", x, torch.randn(6, 3, dtype=torch.float64), "targets"),
        "likelihood_nll": ("categorical", x, torch.tensor([0, 2, 1, 1, 0, 2]), ),
        "likelihood_sample": ("categorical", torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 60.0]], dtype=torch.float64), None),
        "likelihood_pseudo_targets": ("categorical", x, "exact", None, 1, None),
        "ewc_check_options": (1.0, 0.5, "online", "lambda_"),
        "ewc_running_mean": (torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64), 2, 6),
        "ewc_online_merge": (0.5, torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)),
        "ewc_penalty": ([torch.randn(s, dtype=torch.float64) for s in shapes],
                        [torch.rand(s, dtype=torch.float64) for s in shapes],
                        [torch.randn(s, dtype=torch.float64) for s in shapes]),
    }


OP_NAMES = sorted(_samples())


def _map(x, fn: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    return x


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def _call(name: str, args: tuple):
    """Runs the op; EMA ops return None, so their result is the updated factor (args[0])."""
    out = getattr(OPS, name)(*args)
    return args[0] if name.endswith("_ema_") else out


def test_cuda_is_present_when_required():
    """scripts/gpu_check.sh sets NATGRAD_REQUIRE_CUDA=1: there the CUDA cases must run, not skip."""
    if os.environ.get("NATGRAD_REQUIRE_CUDA") == "1":
        assert HAS_CUDA, f"NATGRAD_REQUIRE_CUDA=1 but torch {torch.__version__} sees no CUDA GPU"


def test_samples_cover_every_registered_op():
    assert set(OP_NAMES) == set(natgrad.build_info()["devices"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_runs_on_device_like_on_cpu(name, device):
    args = _samples()[name]
    expected = _flat(_call(name, _map(args, torch.clone)))
    got = _flat(_call(name, _map(args, lambda t: t.to(device))))
    assert len(got) == len(expected)
    if name == "damped_eigh" and device != "meta":  # eigenvector signs may differ by device
        for out in (got, expected):
            out[1] = out[1] @ torch.diag_embed(out[0]) @ out[1].mT
    for g, e in zip(got, expected):
        # The ladder's rung is a host-side fact: a CPU tensor whatever the inputs' device (labels
        # are data: they stay on the outputs' device).
        host_side = e.dtype == torch.long and not name.startswith("likelihood_")
        want_device = torch.device("cpu") if host_side else torch.empty(0, device=device).device
        assert (g.shape, g.dtype, g.device) == (e.shape, e.dtype, want_device)
        if device != "meta":
            torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_traces_under_fake_tensor_mode(name):
    args = _samples()[name]
    expected = _flat(_call(name, _map(args, torch.clone)))
    with FakeTensorMode() as mode:
        got = _flat(_call(name, _map(args, mode.from_tensor)))
    assert [(g.shape, g.dtype, g.device) for g in got] == [(e.shape, e.dtype, e.device) for e in expected]


@pytest.mark.parametrize("device", ["meta", CUDA])
def test_autograd_formulas_run_on_device(device):
    x = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    ops.linear_act_factor(x, True).sum().backward()
    assert x.grad.shape == x.shape and x.grad.device == x.device
    u = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    ops.woodbury_solve(u, torch.randn(7, dtype=torch.float64, device=device), 0.3).solution.sum().backward()
    assert u.grad.shape == u.shape and u.grad.device == u.device


def _ones(*shape, dtype=torch.float64):
    return lambda d: torch.ones(*shape, dtype=dtype, device=d)


# (op, builder of the arguments on a device, message naming the argument). Every case must fail
# on the CPU (real kernel) and on the meta device (fake kernel) with the same message.
BAD_ARGUMENTS = [
    ("linear_act_factor", lambda d: (torch.ones((), device=d), True), "input must have at least 1 dimensions"),
    ("linear_act_factor", lambda d: (_ones(3, 2, dtype=torch.long)(d), True), "input must have a floating-point dtype (float32 or float64), got Long"),
    ("linear_act_factor", lambda d: (_ones(0, 2)(d), True), "input holds no samples"),
    ("linear_act_factor_ema_", lambda d: (_ones(3, 3)(d), _ones(4, 2)(d), False, 0.5), "factor must have shape [2, 2]"),
    ("linear_act_factor_ema_", lambda d: (_ones(3, 3)(d), _ones(4, 2)(d), True, 1.5), "decay must be in [0, 1]"),
    ("linear_act_factor_ema_", lambda d: (_ones(3, 3, dtype=torch.int32)(d), _ones(4, 2)(d), True, 0.5), "factor must have a floating-point dtype"),
    ("linear_grad_factor", lambda d: (torch.ones((), device=d), 1.0), "grad_output must have at least 1 dimensions"),
    ("linear_grad_factor", lambda d: (_ones(3, 2)(d), float("nan")), "grad_scale must be a finite number > 0"),
    ("linear_grad_factor_ema_", lambda d: (_ones(3, 3)(d), _ones(4, 2)(d), 1.0, 0.5), "factor must have shape [2, 2]"),
    ("conv2d_act_factor", lambda d: (_ones(2, 3, 4)(d), [3, 3], [1, 1], [0, 0], [1, 1], True), "input must be 4-D"),
    ("conv2d_act_factor", lambda d: (_ones(1, 1, 2, 2)(d), [3, 3], [1, 1], [0, 0], [1, 1], True), "too small for kernel_size"),
    ("conv2d_act_factor", lambda d: (_ones(1, 1, 4, 4)(d), [3, 3], [0, 1], [0, 0], [1, 1], True), "stride must be >= 1"),
    ("conv2d_act_factor", lambda d: (_ones(1, 0, 4, 4)(d), [3, 3], [1, 1], [0, 0], [1, 1], True), "input must have at least one channel"),
    ("conv2d_act_factor_ema_", lambda d: (_ones(5, 5)(d), _ones(1, 2, 4, 4)(d), [2, 2], [1, 1], [0, 0], [1, 1], True, 0.5), "factor must have shape [9, 9]"),
    ("conv2d_grad_factor", lambda d: (_ones(2, 3)(d), 1.0), "grad_output must be 4-D"),
    ("conv2d_grad_factor_ema_", lambda d: (_ones(2, 2)(d), _ones(1, 3, 2, 2)(d), 1.0, 0.5), "factor must have shape [3, 3]"),
    ("damped_eigh", lambda d: (_ones(2, 3)(d), 0.0), "factor must be a square matrix"),
    ("damped_eigh", lambda d: (torch.ones((), device=d), 0.0), "factor must be a square matrix"),
    ("damped_eigh", lambda d: (_ones(2, 2)(d), -1.0), "damping must be a finite number >= 0"),
    ("kfac_precondition_eigen", lambda d: (_ones(3, 4)(d), _ones(3)(d), _ones(3, 3)(d), _ones(4)(d), _ones(3, 3)(d), 0.1, False), "a_eigenvectors must have shape [4, 4]"),
    ("kfac_precondition_eigen", lambda d: (_ones(3, 4)(d), _ones(3, dtype=torch.float32)(d), _ones(3, 3)(d), _ones(4)(d), _ones(4, 4)(d), 0.1, False), "g_eigenvalues must have the same dtype as grad (Double), got Float"),
    ("kfac_precondition_eigen", lambda d: (_ones(3, 4)(d), _ones(2)(d), _ones(3, 3)(d), _ones(4)(d), _ones(4, 4)(d), 0.1, False), "g_eigenvalues must have shape [3]"),
    ("kfac_precondition_eigen", lambda d: (_ones(4)(d), _ones(3)(d), _ones(3, 3)(d), _ones(4)(d), _ones(4, 4)(d), 0.1, False), "grad must have at least 2 dimensions"),
    ("kfac_precondition_diagonal_a", lambda d: (_ones(3, 4)(d), _ones(3)(d), _ones(3)(d), _ones(3, 3)(d), 0.1, False), "a_diagonal must have shape [4]"),
    ("kfac_precondition_diagonal_a", lambda d: (_ones(3, 4)(d), _ones(4)(d), _ones(3)(d), _ones(4, 4)(d), 0.1, False), "g_eigenvectors must have shape [3, 3]"),
    ("kfac_precondition_diagonal_a", lambda d: (_ones(3, 4)(d), _ones(4, dtype=torch.float32)(d), _ones(3)(d), _ones(3, 3)(d), 0.1, False), "a_diagonal must have the same dtype as grad (Double), got Float"),
    ("kfac_precondition_diagonal_a", lambda d: (_ones(3, 4)(d), _ones(4)(d), _ones(3)(d), _ones(3, 3)(d), -1.0, False), "damping must be a finite number >= 0"),
    ("kfac_damped_inverses", lambda d: (_ones(3, 3)(d), _ones(4, 3)(d), 0.1, False), "a_factor must be a square matrix"),
    ("kfac_damped_inverses", lambda d: (_ones(3, 3)(d), _ones(4, 4)(d), 0.0, False), "damping must be a finite number > 0"),
    ("kfac_damped_inverses", lambda d: (_ones(2, 3, 3)(d), _ones(3, 4, 4)(d), 0.1, False), "must have the same batch dims"),
    ("kfac_precondition_inverse", lambda d: (_ones(3, 4)(d), _ones(4, 4)(d), _ones(4, 4)(d)), "g_inverse must have shape [3, 3]"),
    ("kfac_precondition_inverse", lambda d: (_ones(2, 3, 4)(d), _ones(3, 3)(d), _ones(4, 4)(d)), "g_inverse must have shape [2, 3, 3]"),
    ("woodbury_solve", lambda d: (_ones(4, 6)(d), _ones(5)(d), 0.1), "rhs must have shape [n_params] or [n_params, k] with n_params = 6"),
    ("woodbury_solve", lambda d: (_ones(6)(d), _ones(6)(d), 0.1), "per_sample_grads must be 2-D"),
    ("woodbury_solve", lambda d: (_ones(0, 6)(d), _ones(6)(d), 0.1), "per_sample_grads holds no samples"),
    ("woodbury_solve", lambda d: (_ones(4, 6)(d), _ones(6, dtype=torch.float32)(d), 0.1), "rhs must have the same dtype as per_sample_grads"),
    ("linear_diag_fisher", lambda d: (_ones(4, 3)(d), _ones(5, 2)(d), True, 1.0), "grad_output must have the leading dims of input [4]"),
    ("linear_diag_fisher", lambda d: (_ones(3)(d), _ones(3)(d), True, 1.0), "input must have at least 2 dimensions"),
    ("linear_diag_fisher", lambda d: (_ones(4, 3)(d), _ones(4, 2)(d), True, 0.0), "grad_scale must be a finite number > 0"),
    ("ewc_penalty", lambda d: ([_ones(2)(d)], [_ones(3)(d)], [_ones(2)(d)]), "fisher[0] must have the shape of params[0] [2]"),
    ("ewc_penalty", lambda d: ([_ones(2)(d)], [_ones(2)(d)], [_ones(2, dtype=torch.float32)(d)]), "anchor[0] must have dtype Double"),
    ("ewc_penalty", lambda d: ([_ones(2)(d)], [], [_ones(2)(d)]), "fisher must hold one tensor per parameter (1), got 0"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)), ids=lambda i: f"{BAD_ARGUMENTS[i][0]}-{i}")
def test_bad_arguments_fail_alike_on_every_device(case, device):
    name, build, message = BAD_ARGUMENTS[case]
    with pytest.raises(RuntimeError) as info:
        getattr(OPS, name)(*build(device))
    assert message in str(info.value)


MIXED_DEVICES = [
    ("linear_act_factor_ema_", lambda d, o: (_ones(3, 3)(o), _ones(4, 2)(d), True, 0.5), "factor must be on the same device as input"),
    ("linear_grad_factor_ema_", lambda d, o: (_ones(2, 2)(o), _ones(4, 2)(d), 1.0, 0.5), "factor must be on the same device as grad_output"),
    ("conv2d_grad_factor_ema_", lambda d, o: (_ones(3, 3)(o), _ones(1, 3, 2, 2)(d), 1.0, 0.5), "factor must be on the same device as grad_output"),
    ("kfac_precondition_inverse", lambda d, o: (_ones(3, 4)(d), _ones(3, 3)(o), _ones(4, 4)(d)), "g_inverse must be on the same device as grad"),
    ("kfac_precondition_eigen", lambda d, o: (_ones(3, 4)(d), _ones(3)(d), _ones(3, 3)(d), _ones(4)(o), _ones(4, 4)(d), 0.1, False), "a_eigenvalues must be on the same device as grad"),
    ("kfac_damped_inverses", lambda d, o: (_ones(3, 3)(d), _ones(4, 4)(o), 0.1, False), "a_factor must be on the same device as g_factor"),
    ("kfac_precondition_diagonal_a", lambda d, o: (_ones(3, 4)(d), _ones(4)(o), _ones(3)(d), _ones(3, 3)(d), 0.1, False), "a_diagonal must be on the same device as grad"),
    ("woodbury_solve", lambda d, o: (_ones(4, 6)(d), _ones(6)(o), 0.1), "rhs must be on the same device as per_sample_grads"),
    ("linear_diag_fisher", lambda d, o: (_ones(4, 3)(d), _ones(4, 2)(o), True, 1.0), "grad_output must be on the same device as input"),
    ("ewc_penalty", lambda d, o: ([_ones(2)(d)], [_ones(2)(o)], [_ones(2)(d)]), "fisher[0] must have dtype Double on"),
]


@pytest.mark.parametrize("device", ["meta", CUDA])
@pytest.mark.parametrize("case", range(len(MIXED_DEVICES)), ids=lambda i: f"{MIXED_DEVICES[i][0]}-{i}")
def test_arguments_on_another_device_are_rejected(case, device):
    name, build, message = MIXED_DEVICES[case]
    with pytest.raises(RuntimeError) as info:
        getattr(OPS, name)(*build(device, "cpu"))
    assert message in str(info.value)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_on_cuda(name, requires_grad):
    args = _map(_samples()[name], lambda t: t.cuda())
    differentiable = {"linear_act_factor", "linear_grad_factor", "conv2d_act_factor",
                      "conv2d_grad_factor", "kfac_precondition_inverse", "woodbury_solve", "ewc_penalty"}
    if requires_grad:
        if name in ("kfac_precondition_eigen", "kfac_precondition_diagonal_a"):  # grad only
            args = (args[0].requires_grad_(), *args[1:])
        elif name in differentiable:
            args = _map(args, lambda t: t.requires_grad_())
        else:
            pytest.skip("not differentiable")
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_float32_ops_on_cuda_match_cpu():
    x = torch.randn(64, 16)
    torch.testing.assert_close(ops.linear_act_factor(x.cuda()).cpu(), ops.linear_act_factor(x), rtol=1e-4, atol=1e-5)
    u, v = torch.randn(16, 300), torch.randn(300)
    torch.testing.assert_close(ops.woodbury_solve(u.cuda(), v.cuda(), 0.1).solution.cpu(),
                               ops.woodbury_solve(u, v, 0.1).solution, rtol=1e-4, atol=1e-5)
    params = [torch.randn(1000), torch.randn(30, 40)]
    fisher = [torch.rand_like(p) for p in params]
    anchor = [torch.randn_like(p) for p in params]
    pen_cpu, grads_cpu = ops.ewc_penalty_and_grad(params, fisher, anchor)
    pen_cuda, grads_cuda = ops.ewc_penalty_and_grad(*([t.cuda() for t in ts] for ts in (params, fisher, anchor)))
    torch.testing.assert_close(pen_cuda.cpu(), pen_cpu, rtol=1e-5, atol=0)
    for g_cuda, g_cpu in zip(grads_cuda, grads_cpu):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu)
