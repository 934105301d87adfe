"""natgrad.KFAC's step against the floor of its configuration, and A/B between two source trees.

Usage::

    PYTHONPATH=python python benchmarks/kfac_step_ab.py [--quick]            # this tree vs floor
    git worktree add /tmp/old <rev>    # then give it a built natgrad/_C (or copy this tree's)
    PYTHONPATH=python python benchmarks/kfac_step_ab.py --a /tmp/old/python --b python

The floor (design.md) is what any K-FAC step must pay, timed as bare ATen calls at the same
sizes in the same process as natgrad's step: SGD's step (forward, backward, momentum update on a
copy of the same model), plus per Linear/Conv2d layer the preconditioning GEMMs every step
(eigen: ``V_G[(V_Gᵀ W V_A) ⊘ (λ_G λ_Aᵀ + γ)]V_Aᵀ``, four GEMMs; inverse: ``G⁻¹ W A⁻¹``, two), the
two factor GEMMs (addmm in EMA form, after im2col for a Conv2d input) every factor period, and
every inverse period ``eigh`` of both factors (eigen) or a Cholesky factorisation and inverse
of both damped factors (inverse). Its factors come from random data of the layers' shapes, so
they hold no subnormal numbers: the floor is a clean lower bound.

Protocol. One process per (tree, model, inverse method, round). The model is first trained
``--warm`` steps (default 300) on real data with natgrad.KFAC at periods (1, 10), lr 0.1,
momentum 0.9, damping 1e-3, kl_clip 1e-3, factor decay 0.95, batch as below, so that whatever
training puts into factors, decompositions and buffers (subnormal numbers among them) is there.
Then, for each periods (factor, inverse) in (1, 1), (1, 10), (10, 100) and each thread count
(1, 2), the same optimizer continues with those periods for N steps (a multiple of the inverse
period, so each run holds its amortized share of decompositions), then SGD for N steps on a
copy of the model and the floor's bare calls, in the same process; this is repeated ``reps``
times interleaved and each quantity's minimum is kept (on a shared machine, load spikes only
ever add time; the minimum of interleaved runs is the least disturbed estimate of each). A and
B run in alternating processes; medians over ``--rounds`` are reported.

Models (real data, ``benchmarks/data.py``): digits MLP 64-256-256-10 (batch 128), Fashion-MNIST
MLP 784-512-512-10 (batch 128), the autoencoder 784-256-128-32-128-256-784 (tanh, Bernoulli
loss summed over pixels, batch 256), and a CNN on the 8x8 digits (Conv2d 1→16 3x3, Conv2d
16→32 3x3 stride 2, Linear 512→10, batch 128). ``--quick``: the digits MLP and the CNN, 1 thread,
a short warm-up. Writes JSON to ``--out`` (default ``benchmarks/results/kfac_step_ab.json``, or
``kfac_step_ab_quick.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PERIODS = ((1, 1), (1, 10), (10, 100))
METHODS = ("eigen", "inverse")
MODELS = {
    "digits_mlp": {"widths": (64, 256, 256, 10), "act": "relu", "data": "digits", "batch": 128, "loss": "ce"},
    "fmnist_mlp": {"widths": (784, 512, 512, 10), "act": "relu", "data": "fmnist", "batch": 128, "loss": "ce"},
    "autoencoder": {"widths": (784, 256, 128, 32, 128, 256, 784), "act": "tanh", "data": "fmnist",
                    "batch": 256, "loss": "bce"},
    "cnn": {"widths": None, "act": "relu", "data": "digits", "batch": 128, "loss": "ce"},
}
FULL = {"models": list(MODELS), "threads": (1, 2), "warm": 300, "min_steps": 20, "rounds": 1, "reps": 3}
QUICK = {"models": ["digits_mlp", "cnn"], "threads": (1,), "warm": 40, "min_steps": 10, "rounds": 1, "reps": 2}
HYPER = {"lr": 0.1, "momentum": 0.9, "damping": 1e-3, "kl_clip": 1e-3, "factor_decay": 0.95}


# ---- worker (runs in a subprocess with PYTHONPATH set to one tree) -----------------------------

def _build(spec):
    import torch.nn as nn
    if spec["widths"] is None:
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 10))
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[spec["act"]]
    layers = []
    widths = spec["widths"]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _timed(fn, reps, warm=True):
    """(wall, CPU) seconds per call of ``fn`` (after one untimed call if ``warm``)."""
    if warm:
        fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def _floor_ops(model, x, method, loss_fn):
    """Bare-ATen per-step, per-factor-update and per-inverse-update callables at the layers'
    sizes (random data of the captured shapes)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, m_=m: shapes.__setitem__(m_, (i[0].shape, o.shape)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model(x)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(2)
    layers = []
    for m, (in_shape, out_shape) in shapes.items():
        inp, go = torch.randn(*in_shape, generator=g), torch.randn(*out_shape, generator=g)
        if isinstance(m, nn.Conv2d):
            def rows(t=inp, m=m):
                cols = F.unfold(t, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, d, P]
                return cols.transpose(1, 2).reshape(-1, cols.shape[1])
            go_rows = go.permute(0, 2, 3, 1).reshape(-1, go.shape[1])
        else:
            def rows(t=inp):
                return t.reshape(-1, t.shape[-1])
            go_rows = go.reshape(-1, go.shape[-1])
        r = rows()
        a_in = torch.cat([r, torch.ones(r.shape[0], 1)], 1)
        A, G = a_in.T @ a_in / r.shape[0], go_rows.T @ go_rows / go_rows.shape[0]
        eye_a, eye_g = torch.eye(A.shape[0]), torch.eye(G.shape[0])
        (la, va), (lg, vg) = torch.linalg.eigh(A), torch.linalg.eigh(G)
        ai = torch.cholesky_inverse(torch.linalg.cholesky(A + 0.03 * eye_a))
        gi = torch.cholesky_inverse(torch.linalg.cholesky(G + 0.03 * eye_g))
        w = torch.randn(G.shape[0], A.shape[0], generator=g)
        layers.append(dict(rows=rows, go=go_rows, A=A, G=G, la=la, va=va, lg=lg, vg=vg, ai=ai, gi=gi, w=w,
                           eye_a=eye_a, eye_g=eye_g))

    def precondition():
        for L in layers:
            if method == "eigen":
                L["vg"] @ ((L["vg"].T @ L["w"] @ L["va"]) / (L["lg"][:, None] * L["la"][None, :] + 1e-3)) @ L["va"].T
            else:
                L["gi"] @ L["w"] @ L["ai"]

    def factors():
        for L in layers:
            r = L["rows"]()
            L["A"][:-1, :-1].addmm_(r.T, r, beta=0.95, alpha=0.05 / r.shape[0])
            L["G"].addmm_(L["go"].T, L["go"], beta=0.95, alpha=0.05 / L["go"].shape[0])

    def decompose():
        for L in layers:
            if method == "eigen":
                torch.linalg.eigh(L["A"]), torch.linalg.eigh(L["G"])
            else:
                torch.cholesky_inverse(torch.linalg.cholesky(L["A"] + 0.03 * L["eye_a"]))
                torch.cholesky_inverse(torch.linalg.cholesky(L["G"] + 0.03 * L["eye_g"]))
    return precondition, factors, decompose


def worker(job):
    """One process: warm-up, then every (periods, threads) of ``job``; prints JSON rows."""
    import copy
    import warnings

    import torch
    import torch.nn.functional as F
    sys.path.insert(0, HERE)
    import natgrad
    from data import load_digits, load_fashion_mnist
    warnings.filterwarnings("ignore", message="natgrad.KFAC")
    spec = MODELS[job["model"]]
    x_all = (load_digits()[0] if spec["data"] == "digits" else load_fashion_mnist(train_size=10000, test_size=10)[0])
    xs, ys = x_all.x, x_all.y
    if spec["loss"] == "ce":
        def loss_fn(out, x, y):
            return F.cross_entropy(out, y)
    else:
        def loss_fn(out, x, y):
            return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _build(spec)
    opt = natgrad.KFAC(model, lr=HYPER["lr"], momentum=HYPER["momentum"], damping=HYPER["damping"],
                       kl_clip=HYPER["kl_clip"], factor_decay=HYPER["factor_decay"], factor_update_period=1,
                       inverse_update_period=10, inverse_method=job["method"])
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        idx = torch.randint(0, xs.shape[0], (spec["batch"],), generator=gen)
        batches.append((xs[idx], ys[idx]))

    def train(m, o, steps, start=0):
        for i in range(steps):
            x, y = batches[(start + i) % len(batches)]
            o.zero_grad(set_to_none=True)
            loss_fn(m(x), x, y).backward()
            o.step()
    train(model, opt, job["warm"])
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
    rows = []
    for fp, ip in job["periods"]:
        for threads in job["threads"]:
            torch.set_num_threads(threads)
            precondition, factors, decompose = _floor_ops(model, batches[0][0], job["method"], loss_fn)
            opt.factor_update_period, opt.inverse_update_period = fp, ip
            steps = -(-max(job["min_steps"], ip) // ip) * ip
            train(model, opt, 3)
            train(sgd_model, sgd, 3)
            times = {k: [] for k in ("kfac", "sgd", "precondition", "factors", "decompose")}
            for _ in range(job["reps"]):  # interleaved, so that load spikes hit all alike
                times["kfac"].append(_timed(lambda: train(model, opt, steps), 1, warm=False))
                times["sgd"].append(_timed(lambda: train(sgd_model, sgd, steps), 1, warm=False))
                times["precondition"].append(_timed(precondition, 10))
                times["factors"].append(_timed(factors, 5))
                times["decompose"].append(_timed(decompose, 1))
            row = {"periods": [fp, ip], "threads": threads, "steps": steps}
            for clock, c in (("wall", 0), ("cpu", 1)):
                best = {k: min(t[c] for t in v) for k, v in times.items()}
                best["kfac"] /= steps
                best["sgd"] /= steps
                row[clock] = {**{f"{k}_s": v for k, v in best.items()},
                              "floor_s": best["sgd"] + best["precondition"] + best["factors"] / fp
                              + best["decompose"] / ip}
            rows.append(row)
    print(json.dumps(rows))


# ---- driver ---------------------------------------------------------------------------------

def measure(tree: str, job: dict) -> list[dict]:
    """Runs one worker process on ``tree`` (a python/ directory)."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(max(job["threads"])))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed on {tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Runs the rounds, prints the table, writes the JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=None, help="python/ directory of tree A (baseline; optional)")
    parser.add_argument("--b", default=os.path.join(os.path.dirname(HERE), "python"),
                        help="python/ directory of tree B (default: this tree)")
    parser.add_argument("--quick", action="store_true", help="digits MLP and CNN, 1 thread, short warm-up")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", nargs="*", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warm", type=int, default=None, help="warm-up training steps before timing")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="which times the table and ratios use (both are stored)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("models", "threads", "rounds", "warm", "reps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    out_path = args.out or os.path.join(HERE, "results", "kfac_step_ab_quick.json" if args.quick else "kfac_step_ab.json")
    trees = ([("a", args.a)] if args.a else []) + [("b", args.b)]
    print(f"trees: {dict(trees)}; {args.clock} time; load average {os.getloadavg()}")
    head = f"{'model':<12} {'method':<8} {'periods':<9} {'thr':>3} " + \
        (f"{'A ms':>8} " if args.a else "") + f"{'B ms':>8} " + (f"{'B/A':>5} " if args.a else "") + \
        f"{'SGD ms':>7} {'floor ms':>8} " + (f"{'A/floor':>7} " if args.a else "") + f"{'B/floor':>7}"
    print(head)
    rows = []
    for model in cfg["models"]:
        for method in args.methods:
            job = {"model": model, "method": method, "periods": PERIODS, "threads": list(cfg["threads"]),
                   "warm": cfg["warm"], "min_steps": cfg["min_steps"], "reps": cfg["reps"]}
            runs = {k: [] for k, _ in trees}
            for _ in range(cfg["rounds"]):
                for key, tree in trees:
                    runs[key].append(measure(tree, job))
            for i, first in enumerate(runs["b"][0]):
                med = {k: statistics.median(r[i][args.clock]["kfac_s"] for r in runs[k]) for k in runs}
                floor = statistics.median(r[i][args.clock]["floor_s"] for k in runs for r in runs[k])
                sgd = statistics.median(r[i][args.clock]["sgd_s"] for k in runs for r in runs[k])
                row = {"model": model, "method": method, "periods": first["periods"], "threads": first["threads"],
                       "steps": first["steps"], "clock": args.clock, "floor_s": floor, "sgd_s": sgd,
                       **{f"{k}_s": med[k] for k in med}, **{f"{k}_over_floor": med[k] / floor for k in med},
                       "runs": {k: [r[i] for r in runs[k]] for k in runs}}
                if args.a:
                    row["ratio_b_over_a"] = med["b"] / med["a"]
                rows.append(row)
                print(f"{model:<12} {method:<8} {str(tuple(first['periods'])):<9} {first['threads']:>3} "
                      + (f"{med['a'] * 1e3:8.2f} " if args.a else "") + f"{med['b'] * 1e3:8.2f} "
                      + (f"{med['b'] / med['a']:5.2f} " if args.a else "")
                      + f"{sgd * 1e3:7.2f} {floor * 1e3:8.2f} "
                      + (f"{med['a'] / floor:7.2f} " if args.a else "") + f"{med['b'] / floor:7.2f}", flush=True)
    worst = max(r["b_over_floor"] for r in rows)
    print(f"\nworst B/floor: {worst:.2f} (goal: <= 1.1 for every row)")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"a": args.a, "b": args.b, "config": cfg, "hyper": HYPER, "loadavg_end": os.getloadavg(),
                   "rows": rows}, f, indent=1)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
