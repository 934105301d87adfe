"""Accuracy and cost of natgrad.KFAC's warm-started curvature refreshes against exact ones.

Usage::

    PYTHONPATH=python python benchmarks/kfac_refresh.py [--quick] [--out FILE]

For each benchmark model (the digits MLP 64-128-128-10, a Fashion-MNIST MLP 784-512-512-10 and
the Fashion-MNIST autoencoder 784-256-128-32-128-256-784 of ``benchmarks/train.py``) and each
inverse method, K-FAC trains with ``warm_refreshes=W`` (one exact decomposition, then W warm
ones: a subspace-iteration step + QR from the previous eigenvectors for "eigen", Newton–Schulz
from the previous inverses for "inverse"; :mod:`natgrad.curvature.refresh`). After every warm
refresh, each layer's preconditioned gradient ``P g`` (its current gradient) is compared with the
one from an exact decomposition of the same factors:

* ``warm``: relative error ``‖P_warm g − P_exact g‖ / ‖P_exact g‖``;
* ``stale``: the same error for the decomposition from before the refresh (what skipping this
  refresh would give): the warm refresh is worth its cost when ``warm`` is well below ``stale``.

Per model and method the table gives the median and max of both over all layers and warm
refreshes, and the time of one warm refresh of all layers over one exact refresh (the same
factors, the same process, median of 3). Training settings: lr 0.1, momentum 0.9, damping 1e-3,
kl_clip 1e-3, factor_decay 0.95, factor period 1, inverse period 10, batch 256 (digits 128),
empirical Fisher; 2 threads. Writes ``benchmarks/results/kfac_refresh.json``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import format_rows, machine_info, mlp, write_payload  # noqa: E402
from data import load_digits, load_fashion_mnist  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_refresh.json")
MODELS = {  # widths, activation, loss, batch
    "digits MLP 64-128-128-10": ((64, 128, 128, 10), nn.ReLU, "ce", 128),
    "Fashion MLP 784-512-512-10": ((784, 512, 512, 10), nn.ReLU, "ce", 256),
    "autoencoder 784-256-128-32-128-256-784": ((784, 256, 128, 32, 128, 256, 784), nn.Tanh, "bce", 256),
}
SETTINGS = dict(lr=0.1, momentum=0.9, damping=1e-3, kl_clip=1e-3, factor_decay=0.95,
                factor_update_period=1, inverse_update_period=10)


def loss_of(kind: str, out, x, y):
    """Cross entropy (classifiers) or per-pixel BCE summed, batch-averaged (autoencoder)."""
    if kind == "ce":
        return F.cross_entropy(out, y)
    return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def preconditioned(block, state, damping, pi):
    """``P g`` of the layer's current gradient with the decomposition in ``state``."""
    saved, block.state = block.state, state
    try:
        return block.precondition(block.pack([p.grad for p in block.params]), damping, pi).double()
    finally:
        block.state = saved


def refresh_time(opt, warm: bool, repeats: int = 3) -> float:
    """Median seconds of one (warm or exact) refresh of every layer, on copies of the state."""
    times = []
    for _ in range(repeats):
        states = [copy.copy(b.state) for b in opt.estimator.blocks]
        start = time.perf_counter()
        for block in opt.estimator.blocks:
            block.update_inverse(opt.inverse_method, SETTINGS["damping"], opt.pi_correction, warm)
        times.append(time.perf_counter() - start)
        for block, state in zip(opt.estimator.blocks, states):
            block.state = state
    return statistics.median(times)


def run(name: str, method: str, data, steps: int, warm_refreshes: int) -> dict:
    """Trains one model with warm refreshes and records their errors against exact ones."""
    widths, act, kind, batch = MODELS[name]
    torch.manual_seed(0)
    model = mlp(widths, act)
    opt = natgrad.KFAC(model, inverse_method=method, warm_refreshes=warm_refreshes, **SETTINGS)
    gen = torch.Generator().manual_seed(1)
    period = SETTINGS["inverse_update_period"]
    warm_err, stale_err = [], []
    for k in range(steps):
        idx = torch.randint(0, data.x.shape[0], (batch,), generator=gen)
        x, y = data.x[idx], data.y[idx]
        opt.zero_grad()
        loss_of(kind, model(x), x, y).backward()
        refreshing = k % period == 0 and opt.estimator.refreshes % (warm_refreshes + 1) != 0
        before = [copy.copy(b.state) for b in opt.estimator.blocks] if refreshing else None
        opt.step()
        if not refreshing:
            continue
        for block, old in zip(opt.estimator.blocks, before):
            exact_state = copy.copy(block.state)
            saved, block.state = block.state, exact_state
            block.update_inverse(method, SETTINGS["damping"], opt.pi_correction, False)
            block.state = saved
            ref = preconditioned(block, exact_state, SETTINGS["damping"], opt.pi_correction)
            scale = float(ref.norm())
            warm_err.append(float((preconditioned(block, block.state, SETTINGS["damping"], opt.pi_correction) - ref).norm()) / scale)
            stale_err.append(float((preconditioned(block, old, SETTINGS["damping"], opt.pi_correction) - ref).norm()) / scale)
    exact_s, warm_s = refresh_time(opt, False), refresh_time(opt, True)
    return {"model": name, "method": method, "steps": steps, "warm_refreshes": warm_refreshes,
            "warm_error": warm_err, "stale_error": stale_err,
            "warm_error_median": statistics.median(warm_err), "warm_error_max": max(warm_err),
            "stale_error_median": statistics.median(stale_err), "stale_error_max": max(stale_err),
            "exact_refresh_s": exact_s, "warm_refresh_s": warm_s, "time_ratio": warm_s / exact_s}


def main(argv=None) -> int:
    """Runs every model and method, prints the table, writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small data")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--warm-refreshes", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    steps = 31 if args.quick else 101
    digits, _ = load_digits(seed=0)
    fashion, _ = load_fashion_mnist(2000 if args.quick else 10000, 10, seed=0)
    results = []
    for name in MODELS:
        data = digits if name.startswith("digits") else fashion
        for method in ("eigen", "inverse"):
            r = run(name, method, data, steps, args.warm_refreshes)
            print(f"  {name} {method}: warm {r['warm_error_median']:.3g} stale {r['stale_error_median']:.3g} "
                  f"time x{r['time_ratio']:.2f}", flush=True)
            results.append(r)
    rows = [[r["model"], r["method"], f"{r['warm_error_median']:.3g}", f"{r['warm_error_max']:.3g}",
             f"{r['stale_error_median']:.3g}", f"{r['stale_error_max']:.3g}",
             f"{r['exact_refresh_s'] * 1e3:.1f}", f"{r['warm_refresh_s'] * 1e3:.1f}", f"{r['time_ratio']:.2f}"]
            for r in results]
    print(f"\nWarm refreshes (warm_refreshes={args.warm_refreshes}) against exact decompositions of the "
          f"same factors, {steps} steps; error = ||P g - P_exact g|| / ||P_exact g|| over layers and warm refreshes")
    print(format_rows(["model", "method", "warm med", "warm max", "stale med", "stale max",
                       "exact ms", "warm ms", "warm/exact"], rows, left={0, 1}))
    write_payload(args.out, {"machine": machine_info(), "quick": args.quick, "settings": SETTINGS,
                             "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
