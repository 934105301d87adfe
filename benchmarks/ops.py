"""Benchmark natgrad ops against the plain PyTorch compositions a user would otherwise write.

Usage::

    PYTHONPATH=python python benchmarks/ops.py [--quick] [--device DEV] [--out PATH]
        [--only GROUP[,GROUP]]

For every case the natgrad call and the composition are timed (median of several runs after a
warm-up, 2 threads) and their peak torch-allocated memory is measured; their results must agree
(``torch.testing.assert_close`` at a loose tolerance) or the case is reported as WRONG RESULT.
Prints a table of time ratios (composition / natgrad, > 1: natgrad faster) and peak-memory
ratios (composition / natgrad, > 1: natgrad leaner), states the issue's goals next to them, and
writes the raw numbers to JSON (default ``benchmarks/results/ops_<device type>.json``).

``--device cuda`` (or any torch device) creates every benchmark tensor there
(``torch.set_default_device``); on CUDA each timed call ends with ``torch.cuda.synchronize()``
and peak memory is read from the CUDA caching allocator (``torch.cuda.max_memory_allocated``
above what was allocated before the call) instead of the CPU profiler.

``--quick`` uses small sizes (a smoke test, < 1 minute); goals are then only indicative.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402
import natgrad  # noqa: E402  (loads torch.ops.natgrad)
from _harness import (  # noqa: E402
    Comparison, Goal, assert_close, compare, print_table, verify_peak_memory, write_json)

torch.set_num_threads(2)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_OUT = os.path.join(RESULTS, "ops_cpu.json")
DECAY = 0.95
GROUPS = ("factors", "conv", "precond", "woodbury", "diag_fisher", "ewc")

# Sizes and repeat counts. Tuples: see the bench_* function using them.
FULL: dict[str, Any] = {
    "linear_dims": (256, 1024, 2048), "linear_batch": 512, "linear_repeats": 10,
    # (batch, channels, height, width); 3x3 kernel, padding 1, stride 1, bias.
    "conv": ((128, 64, 32, 32), (128, 128, 16, 16)), "conv_repeats": 3,
    # (d_out, d_in incl. bias column, repeats, warmup)
    "precond": ((256, 257, 5, 1), (1024, 1025, 3, 1), (2048, 2049, 1, 0)),
    "apply": ((256, 257), (1024, 1025), (2048, 2049)), "apply_repeats": 10,
    "inverse": ((256, 257, 5, 1), (1024, 1025, 3, 1), (2048, 2049, 2, 1)),
    # (p, n, repeats, warmup); the dense p x p solve at p = 20,000 is timed once.
    "woodbury": ((4000, 128, 3, 1), (20000, 128, 1, 0)), "woodbury_goal_p": 20000,
    # (N, d_in, d_out) plain, and (N, tokens, d_in, d_out)
    "diag": (256, 256, 256), "diag_tokens": (64, 32, 256, 256), "diag_repeats": 5,
    # layers of (weight [out, in], bias [out]) -> 2 * layers tensors
    "ewc": (10, 512, 960), "ewc_repeats": 10,
}
QUICK: dict[str, Any] = {
    "linear_dims": (64, 256), "linear_batch": 64, "linear_repeats": 3,
    "conv": ((8, 16, 16, 16), (8, 32, 8, 8)), "conv_repeats": 3,
    "precond": ((64, 65, 3, 1), (256, 257, 3, 1)),
    "apply": ((64, 65), (256, 257)), "apply_repeats": 3,
    "inverse": ((64, 65, 3, 1), (256, 257, 3, 1)),
    "woodbury": ((1000, 32, 3, 1), (2000, 64, 2, 1)), "woodbury_goal_p": 2000,
    "diag": (256, 64, 64), "diag_tokens": (16, 8, 64, 64), "diag_repeats": 3,
    "ewc": (10, 64, 96), "ewc_repeats": 3,
}

QUICK_NOTE = " [quick sizes: indicative only]"


def factor_goal(quick: bool) -> Goal:
    """The issue's goal for EMA factor updates and Conv2d factors."""
    return Goal("EMA factor updates and conv factor at least as fast as the composition "
                "(time x >= 1) with lower peak memory (mem x > 1)" + (QUICK_NOTE if quick else ""),
                min_time_ratio=1.0, min_mem_ratio_exclusive=1.0)


# Wrappers whose name differs from the op's (natgrad.ops.ewc_penalty returns the penalty only).
_WRAPPER_NAME = {"ewc_penalty": "ewc_penalty_and_grad"}


def op(name: str) -> Callable[..., Any]:
    """The natgrad op ``name``: its Python wrapper in natgrad.ops if present, else torch.ops.

    Both take the schema's arguments positionally and return the same outputs (wrappers return
    named tuples / the updated factor where the raw op returns a tuple / None).
    """
    wrapper = getattr(natgrad.ops, _WRAPPER_NAME.get(name, name), None)
    return wrapper if callable(wrapper) else getattr(torch.ops.natgrad, name)


def api_in_use() -> str:
    """Which natgrad entry points the benchmark calls (wrappers or raw torch.ops)."""
    return "natgrad.ops" if callable(getattr(natgrad.ops, "linear_act_factor", None)) \
        else "torch.ops.natgrad"


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


def bench_factors(s: dict[str, Any], quick: bool) -> list[Comparison]:
    """Linear activation / gradient factor EMA updates vs mm + mul_ + add_."""
    out = []
    n = s["linear_batch"]
    for d in s["linear_dims"]:
        a = torch.randn(n, d)
        f_nat, f_ref = torch.eye(d + 1), torch.eye(d + 1)

        def nat_a(f: torch.Tensor = f_nat, a: torch.Tensor = a) -> torch.Tensor:
            op("linear_act_factor_ema_")(f, a, True, DECAY)
            return f

        def ref_a(f: torch.Tensor = f_ref, a: torch.Tensor = a) -> torch.Tensor:
            ab = _with_ones(a)
            f.mul_(DECAY)
            f.add_(ab.T @ ab / ab.shape[0], alpha=1 - DECAY)
            return f

        out.append(compare(f"linear_act_factor_ema_ d={d} n={n}", "factors", nat_a, ref_a,
                           params={"d_in": d, "batch": n, "bias": True, "decay": DECAY},
                           repeats=s["linear_repeats"], goal=factor_goal(quick),
                           baseline_desc="cat ones; factor.mul_(decay); "
                                         "factor.add_(a1.T @ a1 / n, alpha=1-decay)"))

        g, scale = torch.randn(n, d) / n, float(n)
        f_nat, f_ref = torch.eye(d), torch.eye(d)

        def nat_g(f: torch.Tensor = f_nat, g: torch.Tensor = g) -> torch.Tensor:
            op("linear_grad_factor_ema_")(f, g, scale, DECAY)
            return f

        def ref_g(f: torch.Tensor = f_ref, g: torch.Tensor = g) -> torch.Tensor:
            f.mul_(DECAY)
            f.add_(g.T @ g * (scale * scale / g.shape[0]), alpha=1 - DECAY)
            return f

        out.append(compare(f"linear_grad_factor_ema_ d={d} n={n}", "factors", nat_g, ref_g,
                           params={"d_out": d, "batch": n, "grad_scale": scale, "decay": DECAY},
                           repeats=s["linear_repeats"], goal=factor_goal(quick),
                           baseline_desc="factor.mul_(decay); "
                                         "factor.add_(g.T @ g * s^2/n, alpha=1-decay)"))
    return out


def _unfold_factor(x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, (3, 3), dilation=1, padding=1, stride=1)  # [N, C*9, L]
    rows = _with_ones(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    return rows.T @ rows / rows.shape[0]


def bench_conv(s: dict[str, Any], quick: bool) -> list[Comparison]:
    """Conv2d factors (3x3, padding 1) vs F.unfold + reshape + mm, plain and EMA."""
    out = []
    geom = ((3, 3), (1, 1), (1, 1), (1, 1))  # kernel, stride, padding, dilation
    for (n, c, h, w) in s["conv"]:
        x = torch.randn(n, c, h, w)
        dim = c * 9 + 1
        params = {"batch": n, "channels": c, "hw": [h, w], "kernel": 3, "padding": 1,
                  "factor_dim": dim}
        tag = f"N={n} C={c} {h}x{w} (dim {dim})"
        out.append(compare(f"conv2d_act_factor {tag}", "conv",
                           lambda x=x: op("conv2d_act_factor")(x, *geom, True),
                           lambda x=x: _unfold_factor(x), params=params,
                           repeats=s["conv_repeats"], goal=factor_goal(quick),
                           baseline_desc="F.unfold; transpose/reshape; cat ones; rows.T @ rows / n"))

        f_nat, f_ref = torch.eye(dim), torch.eye(dim)

        def nat_ema(f: torch.Tensor = f_nat, x: torch.Tensor = x) -> torch.Tensor:
            op("conv2d_act_factor_ema_")(f, x, *geom, True, DECAY)
            return f

        def ref_ema(f: torch.Tensor = f_ref, x: torch.Tensor = x) -> torch.Tensor:
            f.mul_(DECAY)
            f.add_(_unfold_factor(x), alpha=1 - DECAY)
            return f

        out.append(compare(f"conv2d_act_factor_ema_ {tag}", "conv", nat_ema, ref_ema,
                           params={**params, "decay": DECAY}, repeats=s["conv_repeats"],
                           goal=factor_goal(quick),
                           baseline_desc="unfold factor as above; mul_(decay); add_(alpha=1-decay)"))

        g, scale = torch.randn(n, c, h, w) / n, float(n)
        fg_nat, fg_ref = torch.eye(c), torch.eye(c)

        def nat_g(f: torch.Tensor = fg_nat, g: torch.Tensor = g) -> torch.Tensor:
            op("conv2d_grad_factor_ema_")(f, g, scale, DECAY)
            return f

        def ref_g(f: torch.Tensor = fg_ref, g: torch.Tensor = g) -> torch.Tensor:
            rows = g.movedim(1, -1).reshape(-1, g.shape[1])
            f.mul_(DECAY)
            f.add_(rows.T @ rows * (scale * scale / rows.shape[0]), alpha=1 - DECAY)
            return f

        out.append(compare(f"conv2d_grad_factor_ema_ N={n} C={c} {h}x{w}", "conv", nat_g, ref_g,
                           params={"batch": n, "channels": c, "hw": [h, w], "grad_scale": scale,
                                   "decay": DECAY},
                           repeats=s["conv_repeats"], goal=factor_goal(quick),
                           baseline_desc="movedim/reshape rows; mul_(decay); "
                                         "add_(rows.T @ rows * s^2/n, alpha=1-decay)"))
    return out


def _spd(d: int) -> torch.Tensor:
    """A well-conditioned, exactly symmetric Kronecker factor (Gram matrix of 2d rows)."""
    x = torch.randn(2 * d, d)
    m = x.T @ x / (2 * d)
    return (m + m.T) / 2


def _eigen_formula(dw: torch.Tensor, lg: torch.Tensor, vg: torch.Tensor, la: torch.Tensor,
                   va: torch.Tensor, damping: float) -> torch.Tensor:
    return vg @ ((vg.T @ dw @ va) / (lg[:, None] * la[None, :] + damping)) @ va.T


def bench_precond(s: dict[str, Any]) -> list[Comparison]:
    """K-FAC preconditioning: eigh + formula, apply-only, and damped inverses + apply."""
    out, damping = [], 1e-3
    for (d_out, d_in, repeats, warmup) in s["precond"]:
        g_fac, a_fac, dw = _spd(d_out), _spd(d_in), torch.randn(d_out, d_in)

        def nat(g_fac: torch.Tensor = g_fac, a_fac: torch.Tensor = a_fac,
                dw: torch.Tensor = dw) -> torch.Tensor:
            lg, vg, _ = op("damped_eigh")(g_fac, 0.0)
            la, va, _ = op("damped_eigh")(a_fac, 0.0)
            return op("kfac_precondition_eigen")(dw, lg, vg, la, va, damping, False)

        def ref(g_fac: torch.Tensor = g_fac, a_fac: torch.Tensor = a_fac,
                dw: torch.Tensor = dw) -> torch.Tensor:
            lg, vg = torch.linalg.eigh(g_fac)
            la, va = torch.linalg.eigh(a_fac)
            return _eigen_formula(dw, lg.clamp_min(0), vg, la.clamp_min(0), va, damping)

        out.append(compare(f"eigh x2 + precondition {d_out}x{d_in}", "precond", nat, ref,
                           params={"d_out": d_out, "d_in": d_in, "damping": damping},
                           repeats=repeats, warmup=warmup,
                           baseline_desc="torch.linalg.eigh on G and A; V_G[(V_G^T dW V_A)/"
                                         "(l_G l_A^T + damping)]V_A^T"))
    for (d_out, d_in) in s["apply"]:
        g_fac, a_fac, dw = _spd(d_out), _spd(d_in), torch.randn(d_out, d_in)
        lg, vg, _ = op("damped_eigh")(g_fac, 0.0)
        la, va, _ = op("damped_eigh")(a_fac, 0.0)
        args = (dw, lg, vg, la, va)
        out.append(compare(f"apply eigen (given eigh) {d_out}x{d_in}", "precond",
                           lambda args=args: op("kfac_precondition_eigen")(*args, damping, False),
                           lambda args=args: _eigen_formula(*args, damping),
                           params={"d_out": d_out, "d_in": d_in, "damping": damping},
                           repeats=s["apply_repeats"],
                           baseline_desc="V_G[(V_G^T dW V_A)/(l_G l_A^T + damping)]V_A^T"))
    for (d_out, d_in, repeats, warmup) in s["inverse"]:
        g_fac, a_fac, dw = _spd(d_out), _spd(d_in), torch.randn(d_out, d_in)
        root = math.sqrt(damping)

        def nat_inv(g_fac: torch.Tensor = g_fac, a_fac: torch.Tensor = a_fac,
                    dw: torch.Tensor = dw) -> torch.Tensor:
            g_inv, a_inv, _ = op("kfac_damped_inverses")(g_fac, a_fac, damping, False)
            return op("kfac_precondition_inverse")(dw, g_inv, a_inv)

        def ref_inv(g_fac: torch.Tensor = g_fac, a_fac: torch.Tensor = a_fac,
                    dw: torch.Tensor = dw) -> torch.Tensor:
            g_inv = torch.linalg.inv(g_fac + root * torch.eye(g_fac.shape[0]))
            a_inv = torch.linalg.inv(a_fac + root * torch.eye(a_fac.shape[0]))
            return g_inv @ dw @ a_inv

        out.append(compare(f"damped inverses + apply {d_out}x{d_in}", "precond", nat_inv, ref_inv,
                           params={"d_out": d_out, "d_in": d_in, "damping": damping},
                           repeats=repeats, warmup=warmup,
                           baseline_desc="torch.linalg.inv(G + sqrt(damping) I), same for A; "
                                         "G_inv @ dW @ A_inv"))
    return out


def bench_woodbury(s: dict[str, Any], quick: bool) -> list[Comparison]:
    """Woodbury solve vs torch.linalg.solve on the dense p x p damped empirical Fisher."""
    out, damping = [], 1e-3
    for (p, n, repeats, warmup) in s["woodbury"]:
        u, v = torch.randn(n, p) * 0.01, torch.randn(p)
        goal = None
        if p == s["woodbury_goal_p"]:
            goal = Goal(f">= 20x faster than the dense solve at p=20,000, n=128"
                        + (QUICK_NOTE if quick else ""), min_time_ratio=20.0)
        out.append(compare(
            f"woodbury_solve p={p} n={n}", "woodbury",
            lambda u=u, v=v: op("woodbury_solve")(u, v, damping)[0],
            lambda u=u, v=v: torch.linalg.solve(
                u.T @ u / u.shape[0] + damping * torch.eye(u.shape[1]), v),
            params={"p": p, "n": n, "damping": damping, "dense_bytes": 4 * p * p},
            repeats=repeats, warmup=warmup, goal=goal,
            check=lambda a, b: assert_close(a, b, rtol=2e-3, atol_rel=2e-4, what="woodbury"),
            baseline_desc="torch.linalg.solve(U.T @ U / n + damping * torch.eye(p), v)"))
    return out


def bench_diag_fisher(s: dict[str, Any], quick: bool) -> list[Comparison]:
    """linear_diag_fisher vs a Python loop over per-sample gradient outer products."""
    out = []
    n, d_in, d_out = s["diag"]
    a, g, scale = torch.randn(n, d_in), torch.randn(n, d_out) / n, float(n)

    def ref(a: torch.Tensor = a, g: torch.Tensor = g) -> torch.Tensor:
        ab = _with_ones(a)
        acc = torch.zeros(g.shape[1], ab.shape[1])
        for i in range(ab.shape[0]):
            acc += torch.outer(g[i], ab[i]).square_()
        return acc.mul_(scale * scale / ab.shape[0])

    goal = Goal(">= 10x faster than the per-sample loop at n=256"
                + (QUICK_NOTE if quick else ""), min_time_ratio=10.0)
    out.append(compare(f"linear_diag_fisher N={n} {d_out}x{d_in}+bias", "diag_fisher",
                       lambda a=a, g=g: op("linear_diag_fisher")(a, g, True, scale), ref,
                       params={"batch": n, "d_in": d_in, "d_out": d_out, "bias": True},
                       repeats=s["diag_repeats"], goal=goal if n == 256 else None,
                       baseline_desc="for each sample: acc += outer(g_n, [a_n, 1])^2; "
                                     "acc * s^2 / N"))

    n, t, d_in, d_out = s["diag_tokens"]
    a, g = torch.randn(n, t, d_in), torch.randn(n, t, d_out) / n

    def ref_tok(a: torch.Tensor = a, g: torch.Tensor = g) -> torch.Tensor:
        acc = torch.zeros(g.shape[-1], a.shape[-1] + 1)
        for i in range(a.shape[0]):
            acc[:, :-1] += (g[i].T @ a[i]).square_()
            acc[:, -1] += g[i].sum(0).square_()
        return acc.mul_(scale * scale / a.shape[0])

    out.append(compare(f"linear_diag_fisher N={n} T={t} {d_out}x{d_in}+bias", "diag_fisher",
                       lambda a=a, g=g: op("linear_diag_fisher")(a, g, True, scale), ref_tok,
                       params={"batch": n, "tokens": t, "d_in": d_in, "d_out": d_out,
                               "bias": True},
                       repeats=s["diag_repeats"],
                       baseline_desc="for each sample: acc += (g_n^T a_n)^2 (+ bias column)"))
    return out


def bench_ewc(s: dict[str, Any]) -> list[Comparison]:
    """ewc_penalty vs the Python loop with autograd or explicit gradients."""
    layers, d_out, d_in = s["ewc"]
    shapes = [shape for _ in range(layers) for shape in ((d_out, d_in), (d_out,))]
    params = [torch.randn(sh) for sh in shapes]
    anchor = [p + 0.01 * torch.randn_like(p) for p in params]
    fisher = [torch.rand(sh) for sh in shapes]
    total = sum(p.numel() for p in params)
    info = {"tensors": len(shapes), "total_params": total}
    leaves = [p.clone().requires_grad_() for p in params]

    def nat() -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen, grads = op("ewc_penalty")(params, fisher, anchor)
        return pen, list(grads)

    def ref_explicit() -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen = sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchor))
        return pen, [2 * f * (p - a) for p, f, a in zip(params, fisher, anchor)]

    def ref_autograd() -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen = sum((f * (p - a) ** 2).sum() for p, f, a in zip(leaves, fisher, anchor))
        return pen.detach(), list(torch.autograd.grad(pen, leaves))

    def check(x: Any, y: Any) -> None:
        assert_close(x, y, rtol=1e-4, atol_rel=1e-5, what="ewc")

    tag = f"{len(shapes)} tensors, {total / 1e6:.2f}M params"
    return [
        compare(f"ewc_penalty vs explicit grads ({tag})", "ewc", nat, ref_explicit, params=info,
                repeats=s["ewc_repeats"], check=check,
                baseline_desc="sum((F*(p-a)**2).sum() ...); [2*F*(p-a) ...]"),
        compare(f"ewc_penalty vs autograd ({tag})", "ewc", nat, ref_autograd, params=info,
                repeats=s["ewc_repeats"], check=check,
                baseline_desc="sum((F*(p-a)**2).sum() ...); torch.autograd.grad"),
    ]


def _cuda_peak_and_time(fn: Callable[[], Any]) -> tuple[int, float, Any]:
    """(peak bytes, wall seconds, result) of one call of ``fn`` on CUDA: the caching allocator's
    peak above what was allocated before the call, and the time up to a synchronize."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return torch.cuda.max_memory_allocated() - before, elapsed, result


def use_device(device: torch.device) -> str:
    """Makes every benchmark tensor live on ``device``; returns how peak memory is measured.

    New tensors default to ``device``. On CUDA, both sides of every comparison synchronize at the
    end of each call (so wall-clock times cover the kernels), and the harness's peak-memory
    measurement (the CPU profiler's allocation events) is replaced by the CUDA allocator's.
    """
    torch.set_default_device(device)
    if device.type != "cuda":
        return "torch.profiler CPU allocation events"
    global compare
    cpu_compare = compare

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            out = fn()
            torch.cuda.synchronize()
            return out
        return call

    def cuda_compare(name: str, group: str, natgrad_fn: Callable[[], Any],
                     baseline_fn: Callable[[], Any], **kwargs: Any) -> Comparison:
        return cpu_compare(name, group, synced(natgrad_fn), synced(baseline_fn), **kwargs)

    compare = cuda_compare
    _harness._peak_and_time = _cuda_peak_and_time
    return "torch.cuda.max_memory_allocated above the allocation before the call"


def device_label(device: torch.device) -> str:
    """``cpu``, or the accelerator's name (e.g. ``cuda NVIDIA H200``)."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def run(quick: bool, groups: tuple[str, ...] = GROUPS) -> list[Comparison]:
    """Runs the selected benchmark groups at quick or full sizes and returns the comparisons."""
    s = QUICK if quick else FULL
    benches: dict[str, Callable[[], list[Comparison]]] = {
        "factors": lambda: bench_factors(s, quick),
        "conv": lambda: bench_conv(s, quick),
        "precond": lambda: bench_precond(s),
        "woodbury": lambda: bench_woodbury(s, quick),
        "diag_fisher": lambda: bench_diag_fisher(s, quick),
        "ewc": lambda: bench_ewc(s),
    }
    out: list[Comparison] = []
    for name in groups:
        print(f"[{name}]", flush=True)
        torch.manual_seed(0)
        out += benches[name]()
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 when any natgrad result disagreed with its composition."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test, < 1 min)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to run on, e.g. cuda or cuda:1 (default cpu)")
    parser.add_argument("--out", default=None,
                        help=f"JSON path (default {os.path.join(RESULTS, 'ops_<device type>.json')})")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run (default all: {','.join(GROUPS)})")
    args = parser.parse_args(argv)
    groups = tuple(g for g in args.only.split(",") if g)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {GROUPS}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    out_path = args.out or os.path.join(RESULTS, f"ops_{device.type}.json")

    verify_peak_memory()  # the CPU method, checked before tensors move to the device
    memory_method = use_device(device)
    label = device_label(device)
    print(f"natgrad {natgrad.__version__} via {api_in_use()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'QUICK' if args.quick else 'full'} sizes, "
          f"device {label}")
    comparisons = run(args.quick, groups)
    print_table(comparisons, title=f"natgrad ops vs PyTorch compositions "
                                   f"({'quick' if args.quick else 'full'} sizes, "
                                   f"{torch.get_num_threads()} threads, {label})")
    write_json(out_path, comparisons, extra={
        "benchmark": "ops", "quick": args.quick, "api": api_in_use(),
        "natgrad_version": natgrad.__version__, "natgrad_build": natgrad.build_info(),
        "groups": list(groups), "device": str(device), "device_name": label,
        "memory_method": memory_method})
    print(f"\nwrote {out_path}")
    wrong = [c for c in comparisons if c.error]
    for c in wrong:
        print(f"WRONG RESULT in {c.group}/{c.name}: {c.error}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
