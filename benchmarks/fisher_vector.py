"""Matrix-free Fisher-vector products and preconditioned CG: cost and iteration counts.

1. Cost: one ``F·v`` of ``compute_fisher(..., structure="implicit")`` (one jvp + one vjp over
   the batch) against one gradient step (forward, backward of the mean cross-entropy, SGD
   update) on the Fashion-MNIST MLP 784-512-512-10 at batch 128, float32: median time and peak
   allocated memory (torch profiler, see _harness), both in the same process, at 2 threads and
   at 1. Goal: time ≤ 3×, memory ≤ 2× the gradient step's.
2. CG: iterations of ``natgrad.solvers.conjugate_gradient`` to relative residual 1e-3 on
   ``(F + λI) x = ∇L`` (exact Fisher), unpreconditioned and preconditioned by the diagonal
   Fisher and by K-FAC (``structure="kfac"``, damped with λ, and with √λ as in Martens & Grosse
   2015), on (a) the Fashion-MNIST MLP at batch 128 (n·C ≪ p: the Fisher has rank ≤ 1,280 of
   p = 669,706) and (b) an MLP 64-16-10 on all 1,797 digits (n·C ≫ p = 1,210: full rank), both
   briefly trained with Adam first. Goal: K-FAC ≤ 1/3 of the unpreconditioned iterations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from _harness import machine_info, measure, mlp  # noqa: E402
from data import load_fashion_mnist  # noqa: E402

from natgrad.fisher import compute_fisher  # noqa: E402
from natgrad.solvers import conjugate_gradient  # noqa: E402

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOL = 1e-3


def pretrain(model: nn.Module, x, y, steps: int, batch: int) -> None:
    """A few Adam steps (lr 1e-3), so that the Fisher is not the one at initialization."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if batch < len(x) else 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g) if batch < len(x) else slice(None)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def cost(model: nn.Module, x, y, repeats: int) -> list[dict[str, Any]]:
    """F·v against a gradient step, per Fisher type and thread count."""
    params = list(model.parameters())

    def grad_step() -> None:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=0.0)  # the update's memory traffic without moving the point

    rows = []
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    for threads in (2, 1):
        torch.set_num_threads(threads)
        base, _ = measure(grad_step, repeats)
        for fisher_type in ("exact", "empirical", "mc"):
            start = time.perf_counter()
            fisher = compute_fisher(model, x, y, fisher_type=fisher_type, structure="implicit",
                                    generator=torch.Generator().manual_seed(0))
            build_s = time.perf_counter() - start
            fv, _ = measure(lambda f=fisher: f.mv(v), repeats)
            rows.append({"threads": threads, "fisher_type": fisher_type, "grad_step_ms": base.median_s * 1e3,
                         "fv_ms": fv.median_s * 1e3, "build_ms": build_s * 1e3,
                         "time_ratio": fv.median_s / base.median_s,
                         "grad_step_peak_mb": base.peak_bytes / 2**20, "fv_peak_mb": fv.peak_bytes / 2**20,
                         "mem_ratio": fv.peak_bytes / max(base.peak_bytes, 1)})
    torch.set_num_threads(2)
    return rows


def cg_counts(name: str, model: nn.Module, x, y, dampings, max_iters: int) -> list[dict[str, Any]]:
    """Iterations to relative residual TOL per preconditioner and damping (exact Fisher)."""
    fisher = compute_fisher(model, x, y, fisher_type="exact", structure="implicit", chunk_size=2048)
    kfac = compute_fisher(model, x, y, fisher_type="exact", structure="kfac", chunk_size=2048)
    diag = compute_fisher(model, x, y, fisher_type="exact", structure="diagonal", chunk_size=2048)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))])
    mean_eig = float(diag.trace()) / fisher.num_params
    rows = []
    for lam in dampings:
        cases = {"none": (None, None), "diagonal": (diag, None), "kfac": (kfac, None),
                 "kfac_sqrt": (kfac, math.sqrt(lam))}
        row: dict[str, Any] = {"model": name, "n": len(x), "p": fisher.num_params, "damping": lam,
                               "damping_over_mean_eigenvalue": lam / mean_eig}
        for key, (pre, mu) in cases.items():
            start = time.perf_counter()
            res = conjugate_gradient(fisher, g, damping=lam, preconditioner=pre, preconditioner_damping=mu,
                                     tol=TOL, max_iters=max_iters)
            row[key] = {"iterations": res.iterations, "converged": res.converged, "seconds": time.perf_counter() - start,
                        "residuals": res.residuals}
            print(f"  {name} λ={lam:g} {key}: {res.iterations} iterations"
                  f"{'' if res.converged else ' (cap, not converged)'}", flush=True)
        rows.append(row)
    return rows


def plot(cg_rows: list[dict[str, Any]], path: str) -> None:
    """Residual histories of every solve (one panel per model and damping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cg_rows), figsize=(3.6 * len(cg_rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], cg_rows):
        for key in ("none", "diagonal", "kfac", "kfac_sqrt"):
            ax.semilogy(row[key]["residuals"], label=key)
        ax.axhline(TOL, color="gray", ls="--", lw=0.8)
        ax.set_title(f"{row['model']}, λ={row['damping']:g}", fontsize=9)
        ax.set_xlabel("CG iteration")
    axes[0][0].set_ylabel("‖r‖ / ‖b‖")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Runs both parts, prints the tables, writes JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    widths = (784, 64, 64, 10) if args.quick else (784, 512, 512, 10)
    train, _ = load_fashion_mnist(train_size=2000 if args.quick else 20000, test_size=10)
    torch.manual_seed(0)
    model = mlp(widths)
    pretrain(model, train.x, train.y, 5 if args.quick else 200, 128)
    x, y = train.x[:128], train.y[:128]
    costs = cost(model, x, y, 3 if args.quick else 20)
    print(f"\nF·v vs a gradient step, MLP {'-'.join(map(str, widths))}, batch 128, float32")
    print(f"{'threads':>7} {'fisher':>9} {'grad ms':>8} {'F·v ms':>8} {'time x':>7} {'grad MB':>8} {'F·v MB':>7} {'mem x':>6} {'build ms':>9}")
    for r in costs:
        print(f"{r['threads']:>7} {r['fisher_type']:>9} {r['grad_step_ms']:>8.2f} {r['fv_ms']:>8.2f} {r['time_ratio']:>7.2f} "
              f"{r['grad_step_peak_mb']:>8.1f} {r['fv_peak_mb']:>7.1f} {r['mem_ratio']:>6.2f} {r['build_ms']:>9.2f}")
    print("\nCG iterations to relative residual 1e-3 (exact Fisher)")
    cg_rows = cg_counts("fashion-mlp-b128", model, x, y, (1e-4, 1e-3), 30 if args.quick else 400)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x64, y64 = torch.tensor(digits.data / 16.0), torch.tensor(digits.target)
    torch.manual_seed(0)
    small = mlp((64, 16, 10), nn.Tanh).double()
    pretrain(small, x64, y64, 30, len(x64))
    cg_rows += cg_counts("digits-mlp-full", small, x64, y64, (1e-5, 1e-4, 1e-3), 1000)
    print(f"\n{'model':<18} {'n':>5} {'p':>7} {'λ':>7} {'λ/mean eig':>10} {'none':>6} {'diag':>6} {'kfac':>6} {'kfac√λ':>7} {'kfac/none':>9}")
    goals = []
    for r in cg_rows:
        it = {k: r[k]["iterations"] if r[k]["converged"] else None for k in ("none", "diagonal", "kfac", "kfac_sqrt")}
        best = min((v for k, v in it.items() if k.startswith("kfac") and v is not None), default=None)
        ratio = None if best is None or it["none"] is None else best / it["none"]
        r["kfac_best_over_none"] = ratio
        goals.append(ratio is not None and ratio <= 1 / 3)
        cell = {k: ("cap" if v is None else str(v)) for k, v in it.items()}
        print(f"{r['model']:<18} {r['n']:>5} {r['p']:>7} {r['damping']:>7g} {r['damping_over_mean_eigenvalue']:>10.3g} "
              f"{cell['none']:>6} {cell['diagonal']:>6} {cell['kfac']:>6} {cell['kfac_sqrt']:>7} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>9}")
    fv = [r for r in costs if r["fisher_type"] == "exact"]
    time_met = all(r["time_ratio"] <= 3 for r in fv)
    mem_met = all(r["mem_ratio"] <= 2 for r in fv)
    times = ", ".join(f"{r['time_ratio']:.2f}x @{r['threads']}t" for r in fv)
    mems = ", ".join(f"{r['mem_ratio']:.2f}x" for r in fv)
    print(f"\nGoals: F·v (exact) ≤ 3x a gradient step's time: {'met' if time_met else 'NOT met'} ({times}); "
          f"≤ 2x its memory: {'met' if mem_met else 'NOT met'} ({mems}); K-FAC CG ≤ 1/3 of the "
          f"unpreconditioned iterations: met in {sum(goals)} of {len(goals)} (model, λ) cases")
    os.makedirs(args.out_dir, exist_ok=True)
    payload = {"quick": args.quick, "machine": machine_info(), "wall_s": time.perf_counter() - started,
               "widths": widths, "cost": costs, "cg": cg_rows, "tol": TOL,
               "goals": {"fv_time_met": time_met, "fv_memory_met": mem_met, "kfac_third_met": goals}}
    with open(os.path.join(args.out_dir, "fisher_vector.json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot(cg_rows, os.path.join(args.out_dir, "fisher_vector.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
